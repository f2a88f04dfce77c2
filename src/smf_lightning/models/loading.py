"""Load a pretrained causal LM + tokenizer, and record exactly which weights were loaded.

`load_base_model(name_or_path, source=...)` accepts
- a hub id ("Qwen/Qwen2.5-0.5B"): from the local HF cache if it is there, else from the hub;
- a local HF directory (safetensors weights);
- a .gguf file (dequantized on load by transformers; slow, prefer the offline catalogue);
- an offline catalogue name ("qwen2.5-0.5b-offline", "smollm2-135m-offline", see assets.py).

`source` decides what a hub id may resolve to:
- "auto"    hub model if cached or reachable, else its packaged offline equivalent, with a loud
            warning (the offline weights are different weights: see assets.ASSETS provenance);
- "hub"     hub only; a clear error if neither cached nor reachable;
- "offline" packaged catalogue assets only.
Local paths and GGUF files are always loaded from disk, whatever `source` says.

Safety: weights are loaded only from safetensors (`use_safetensors=True`) or GGUF, so no pickle
is ever unpickled, and `trust_remote_code` is False unless the caller asks for it.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError

from smf_lightning.assets import ASSETS, AssetError, asset_status, ensure_asset, read_manifest

log = logging.getLogger(__name__)

SOURCES = ("auto", "hub", "offline")
HUB_PROBE_TIMEOUT_S = 5.0  # a blackholed network must not stall a run for minutes
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}

# hub id -> packaged offline stand-in, derived from the catalogue (one source of truth)
OFFLINE_EQUIVALENTS = {a.hub_equivalent: a.name for a in ASSETS.values() if a.kind == "model" and a.hub_equivalent}


class ModelLoadError(RuntimeError):
    """A model could not be loaded. The message says what was wrong and what to do."""


@dataclass
class LoadedModel:
    model: torch.nn.Module  # an HF *ForCausalLM, eval mode
    tokenizer: object  # an HF tokenizer with a pad token
    info: dict = field(default_factory=dict)  # JSON-serialisable record of what was really loaded


def load_base_model(name_or_path: str, source: str = "auto", dtype="float32", gguf_file: str | None = None,
                    trust_remote_code: bool = False) -> LoadedModel:
    """Load a causal LM and its tokenizer; see the module docstring for what `name_or_path` and
    `source` accept. `dtype`: "float32" (default), "bfloat16", "float16" or a torch.dtype.
    `gguf_file`: a GGUF file name inside the local directory `name_or_path`.
    Returns a LoadedModel whose `info` says what was loaded (write it into summary.json)."""
    if source not in SOURCES:
        raise ModelLoadError(f"source={source!r} is not one of {SOURCES}")
    torch_dtype = _resolve_dtype(dtype)
    name = str(name_or_path)
    path = Path(name).expanduser()

    if name in ASSETS:
        if source == "hub":
            raise ModelLoadError(f"{name!r} is an offline catalogue asset, not a hub id; use source='offline' or 'auto'.")
        return _load_offline(name, torch_dtype, requested=name, source_requested=source)
    if gguf_file is not None or path.suffix == ".gguf":
        folder, fname = (path, gguf_file) if gguf_file is not None else (path.parent, path.name)
        return _load_gguf(folder, fname, torch_dtype, requested=name, trust_remote_code=trust_remote_code)
    if path.exists() or name.startswith((".", "/", "~")):
        return _load_local(path, torch_dtype, requested=name, trust_remote_code=trust_remote_code)
    return _load_hub_id(name, source, torch_dtype, trust_remote_code)


def locate_model(name_or_path: str, source: str = "auto") -> str:
    """Where load_base_model(name_or_path, source) would load from, found without reading any
    weights (a config check before anything heavy loads); ModelLoadError saying why it cannot.
    A hub id neither in the local cache nor with an offline equivalent costs one short probe of
    the hub."""
    if source not in SOURCES:
        raise ModelLoadError(f"source={source!r} is not one of {SOURCES}")
    name = str(name_or_path)
    path = Path(name).expanduser()
    if name in ASSETS:
        if ASSETS[name].kind != "model":
            raise ModelLoadError(f"{name!r} is a {ASSETS[name].kind} asset, not a model. "
                                 f"Offline models: {_offline_names()}.")
        return f"offline model {name}"
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist.")
        return f"GGUF file {path}"
    if path.exists() or name.startswith((".", "/", "~")):
        if not path.is_dir():
            raise ModelLoadError(f"{name!r}: no such directory. Pass an HF model directory, a .gguf file, a hub id, "
                                 f"or an offline model name ({_offline_names()}).")
        if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
            raise ModelLoadError(f"{path} is not a Hugging Face model directory with safetensors weights "
                                 "(config.json and *.safetensors, as save_pretrained writes).")
        return f"local directory {path}"
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise ModelLoadError(f"{name!r} is neither a local directory, a hub id (owner/name) nor an offline model name "
                             f"({_offline_names()}).")
    if source != "hub" and name in OFFLINE_EQUIVALENTS and (source == "offline" or _hub_cache_dir(name) is None):
        return f"offline model {OFFLINE_EQUIVALENTS[name]} (the packaged equivalent of {name})"
    if source == "offline":
        raise ModelLoadError(f"source='offline' but {name!r} has no packaged offline equivalent. "
                             f"Offline models: {_offline_names()}.")
    if _hub_cache_dir(name) is not None:
        return f"{name} from the local Hugging Face cache"
    reachable, why = _hub_reachable(name)
    if not reachable:
        raise ModelLoadError(f"{name!r} is not in the local Hugging Face cache and the hub is not reachable ({why}).")
    return f"{name} from the Hugging Face hub"


# -----------------------------------------------------------------------------
# The four ways in


def _load_hub_id(repo_id: str, source: str, dtype, trust_remote_code: bool) -> LoadedModel:
    if source == "offline":
        if repo_id in OFFLINE_EQUIVALENTS:
            return _load_offline(OFFLINE_EQUIVALENTS[repo_id], dtype, requested=repo_id, source_requested=source)
        raise ModelLoadError(f"source='offline' but {repo_id!r} has no packaged offline equivalent. "
                             f"Offline models: {_offline_names()}; hub ids with one: {sorted(OFFLINE_EQUIVALENTS)}.")

    # 1) already in the local HF cache? Resolve the snapshot folder without any network traffic
    #    (from_pretrained(local_files_only=True) still retried HEAD requests for ~20 s here).
    cached_dir = _hub_cache_dir(repo_id)
    if cached_dir is not None:
        try:
            loaded = _from_pretrained(cached_dir, dtype, trust_remote_code)
            return _finish(loaded, requested=repo_id, source="hub", path=repo_id, source_requested=source,
                           provenance=f"{repo_id} from the local Hugging Face cache ({cached_dir})")
        except (OSError, ValueError) as e:  # incomplete snapshot: try the hub next
            log.info("cached snapshot of %s is unusable (%s); trying the hub", repo_id, e)

    # 2) reachable? A short probe first, so an offline machine fails in seconds, not minutes.
    reachable, why = _hub_reachable(repo_id)
    if reachable:
        try:
            loaded = _from_pretrained(repo_id, dtype, trust_remote_code)
            return _finish(loaded, requested=repo_id, source="hub", path=repo_id, source_requested=source,
                           provenance=f"{repo_id} downloaded from the Hugging Face hub")
        except OSError as e:
            if source == "hub":
                raise ModelLoadError(f"Loading {repo_id!r} from the hub failed: {e}") from e
            why = f"download failed: {e}"

    # 3) not available: hub-only is an error, auto falls back to the packaged stand-in, loudly.
    if source == "hub":
        raise ModelLoadError(
            f"{repo_id!r} is not in the local Hugging Face cache and the hub is not reachable ({why}). "
            "Check network access to huggingface.co (or HF_ENDPOINT), or use source='auto'/'offline' "
            f"for the packaged stand-in{' ' + OFFLINE_EQUIVALENTS[repo_id] if repo_id in OFFLINE_EQUIVALENTS else ''}."
        )
    if repo_id not in OFFLINE_EQUIVALENTS:
        raise ModelLoadError(
            f"{repo_id!r}: not a local path, not in the HF cache, the hub is not reachable ({why}), and it has "
            f"no packaged offline equivalent. Offline models: {_offline_names()} (equivalents of "
            f"{sorted(OFFLINE_EQUIVALENTS)})."
        )
    asset = ASSETS[OFFLINE_EQUIVALENTS[repo_id]]
    msg = (f"{repo_id!r} is not cached and the Hugging Face hub is not reachable ({why}). FALLING BACK to the "
           f"packaged offline model {asset.name!r}: {asset.provenance} The run records this in its summary.")
    warnings.warn(msg, UserWarning, stacklevel=3)
    log.warning(msg)
    loaded = _load_offline(asset.name, dtype, requested=repo_id, source_requested=source)
    loaded.info["fallback_reason"] = why
    return loaded


def _load_offline(asset_name: str, dtype, requested: str, source_requested: str) -> LoadedModel:
    asset = ASSETS[asset_name]
    if asset.kind != "model":
        raise ModelLoadError(f"{asset_name!r} is a {asset.kind} asset, not a model. Offline models: {_offline_names()}.")
    folder = ensure_asset(asset_name)  # fetches and converts on first use; fast check otherwise
    try:
        loaded = _from_pretrained(folder, dtype, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        # The fast check (sizes) passed, so the bytes themselves must be bad.
        deep = asset_status(asset_name, deep=True)
        raise AssetError(
            f"The cached asset {asset_name!r} at {folder} failed to load ({e.__class__.__name__}: {e}); "
            f"checksum check: {deep.state} {deep.reason}. Rebuild it with "
            f"`python -m smf_lightning.assets fetch {asset_name} --force`."
        ) from e
    manifest = read_manifest(asset_name)
    result = _finish(loaded, requested=requested, source="offline", path=str(folder),
                     source_requested=source_requested, provenance=asset.provenance)
    result.info.update(asset=asset_name, hub_equivalent=asset.hub_equivalent, packages=manifest.get("packages"),
                       gguf_sha256=manifest.get("gguf_sha256"), gguf_name=manifest.get("gguf_name"))
    return result


def _load_local(path: Path, dtype, requested: str, trust_remote_code: bool) -> LoadedModel:
    if not path.is_dir():
        raise ModelLoadError(f"{requested!r}: no such directory. Pass an HF model directory, a .gguf file, a hub id, "
                             f"or an offline model name ({_offline_names()}).")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json, so it is not a Hugging Face model directory.")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        raise ModelLoadError(
            f"{path} has no *.safetensors weights" + (f" (only {pickles}: pickle files, which are never "
            "loaded because unpickling can run arbitrary code)" if pickles else "") +
            ". Convert it once on a trusted machine: `AutoModelForCausalLM.from_pretrained(dir)"
            ".save_pretrained(out, safe_serialization=True)`."
        )
    loaded = _from_pretrained(path, dtype, trust_remote_code)
    return _finish(loaded, requested=requested, source="local", path=str(path.resolve()), source_requested=None,
                   provenance=f"local directory {path.resolve()}")


def _load_gguf(folder: Path, fname: str, dtype, requested: str, trust_remote_code: bool) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file = folder / fname
    if not file.is_file():
        raise ModelLoadError(f"GGUF file {file} does not exist.")
    warnings.warn(f"Loading {file} dequantizes it on every load (about a minute for 0.5B parameters). "
                  "For repeated use, convert it once (see smf_lightning.assets).", UserWarning, stacklevel=3)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=dtype,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{file} could not be loaded as a GGUF model ({e.__class__.__name__}: {e}). "
                             "Is it a complete GGUF of an architecture transformers supports?") from e
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # weights are dequantized; the stale entry confuses save/PEFT
    return _finish((model, tokenizer), requested=requested, source="gguf", path=str(file.resolve()),
                   source_requested=None,
                   provenance=f"GGUF file {file.resolve()}, dequantized to {str(dtype).removeprefix('torch.')}")


# -----------------------------------------------------------------------------
# Helpers


def _from_pretrained(where, dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    return model, tokenizer


def _finish(loaded, requested: str, source: str, path: str, source_requested, provenance: str) -> LoadedModel:
    """Common last steps: eval mode, a pad token, and the record of what was loaded."""
    model, tokenizer = loaded
    model.eval()  # dropout off: evaluation and SMF's frozen base expect deterministic forwards
    if tokenizer.pad_token is None:
        # Batched training/eval pads; causal LMs often ship without a pad token. EOS is the usual
        # stand-in: padded positions are masked by attention_mask and excluded from the loss anyway.
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"{requested!r}: the tokenizer has neither a pad nor an eos token; set one explicitly.")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    info = {
        "requested": requested,
        "source_requested": source_requested,
        "source": source,  # hub | local | gguf | offline
        "path": path,
        "asset": None,
        "provenance": provenance,
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "n_params": sum(p.numel() for p in model.parameters()),  # tied weights counted once
        "lm_head_tied": out_emb is not None and out_emb.weight.data_ptr() == in_emb.weight.data_ptr(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "num_hidden_layers": getattr(model.config, "num_hidden_layers", None),
        "hidden_size": getattr(model.config, "hidden_size", None),
        "vocab_size": getattr(model.config, "vocab_size", None),
        "pad_token": tokenizer.pad_token,
    }
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


def _hub_cache_dir(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), or an invalid repo id: both mean "not here"
        return None


def _hub_reachable(repo_id: str) -> tuple[bool, str]:
    """(True, "") if the hub answers for repo_id within HUB_PROBE_TIMEOUT_S, else (False, why).
    A repo that does not exist or is gated is an error, not a reason to fall back silently."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(repo_id, timeout=HUB_PROBE_TIMEOUT_S)
        return True, ""
    except GatedRepoError as e:
        raise ModelLoadError(f"{repo_id!r} is gated on the hub: accept its license and log in (`hf auth login`).") from e
    except RepositoryNotFoundError as e:
        raise ModelLoadError(f"{repo_id!r} does not exist on the hub (or is private). Check the id.") from e
    except Exception as e:  # DNS failure, timeout, proxy error, HF_HUB_OFFLINE=1, ...
        return False, f"{e.__class__.__name__}: {str(e)[:200]}"


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in _DTYPES:
        raise ModelLoadError(f"dtype={dtype!r} is not supported; use one of {sorted(_DTYPES)}.")
    return _DTYPES[str(dtype)]


def _offline_names() -> list[str]:
    return sorted(n for n, a in ASSETS.items() if a.kind == "model")
