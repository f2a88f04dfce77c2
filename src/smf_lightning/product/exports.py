"""Exports of an updated model: what ``python -m smf_lightning.export`` writes and
``smf_lightning.load`` reads (docs/usage.md, "Using the updated model").

An export directory holds, in safetensors and JSON only (no pickle is ever loaded, no
trust_remote_code):

- ``export.json``: the kind (``full`` or ``delta``), where it came from, the starting model's
  identity and fingerprint (product/base_model.py), the memory config, the number of facts;
- a **full** export: ``model.safetensors``, ``retrofit.json`` and ``config.json`` of
  memory/retrofit.py's ``save_retrofitted`` (every weight and buffer: values, write keys,
  whitening), loadable on its own and as ``model.init_checkpoint`` (a continued run);
- a **delta**: ``delta.safetensors``, only what the stream changed against its starting model:
  the value rows that differ from it (ids and rows), the write keys of every written row, and
  the memory layers' other tensors in full (sub-keys, query, whitening: small); applied to the
  starting model built again, after its fingerprint is checked;
- both: the tokenizer, ``ledger.json`` and ``ledger_pre.safetensors`` (memory/ledger.py) and
  ``run_config.yaml`` (the run's composed config: the templates ``ask`` uses).

A directory written by ``save_retrofitted`` alone (a healed model) opens as a full export
without facts or templates.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError
from ..memory import memory_layers, save_retrofitted
from ..memory.ledger import FactLedger
from ..memory.retrofit import RETROFIT_FILE, WEIGHTS_FILE
from .base_model import build_start

EXPORT_FILE = "export.json"
DELTA_FILE = "delta.safetensors"
RUN_CONFIG_FILE = "run_config.yaml"
FORMAT = 1
# a memory layer's per-row tensors: a delta stores the rows that changed, not the tables
ROW_STATE = ("values.weight", "write_keys", "write_mass")


@dataclass
class Export:
    """An export read back: the model (eval mode) and what came with it."""

    model: torch.nn.Module
    tokenizer: object
    ledger: FactLedger
    config: DictConfig | None  # the run's composed config (None for a bare save_retrofitted directory)
    meta: dict = field(default_factory=dict)  # export.json


def is_export(path: Path) -> bool:
    return (path / EXPORT_FILE).is_file() or (path / RETROFIT_FILE).is_file()


def check_new_dir(out: Path, source: Path | None = None) -> None:
    """An output directory must be new or empty, and not what it is made from."""
    if source is not None and out.resolve() == Path(source).resolve():
        raise ConfigError(f"the output {out} is the input itself; it is never modified: give another directory.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty directory; give a new one (nothing is overwritten).")


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's weights and buffers as a full export stores them (tied tensors once)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


# ---- the delta ------------------------------------------------------------------------------
@torch.no_grad()
def delta_tensors(model, start) -> dict[str, torch.Tensor]:
    """What ``model`` changed against ``start`` (the same starting model, memory retrofitted):
    per memory layer ``i``, ``i/values.rows`` and ``i/values`` (the rows that differ), with a read
    gate ``i/write_keys.rows``, ``i/write_keys``, ``i/write_mass`` (every written row), and every
    other memory tensor ``i/<name>`` in full."""
    mems, starts = memory_layers(model), memory_layers(start)
    if set(mems) != set(starts):
        raise ConfigError(f"the starting model's memory layers {sorted(starts)} are not the run's {sorted(mems)}")
    out = {}
    for i, mem in mems.items():
        values, before = mem.values.weight.detach(), starts[i].values.weight.detach()
        rows = torch.nonzero((values != before).any(1)).squeeze(1)
        out[f"{i}/values.rows"], out[f"{i}/values"] = rows, values[rows]
        if mem.cfg.read_gate is not None:
            written = mem.written_rows()
            out[f"{i}/write_keys.rows"] = written
            out[f"{i}/write_keys"], out[f"{i}/write_mass"] = mem.write_keys[written], mem.write_mass[written]
        for name, t in mem.state_dict().items():
            if name not in ROW_STATE:
                out[f"{i}/{name}"] = t
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


@torch.no_grad()
def apply_delta(model, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``delta_tensors``' output into the starting model (in place)."""
    mems = memory_layers(model)
    layers = {int(k.split("/", 1)[0]) for k in tensors}
    if layers != set(mems):
        raise ConfigError(f"the delta is for memory layers {sorted(layers)}, the base model has {sorted(mems)}")
    for i, mem in mems.items():
        other = {name: tensors[f"{i}/{name}"] for name in mem.state_dict() if name not in ROW_STATE}
        mem.load_state_dict(other, strict=False)
        table = mem.values.weight
        rows = tensors[f"{i}/values.rows"].to(table.device)
        table[rows] = tensors[f"{i}/values"].to(table.device, table.dtype)
        if mem.cfg.read_gate is not None:
            mem.clear_writes()
            written = tensors[f"{i}/write_keys.rows"].to(mem.write_keys.device)
            mem.write_keys[written] = tensors[f"{i}/write_keys"].to(mem.write_keys.device)
            mem.write_mass[written] = tensors[f"{i}/write_mass"].to(mem.write_mass.device)


# ---- writing --------------------------------------------------------------------------------
def write_export(out: Path, model, tokenizer, ledger: FactLedger, config: DictConfig | None, base: dict,
                 source: str, start=None) -> dict:
    """Write an export of ``model`` to the new directory ``out``: full, or a delta against
    ``start`` (its starting model, retrofitted) when given. ``base``: the starting model's
    identity and fingerprint. Written beside ``out`` and renamed into place, so a failure leaves
    nothing behind. Returns export.json's content with the sizes."""
    from safetensors.torch import save_file

    out = Path(out)
    check_new_dir(out)
    if not memory_layers(model):
        raise ConfigError(f"{source}: the model has no memory layers; only a memory method's run (method=smf) is exported.")
    full_bytes = tensor_bytes(model)
    meta = {"format": FORMAT, "kind": "full" if start is None else "delta", "exported_from": str(source),
            "base": base, "memory": model.memory_config.to_dict(), "facts": len(ledger.facts),
            "full_bytes": full_bytes}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        if start is None:
            save_retrofitted(model, tmp, tokenizer, base_info=base)
            meta["bytes"] = (tmp / WEIGHTS_FILE).stat().st_size
        else:
            tensors = delta_tensors(model, start)
            save_file(tensors, str(tmp / DELTA_FILE))
            model.config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            meta["bytes"] = (tmp / DELTA_FILE).stat().st_size
            meta["delta_rows"] = {str(i): int(tensors[f"{i}/values.rows"].numel()) for i in memory_layers(model)}
        ledger.write(tmp)
        if config is not None:
            (tmp / RUN_CONFIG_FILE).write_text(OmegaConf.to_yaml(config))
        (tmp / EXPORT_FILE).write_text(json.dumps(meta, indent=2))
        if out.exists():
            out.rmdir()  # empty (check_new_dir)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


# ---- reading --------------------------------------------------------------------------------
def _meta(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"{path} does not exist.")
    if not is_export(path):
        raise ConfigError(f"{path} is not an export: it has no {EXPORT_FILE} (written by python -m smf_lightning.export) "
                          f"and no {RETROFIT_FILE}.")
    if not (path / EXPORT_FILE).is_file():  # save_retrofitted alone
        return {"kind": "full"}
    try:
        return json.loads((path / EXPORT_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path / EXPORT_FILE}: {e}") from None


def load(path: str | Path, base: str | Path | None = None) -> torch.nn.Module:
    """The updated model of an export, a transformers PreTrainedModel in eval mode whose memory
    layers are the package's own (memory/retrofit.py). A delta is applied to its starting model,
    built again from what it records or from ``base`` (a hub id, local directory, offline
    catalogue name or full export), refused if that model's fingerprint differs."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..memory import load_retrofitted

    path = Path(path).expanduser()
    meta = _meta(path)
    dtype = getattr(torch, (meta.get("base") or {}).get("dtype") or "float32")
    try:
        if meta.get("kind") == "delta":
            model, _ = build_start(meta["base"], meta["memory"], expected=meta["base"]["fingerprint"], base=base)
            apply_delta(model, load_file(str(path / DELTA_FILE)))
            return model.eval()
        return load_retrofitted(path, dtype=dtype)
    except (OSError, KeyError, SafetensorError) as e:
        raise ConfigError(f"cannot load the export {path}: {e}") from None


def read_export(path: str | Path, base: str | Path | None = None) -> Export:
    """An export with everything that came with it (the ledger, the run's config)."""
    from transformers import AutoTokenizer

    path = Path(path).expanduser()
    model = load(path, base)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = OmegaConf.load(path / RUN_CONFIG_FILE) if (path / RUN_CONFIG_FILE).is_file() else None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the export {path}: {e}") from None
    return Export(model, tokenizer, FactLedger.read(path) or FactLedger(), config, _meta(path))
