"""Offline asset fetcher: fabricated wheels (fast) and the real offline Qwen model (`real`).

Fast tests redirect $SMF_CACHE to tmp_path, register fake catalogue entries and replace the pip
download with a copy of a fabricated wheel, so they exercise the real verification, extraction,
GGUF assembly + conversion, marker and atomic-rename logic without any network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil

import pytest
import torch
from _tiny_gguf import make_wheel, write_tiny_gguf

from smf_lightning import assets
from smf_lightning.assets import Asset, AssetError, Wheel, asset_path, asset_status, ensure_asset

DATA_FILES = {
    "fake_pkg/data/a/train.txt": b"alpha " * 1000,
    "fake_pkg/data/b.json": b'{"x": 1}',
    "fake_pkg/other/skip.txt": b"not extracted",
    "fake_pkg/__init__.py": b"",
}


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("SMF_CACHE", str(root))
    monkeypatch.delenv(assets.WHEELS_DIR_ENV, raising=False)
    return root


class FakeIndex:
    """Stands in for `pip download`: serves wheels from a dict, optionally a corrupt copy first."""

    def __init__(self, monkeypatch):
        self.wheels = {}  # package -> list of wheel paths to serve, one per call (last one repeats)
        self.calls = []
        monkeypatch.setattr(assets, "_pip_download", self)

    def __call__(self, package, version, dest, wheels_dir, progress):
        self.calls.append(package)
        queue = self.wheels[package]
        src = queue.pop(0) if len(queue) > 1 else queue[0]
        dest.mkdir(parents=True, exist_ok=True)
        return shutil.copy(src, dest / src.name)


@pytest.fixture
def data_asset(cache, tmp_path, monkeypatch):
    """A fake data asset whose one wheel holds DATA_FILES; returns (asset, good wheel, FakeIndex)."""
    (tmp_path / "good").mkdir()
    good = make_wheel(tmp_path / "good", "fake-pkg", "1.0", DATA_FILES)
    asset = Asset(name="fake-data", kind="data", description="test data", provenance="fabricated",
                  wheels=(Wheel("fake-pkg", "1.0", sha256=sha256(good)),),
                  extract_patterns=("fake_pkg/data/*",), strip_prefix="fake_pkg/")
    monkeypatch.setitem(assets.ASSETS, asset.name, asset)
    index = FakeIndex(monkeypatch)
    index.wheels["fake-pkg"] = [good]
    return asset, good, index


def corrupt_copy(wheel, tmp_path, tag="bad"):
    """Same file name, different bytes (a flipped byte in the middle of the zip)."""
    (tmp_path / tag).mkdir(exist_ok=True)
    bad = tmp_path / tag / wheel.name
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    return bad


# ----------------------------------------------------------------------------- data assets


def test_fetch_extracts_only_matching_files_and_writes_marker(data_asset):
    asset, _, index = data_asset
    root = ensure_asset("fake-data", progress=False)
    assert root == asset_path("fake-data") and asset_status("fake-data").state == "ready"
    assert (root / "data/a/train.txt").read_bytes() == DATA_FILES["fake_pkg/data/a/train.txt"]
    assert (root / "data/b.json").read_bytes() == DATA_FILES["fake_pkg/data/b.json"]
    assert not (root / "other").exists() and not (root / "__init__.py").exists()
    marker = json.loads((root / assets.MARKER).read_text())
    assert set(marker["files"]) == {"data/a/train.txt", "data/b.json"}
    for rel, meta in marker["files"].items():
        assert meta["sha256"] == sha256(root / rel) and meta["size"] == (root / rel).stat().st_size
    assert marker["fingerprint"] == asset.fingerprint()
    assert not (assets.cache_root() / "downloads" / "fake-data").exists()  # wheels cleaned up
    assert list((assets.cache_root() / "tmp").iterdir()) == []  # no build leftovers


def _forbid_slow_paths(monkeypatch):
    """A ready asset takes the fast path: no lock, no hashing, no build (asserted, not timed)."""
    def forbidden(*a, **k):
        raise AssertionError("a ready asset must not be locked, hashed or rebuilt")

    for name in ("_lock", "_sha256", "_build"):
        monkeypatch.setattr(assets, name, forbidden)


def test_rerun_is_a_noop(data_asset, monkeypatch):
    _, _, index = data_asset
    root = ensure_asset("fake-data", progress=False)
    marker_mtime = (root / assets.MARKER).stat().st_mtime_ns
    _forbid_slow_paths(monkeypatch)
    assert ensure_asset("fake-data", progress=False) == root
    assert index.calls == ["fake-pkg"]  # no second download
    assert (root / assets.MARKER).stat().st_mtime_ns == marker_mtime


def test_checksum_mismatch_is_detected_and_redone(data_asset, tmp_path):
    _, good, index = data_asset
    # A perfectly valid wheel with other contents (a tampered or wrong upload): only sha256 can tell.
    (tmp_path / "tampered").mkdir()
    tampered = make_wheel(tmp_path / "tampered", "fake-pkg", "1.0", {**DATA_FILES, "fake_pkg/data/b.json": b"{}"})
    index.wheels["fake-pkg"] = [tampered, good]
    root = ensure_asset("fake-data", progress=False)
    assert index.calls == ["fake-pkg", "fake-pkg"]
    assert asset_status("fake-data", deep=True).state == "ready"
    assert (root / "data/b.json").read_bytes() == DATA_FILES["fake_pkg/data/b.json"]


def test_damaged_zip_without_known_checksum_is_redone(data_asset, tmp_path, monkeypatch):
    asset, good, index = data_asset
    # No pinned wheel sha256 (like the Qwen parts): the zip CRC still catches flipped bytes.
    monkeypatch.setitem(assets.ASSETS, "fake-data", dataclasses.replace(asset, wheels=(Wheel("fake-pkg", "1.0"),)))
    index.wheels["fake-pkg"] = [corrupt_copy(good, tmp_path), good]
    root = ensure_asset("fake-data", progress=False)
    assert index.calls == ["fake-pkg", "fake-pkg"]
    assert (root / "data/a/train.txt").read_bytes() == DATA_FILES["fake_pkg/data/a/train.txt"]


def test_checksum_mismatch_twice_fails_and_leaves_nothing_usable(data_asset, tmp_path):
    _, good, index = data_asset
    index.wheels["fake-pkg"] = [corrupt_copy(good, tmp_path)]
    with pytest.raises(AssetError, match="failed verification twice.*sha256"):
        ensure_asset("fake-data", progress=False)
    assert asset_status("fake-data").state == "missing"
    assert index.calls == ["fake-pkg", "fake-pkg"]


def test_partial_extraction_without_marker_is_redone(data_asset):
    root = asset_path("fake-data")
    (root / "data").mkdir(parents=True)
    (root / "data/b.json").write_bytes(b'{"x"')  # e.g. a copy killed half-way, never marked complete
    (root / "junk.tmp").write_bytes(b"junk")
    killed_build = assets.cache_root() / "tmp" / "fake-data.abc123"  # a build dir of a killed process
    (killed_build / "data").mkdir(parents=True)
    assert asset_status("fake-data").state == "incomplete"
    ensure_asset("fake-data", progress=False)
    assert not killed_build.exists()
    assert asset_status("fake-data").state == "ready"
    assert (root / "data/b.json").read_bytes() == DATA_FILES["fake_pkg/data/b.json"]
    assert not (root / "junk.tmp").exists()


def test_truncated_or_altered_file_is_detected(data_asset):
    _, _, index = data_asset
    root = ensure_asset("fake-data", progress=False)
    target = root / "data/a/train.txt"
    original = target.read_bytes()

    target.write_bytes(original[:-1])  # truncation: caught by the fast (size) check
    assert asset_status("fake-data").state == "corrupt"
    ensure_asset("fake-data", progress=False)
    assert target.read_bytes() == original and len(index.calls) == 2

    target.write_bytes(original.replace(b"alpha", b"omega", 1))  # same size: only the deep check sees it
    assert asset_status("fake-data").state == "ready"
    assert asset_status("fake-data", deep=True).state == "corrupt"
    assert assets.main(["verify", "fake-data"]) == 1
    ensure_asset("fake-data", progress=False, force=True)
    assert target.read_bytes() == original


def test_changed_recipe_makes_cache_stale(data_asset, monkeypatch):
    asset, _, index = data_asset
    ensure_asset("fake-data", progress=False)
    wider = dataclasses.replace(asset, extract_patterns=asset.extract_patterns + ("fake_pkg/other/*",))
    monkeypatch.setitem(assets.ASSETS, "fake-data", wider)
    assert asset_status("fake-data").state == "stale"
    root = ensure_asset("fake-data", progress=False)
    assert (root / "other/skip.txt").read_bytes() == b"not extracted"


def test_zip_member_escaping_the_cache_is_refused(cache, tmp_path, monkeypatch):
    (tmp_path / "evil").mkdir()
    evil = make_wheel(tmp_path / "evil", "evil-pkg", "1.0", {"evil_pkg/data/../../../escaped.txt": b"x"})
    monkeypatch.setitem(assets.ASSETS, "evil", Asset(
        name="evil", kind="data", description="", provenance="", wheels=(Wheel("evil-pkg", "1.0"),),
        extract_patterns=("evil_pkg/data/*",), strip_prefix="evil_pkg/"))
    FakeIndex(monkeypatch).wheels["evil-pkg"] = [evil]
    with pytest.raises(AssetError, match="outside the cache"):
        ensure_asset("evil", progress=False)
    assert not list(tmp_path.rglob("escaped.txt"))


def test_unknown_asset_error_names_the_known_ones(cache, capsys):
    for call in (ensure_asset, asset_status, asset_path):
        with pytest.raises(AssetError, match=r"Unknown asset 'nope'.*qwen2\.5-0\.5b-offline.*assets list"):
            call("nope")
    assert assets.main(["fetch", "nope"]) == 2
    assert "Unknown asset 'nope'" in capsys.readouterr().err


def test_list_shows_status_and_path(cache, capsys):
    assert assets.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in assets.ASSETS:
        assert name in out and str(asset_path(name)) in out
    assert "missing" in out


def test_seed_copies_computed_caches_into_an_empty_cache_and_never_overwrites(cache, tmp_path, capsys):
    seed = tmp_path / "seed"
    for name in ("probes/probe-a.json", "before_eval/before-b.json", "background/bg.json", "probes/notes.txt"):
        (seed / name).parent.mkdir(parents=True, exist_ok=True)
        (seed / name).write_text(name)
    assert assets.main(["seed", str(seed)]) == 0
    assert "2 computed files seeded" in capsys.readouterr().out
    # only the seeded kinds' JSON files: other caches (background) are computed where they are used
    assert sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()) == \
        ["before_eval/before-b.json", "probes/probe-a.json"]
    (cache / "probes/probe-a.json").write_text("grown by a run")
    assert assets.seed_cache(seed) == [] and (cache / "probes/probe-a.json").read_text() == "grown by a run"
    assert assets.main(["seed", str(tmp_path / "nowhere")]) == 2
    assert "cache seed folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------- real pip


def test_pip_failure_names_package_and_remedy(cache, tmp_path):
    """Real `pip download` against an empty local wheels dir: fails fast, without network."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(AssetError) as err:
        assets._pip_download("fake-pkg", "1.0", tmp_path / "dl", tmp_path / "empty", progress=False)
    msg = str(err.value)
    assert "fake-pkg==1.0" in msg and "--find-links" in msg and assets.WHEELS_DIR_ENV in msg


def test_pip_download_from_local_wheels_dir(cache, tmp_path):
    """The air-gapped path: real pip, `--no-index --find-links DIR`."""
    (tmp_path / "wheels").mkdir()
    wheel = make_wheel(tmp_path / "wheels", "fake-pkg", "1.0", DATA_FILES)
    got = assets._pip_download("fake-pkg", "1.0", tmp_path / "dl", tmp_path / "wheels", progress=False)
    assert got.parent == tmp_path / "dl" and got.read_bytes() == wheel.read_bytes()


# ----------------------------------------------------------------------------- model assets


@pytest.fixture
def tiny_model_asset(cache, tmp_path, monkeypatch):
    """A fake model asset: a real tiny GGUF split across three fabricated wheels (like Qwen's six)."""
    gguf_file = tmp_path / "tiny.gguf"
    model, tok = write_tiny_gguf(gguf_file, tie=False)
    data = gguf_file.read_bytes()
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    index = FakeIndex(monkeypatch)
    wheels = []
    for k in (1, 2, 3):
        (tmp_path / f"w{k}").mkdir()
        member = f"tiny_part{k}/data/part{k:02d}.bin"
        index.wheels[f"tiny-part{k}"] = [make_wheel(tmp_path / f"w{k}", f"tiny-part{k}", "0.1",
                                                    {member: data[cut[k - 1]:cut[k]]})]
        wheels.append(Wheel(f"tiny-part{k}", "0.1", gguf_member=member))
    asset = Asset(name="tiny-offline", kind="model", description="tiny", provenance="fabricated test model",
                  wheels=tuple(wheels), gguf_sha256=hashlib.sha256(data).hexdigest(), gguf_size=len(data))
    monkeypatch.setitem(assets.ASSETS, asset.name, asset)
    return asset, model, tok, index


def test_model_asset_assembles_gguf_in_order_and_converts_exactly(tiny_model_asset):
    from transformers import AutoModelForCausalLM

    asset, model, _, index = tiny_model_asset
    root = ensure_asset("tiny-offline", progress=False)
    assert index.calls == ["tiny-part1", "tiny-part2", "tiny-part3"]
    config = json.loads((root / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is False
    assert (root / "tokenizer.json").is_file() and (root / "model.safetensors").is_file()
    manifest = assets.read_manifest("tiny-offline")
    assert manifest["gguf_sha256"] == asset.gguf_sha256 and manifest["lm_head_tied"] is False
    assert manifest["packages"] == ["tiny-part1==0.1", "tiny-part2==0.1", "tiny-part3==0.1"]
    assert manifest["n_params"] == sum(p.numel() for p in model.parameters())
    assert manifest["gguf_name"] == "tiny-qwen2-test" and "transformers" in manifest["converted_with"]
    converted = AutoModelForCausalLM.from_pretrained(root, use_safetensors=True).eval()
    ref = model.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in converted.state_dict().items())
    assert not (assets.cache_root() / "downloads" / "tiny-offline").exists()  # GGUF + wheels deleted


def test_model_asset_records_tied_lm_head(cache, tmp_path, monkeypatch):
    gguf_file = tmp_path / "tied.gguf"
    model, _ = write_tiny_gguf(gguf_file, tie=True)
    member = "tied/model.gguf"
    (tmp_path / "w").mkdir()
    FakeIndex(monkeypatch).wheels["tied-pkg"] = [make_wheel(tmp_path / "w", "tied-pkg", "0.1",
                                                            {member: gguf_file.read_bytes()})]
    monkeypatch.setitem(assets.ASSETS, "tied-offline", Asset(
        name="tied-offline", kind="model", description="", provenance="",
        wheels=(Wheel("tied-pkg", "0.1", gguf_member=member),), gguf_sha256=sha256(gguf_file)))
    root = ensure_asset("tied-offline", progress=False)
    assert json.loads((root / "config.json").read_text())["tie_word_embeddings"] is True
    assert assets.read_manifest("tied-offline")["lm_head_tied"] is True


def test_model_asset_with_a_corrupt_part_is_redone(tiny_model_asset, tmp_path):
    _, _, _, index = tiny_model_asset
    good = index.wheels["tiny-part2"][0]
    # A valid zip whose GGUF part has different bytes: only the assembled GGUF's sha256 can tell.
    (tmp_path / "bad2").mkdir()
    bad = make_wheel(tmp_path / "bad2", "tiny-part2", "0.1", {"tiny_part2/data/part02.bin": b"\0" * 64})
    index.wheels["tiny-part2"] = [bad, good]
    ensure_asset("tiny-offline", progress=False)
    assert index.calls.count("tiny-part2") == 2
    assert asset_status("tiny-offline", deep=True).state == "ready"


# ----------------------------------------------------------------------------- real offline model


@pytest.mark.real
def test_real_offline_qwen_fetches_loads_and_knows_paris():
    from smf_lightning.models import load_base_model

    loaded = load_base_model("qwen2.5-0.5b-offline")  # fetches + converts on a cold cache (~2 min)
    info = loaded.info
    assert info["source"] == "offline" and info["asset"] == "qwen2.5-0.5b-offline"
    assert info["n_params"] == 630_167_424 and info["lm_head_tied"] is False and info["dtype"] == "float32"
    assert info["gguf_sha256"] == assets.ASSETS["qwen2.5-0.5b-offline"].gguf_sha256
    assert (info["num_hidden_layers"], info["hidden_size"], info["vocab_size"]) == (24, 896, 151_936)
    assert not loaded.model.training
    tok = loaded.tokenizer
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = loaded.model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.input_ids.shape[1]:])


@pytest.mark.real
def test_real_ensure_asset_is_fast_when_ready(monkeypatch):
    ensure_asset("qwen2.5-0.5b-offline")
    _forbid_slow_paths(monkeypatch)
    path = ensure_asset("qwen2.5-0.5b-offline")
    assert (path / "model.safetensors").stat().st_size > 2_000_000_000


def test_the_package_ships_its_seed_cache_and_seeds_from_it_by_default(tmp_path):
    """make train seeds from the package's own seed (not from a study's folder): the offline model's
    probe and the built-in streams' 'before' points, copied into an empty cache, never over a file."""
    for kind in assets.SEEDED_CACHES:
        assert sorted((assets.SEED_CACHE / kind).glob("*.json")), kind
    copied = assets.seed_cache(root=tmp_path)
    assert {p.parent.name for p in copied} == set(assets.SEEDED_CACHES)
    assert assets.seed_cache(root=tmp_path) == []
