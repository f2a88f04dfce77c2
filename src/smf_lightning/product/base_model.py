"""The starting model of a run, the one a delta export is relative to: how to build it again
(its identity) and how to tell that what was built is the same model (its fingerprint).

The identity is what ``cfg.model`` said (name, source, dtype, init checkpoint) and the run's seed
(the tiny test model is seeded); ``build_start`` loads it again through models/build.py, the
loader every run uses, optionally from another place (``base=``: a hub id, a local directory,
an offline catalogue name or a full export).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError
from ..memory import MemoryConfig, memory_layers, retrofit
from ..memory.fingerprint import tensor_digest
from ..memory.retrofit import RETROFIT_FILE


def identity(cfg: DictConfig) -> dict:
    """How to build the run's starting model again (plain JSON)."""
    m = cfg.model
    init = m.get("init_checkpoint")
    return {"name": str(m.name), "source": str(m.source), "dtype": str(m.dtype),
            "init_checkpoint": str(Path(init).resolve()) if init else None, "seed": int(cfg.seed)}


def fingerprint(model) -> str:
    """What a delta is checked against before it is applied: eval/probe.py's model_fingerprint (the
    model's class, its config without the keys that say where and how it was loaded, a strided
    sample of every tensor) and every byte of the memory layers of a retrofitted base (an export
    continued from: training changes a few rows a sample would miss). memory/fingerprint.py's
    fingerprint_model keys caches and hashes the config's path, so the same weights loaded from
    another folder or machine would be refused."""
    from ..eval.probe import model_fingerprint

    h = hashlib.sha256(model_fingerprint(model).encode())
    for i, mem in memory_layers(model).items():
        for name, t in mem.state_dict().items():
            h.update(f"memory layer {i} {name}".encode())
            tensor_digest(h, t)
    return h.hexdigest()


def _start_config(ident: dict, base: str | Path | None) -> DictConfig:
    model = {k: ident.get(k) for k in ("name", "source", "dtype", "init_checkpoint")}
    if base is not None:
        path = Path(base).expanduser()
        if (path / RETROFIT_FILE).is_file():  # a full export or a healed model
            model["init_checkpoint"] = str(path)
        else:
            model.update(name=str(base), init_checkpoint=None)
            # the tiny test model by its name; anything else through models/loading.py
            model["source"] = "tiny" if str(base) == "tiny" else ("auto" if model["source"] == "tiny" else model["source"])
    return OmegaConf.create({"model": model, "seed": ident.get("seed", 0)})


def build_start(ident: dict, memory: dict, expected: str | None = None, base: str | Path | None = None):
    """(retrofitted starting model, tokenizer): the base of ``ident`` (or ``base``) loaded again,
    checked against the fingerprint ``expected`` (ConfigError naming both when it differs) and
    given memory layers of ``memory`` (a MemoryConfig dict) unless it has them already."""
    from ..models.build import load_model
    from ..models.loading import ModelLoadError

    cfg = _start_config(ident, base)
    where = base if base is not None else (ident.get("init_checkpoint") or ident.get("name"))
    try:
        model, tokenizer, _ = load_model(cfg)
    except (ModelLoadError, OSError, ValueError) as e:
        raise ConfigError(f"cannot load the base model {str(where)!r}: {e}") from None
    if expected is not None:
        found = fingerprint(model)
        if found != expected:
            recorded = ident.get("init_checkpoint") or f"{ident.get('name')} (source {ident.get('source')})"
            raise ConfigError(f"the base model {str(where)!r} is not the one this delta was trained from "
                              f"(fingerprint {found[:12]}, expected {expected[:12]}): pass base= the model it "
                              f"records, {recorded}, or use a full export.")
    if not memory_layers(model):
        retrofit(model, MemoryConfig(**memory))
    return model.eval(), tokenizer
