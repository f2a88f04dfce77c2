"""Open what a run produced as a model to use: its run directory or an export of it.

A run directory (``.hydra/config.yaml``, ``checkpoints/last.ckpt``) holds the composed config and
the trainable weights only, so the model is rebuilt the way the run built it (models/build.py:
load, retrofit, whitening and k-means keys from the background corpus — cached, so nothing is
fitted again), then the checkpoint's value rows, write keys and fact ledger go in. An export
(product/exports.py) loads on its own. Either way: the model in eval mode, its tokenizer, the
run's config (templates for ``ask``) and the fact ledger (memory/ledger.py).

Bad input is a ConfigError with one line saying what is wrong and what to do (the commands
print it and exit 2, as ``smf_lightning.train`` does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError
from ..memory import memory_layers
from ..memory.ledger import FactLedger
from . import base_model
from .exports import is_export, read_export

RUN_CONFIG = Path(".hydra") / "config.yaml"
RUN_CHECKPOINT = Path("checkpoints") / "last.ckpt"


@dataclass
class Opened:
    """A run directory or an export, opened."""

    model: torch.nn.Module  # eval mode
    tokenizer: object
    config: DictConfig | None  # the run's composed config (None: an export without one)
    ledger: FactLedger
    kind: str  # "run" | "full" | "delta"
    path: Path
    base: dict | None = None  # the starting model's identity and fingerprint (product/base_model.py)
    datamodule: object = None  # a run's FactStreamDataModule (its stream, suites and templates)
    meta: dict | None = None  # an export's export.json


def is_run_dir(path: Path) -> bool:
    return (path / RUN_CONFIG).is_file()


def load_run(run_dir: str | Path) -> Opened:
    """A run directory's model as it was after its last completed task, with its data module."""
    from ..models import build as M
    from ..stages.continual import build_datamodule

    run_dir = Path(run_dir).expanduser()
    if not run_dir.exists():
        raise ConfigError(f"{run_dir} does not exist.")
    if not is_run_dir(run_dir):
        raise ConfigError(f"{run_dir} is not a run directory: it has no {RUN_CONFIG}.")
    ckpt_file = run_dir / RUN_CHECKPOINT
    if not ckpt_file.is_file():
        raise ConfigError(f"{run_dir} has no {RUN_CHECKPOINT}: the run stopped before its first task ended. "
                          f"Resume it (ckpt_path) or train again.")
    try:
        cfg = OmegaConf.load(run_dir / RUN_CONFIG)
        if not isinstance(cfg, DictConfig) or "model" not in cfg:
            raise ValueError("not a run's composed config (no `model` key)")
    except Exception as e:  # a YAML error, or not a config at all
        raise ConfigError(f"cannot read {run_dir / RUN_CONFIG}: {e}") from None
    try:
        # weights_only: tensors and plain containers; nothing is unpickled
        ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise ConfigError(f"cannot read {ckpt_file}: {e}") from None
    model, tok, info = M.load_model(cfg)
    base = dict(base_model.identity(cfg), fingerprint=base_model.fingerprint(model))
    dm = build_datamodule(cfg, model, tok)
    model = M.maybe_retrofit(cfg, model, info)
    M.prepare_memory(cfg, model, info, dm)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    foreign = set(state) - set(model.state_dict())
    if foreign:
        raise ConfigError(f"{ckpt_file} holds tensors the rebuilt model lacks ({sorted(foreign)[:3]}): only runs of "
                          f"methods that train the model's own weights (smf, full_ft) can be opened.")
    model.load_state_dict(state, strict=False)
    mems = memory_layers(model)
    for i, (rows, keys, mass) in ckpt.get("write_keys", {}).items():
        mems[int(i)].clear_writes()
        mems[int(i)].add_writes(rows, keys, mass)
    ledger = FactLedger.from_state_dict(ckpt["fact_ledger"]) if "fact_ledger" in ckpt else FactLedger()
    base["loaded"] = {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool)) or v is None}
    return Opened(model.eval(), tok, cfg, ledger, "run", run_dir, base=base, datamodule=dm)


def open_model(path: str | Path, base: str | Path | None = None) -> Opened:
    """A run directory or an export (full, or a delta applied to its base: ``base`` overrides
    where that comes from), ready to use."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"{path} does not exist.")
    if is_run_dir(path):
        return load_run(path)
    if is_export(path):
        e = read_export(path, base)
        return Opened(e.model, e.tokenizer, e.config, e.ledger, e.meta.get("kind", "full"), path,
                      base=e.meta.get("base"), meta=e.meta)
    raise ConfigError(f"{path} is neither a run directory ({RUN_CONFIG}, {RUN_CHECKPOINT}) nor an export "
                      f"(export.json, written by python -m smf_lightning.export).")
