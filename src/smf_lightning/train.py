"""Entry point: ``python -m smf_lightning.train experiment=facts_seq_quick [overrides]``.

Data flows one way: config → (validate) → model + data → Lightning loop over the task
sequence → evaluation → files in the run directory and loggers (design.md §8).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError, validate_config

log = logging.getLogger("smf_lightning")


def conf_dir() -> str:
    """conf/ at the repository root (editable install), or $SMF_CONF_DIR."""
    env = os.environ.get("SMF_CONF_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "conf"
    if not (path / "train.yaml").is_file():
        raise SystemExit(
            f"cannot find the Hydra configs (train.yaml) in {path}. Install the package from its "
            f"repository with `pip install -e .` or point SMF_CONF_DIR at the repo's conf/ folder."
        )
    return str(path)


def load_model(cfg: DictConfig):
    """(model, tokenizer, info) for cfg.model: the run's starting model, not yet retrofitted."""
    import torch

    from .memory import load_retrofitted

    mcfg = cfg.model
    dtype = getattr(torch, mcfg.dtype)
    if mcfg.get("init_checkpoint"):
        from transformers import AutoTokenizer

        path = Path(mcfg.init_checkpoint)
        model = load_retrofitted(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        info = dict(model.retrofit_meta.get("base", {}), init_checkpoint=str(path))
    elif mcfg.source == "tiny":
        from .models.tiny import tiny_qwen2, tiny_tokenizer

        model, tokenizer = tiny_qwen2(seed=int(cfg.seed)), tiny_tokenizer()
        info = {"name": "tiny", "source": "tiny", "note": "randomly initialised test model"}
    else:
        from .models.loading import load_base_model

        loaded = load_base_model(mcfg.name, source=mcfg.source, dtype=mcfg.dtype)
        model, tokenizer, info = loaded.model, loaded.tokenizer, dict(loaded.info)
    return model, tokenizer, info


def maybe_retrofit(cfg: DictConfig, model, info: dict):
    """Add memory layers when the method needs them (and the model has none yet)."""
    from .memory import MemoryConfig, memory_layers, param_counts, retrofit

    if cfg.method.get("retrofit") and not memory_layers(model):
        retrofit(model, MemoryConfig(**OmegaConf.to_container(cfg.model.memory, resolve=True)))
    info["param_counts"] = param_counts(model)
    if memory_layers(model):
        info["memory"] = model.memory_config.to_dict()
    return model


def build_datamodule(cfg: DictConfig, model, tokenizer):
    """The fact stream; probing for unknown facts runs on the starting model (before retrofit)."""
    from hydra.utils import instantiate

    from .data.datamodule import FactStreamDataModule

    dm = instantiate(cfg.data, tokenizer=tokenizer, probe_model=model, _convert_="all")
    if not isinstance(dm, FactStreamDataModule):
        raise ConfigError(f"data._target_ must be a FactStreamDataModule, got {type(dm).__name__}")
    dm.setup()
    return dm


def input_whitening(cfg: DictConfig, model, dm) -> dict:
    """Fit (or load from $SMF_CACHE/whitening) the memory input statistics on the background corpus."""
    from .memory.whitening import load_or_fit_input_whitening

    return load_or_fit_input_whitening(
        model, lambda: dm.background_batches(sort_by_length=True), Path(cfg.paths.cache_dir) / "whitening",
        {"corpus": dm.background_key(), "batch_size": dm.background_batch_size, "data_source": dm.source},
        loss_tokens_only=cfg.model.memory.get("whiten_on", "all") == "loss",
        progress=bool(cfg.trainer.enable_progress_bar),
    )


def background_stats(cfg: DictConfig, model, dm) -> dict:
    """Per-layer background slot statistics (design.md §3), cached under $SMF_CACHE/background."""
    from .selection.background import load_or_compute_background_stats

    key = {"corpus": dm.background_key(), "batch_size": dm.background_batch_size, "data_source": dm.source,
           "batching": "length-sorted"}
    return load_or_compute_background_stats(
        model,
        lambda: dm.background_batches(sort_by_length=True),
        Path(cfg.paths.cache_dir) / "background",
        key,
        loss_tokens_only=bool(cfg.method.get("loss_tokens_only", True)),
        progress=bool(cfg.trainer.enable_progress_bar),
    )


def build_method(cfg: DictConfig, model, background=None):
    from .methods import build_method as _build

    return _build(OmegaConf.to_container(cfg.method, resolve=True), model, background=background, seed=int(cfg.seed))


def run_summary_info(cfg: DictConfig, model_info: dict, module) -> dict:
    """The settings half of summary.json (the results half comes from evaluation)."""
    m = cfg.method
    return {
        "method": m.name,
        "selector": m.get("selector"),
        "top_t": m.get("top_t"),
        "lr": float(m.lr),
        "optimizer": m.get("optimizer"),
        "model": model_info,
        "method_config": OmegaConf.to_container(m, resolve=True),
        "seed": int(cfg.seed),
    }


def run(cfg: DictConfig) -> dict:
    """One run (the fact stream, or healing); returns the summary (also written to summary.json).
    SIGTERM / SIGINT stop it within seconds with completed results kept (interrupt.py)."""
    from .interrupt import RunInterrupted, stop_on_signals

    validate_config(cfg)
    try:
        with stop_on_signals():
            return _run(cfg)
    except RunInterrupted as e:
        out_dir = Path(cfg.paths.output_dir)
        log.warning("%s: run stopped; completed tasks' results are in %s.", e, out_dir)
        _log_resume_hint(out_dir)
        raise SystemExit(e.exit_code) from None


def _log_resume_hint(out_dir: Path) -> None:
    """The exact command that continues this run from its last completed task."""
    import shlex

    ckpt = out_dir / "checkpoints" / "last.ckpt"
    if not ckpt.exists():
        log.warning("no task was completed (no %s): rerun the same command to start again.", ckpt)
        return
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("ckpt_path=", "debug."))]
    except ValueError:  # not under Hydra (run() called directly)
        overrides = []
    cmd = ["python", "-m", "smf_lightning.train", *overrides, f"ckpt_path={ckpt}"]
    log.warning("resume with:\n  %s", " ".join(shlex.quote(c) for c in cmd))


def _run(cfg: DictConfig) -> dict:
    import lightning as L
    import torch

    from .callbacks import build_callbacks
    from .loggers import build_loggers, close_loggers

    if cfg.get("stage", "continual") == "heal":  # the seed paper's recovery stage (replace mode)
        from .heal import run_healing

        return run_healing(cfg)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.trainer.get("threads"):
        torch.set_num_threads(int(cfg.trainer.threads))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    log.info("loading model %s (source=%s)", cfg.model.name, cfg.model.source)
    model, tokenizer, model_info = load_model(cfg)
    dm = build_datamodule(cfg, model, tokenizer)
    before_cache = None
    if cfg.callbacks.get("cache_before_eval", True):
        from .eval.before_cache import BeforeEvalCache, before_eval_key, starts_from_base

        if starts_from_base(cfg):
            from .data.facts import model_fingerprint

            base_fp = dm.model_fingerprint or model_fingerprint(model)  # of the base model, before any retrofit
            before_cache = BeforeEvalCache(Path(cfg.paths.cache_dir) / "before_eval", before_eval_key(cfg, dm, base_fp))
    model = maybe_retrofit(cfg, model, model_info)
    log.info("parameters: %s", model_info["param_counts"])
    if cfg.method.get("retrofit") and cfg.model.memory.get("input_norm", "none") != "none" and not cfg.model.get("init_checkpoint"):
        model_info["input_whitening"] = input_whitening(cfg, model, dm)
    if cfg.method.get("retrofit") and cfg.model.memory.get("key_init", "random") == "kmeans" and not cfg.model.get("init_checkpoint"):
        from .memory.key_init import init_keys_kmeans

        model_info["key_init"] = init_keys_kmeans(
            model, dm.background_batches(), seed=int(cfg.model.memory.seed), progress=bool(cfg.trainer.enable_progress_bar)
        )

    background = background_stats(cfg, model, dm) if cfg.method.name == "smf" else None
    module = build_method(cfg, model, background=background)
    run_info = run_summary_info(cfg, model_info, module)
    loggers = build_loggers(cfg, out_dir)
    callbacks, evaluator = build_callbacks(cfg, out_dir, dm, tokenizer, run_info, before_cache=before_cache)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_drop_litlogger_tip)
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        precision=cfg.trainer.precision,
        max_epochs=dm.n_tasks,  # one Trainer epoch = one task of the stream
        reload_dataloaders_every_n_epochs=1,  # each epoch serves the next task's batches
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=int(cfg.trainer.log_every_n_steps),
        enable_progress_bar=bool(cfg.trainer.enable_progress_bar),
        enable_checkpointing=False,  # our TaskCheckpoint writes last.ckpt after each task
        enable_model_summary=False,
        logger=loggers or False,
        callbacks=callbacks,
        default_root_dir=str(out_dir),
    )
    # Train mode before fit (Lightning warns about modules left in eval mode); every evaluation
    # switches to eval mode and back (eval/scoring.py), so this changes no forward.
    module.model.train()
    try:
        # weights_only: a checkpoint holds tensors and plain containers only; nothing is unpickled
        trainer.fit(module, datamodule=dm, ckpt_path=cfg.ckpt_path, weights_only=True)
    finally:
        close_loggers(loggers)
    if trainer.interrupted or not evaluator.finished:
        log.warning("run interrupted before the last task finished; completed tasks' results are in %s.", out_dir)
        _log_resume_hint(out_dir)
        raise SystemExit(130)
    return evaluator.summary


def _drop_litlogger_tip(record: logging.LogRecord) -> bool:
    """Lightning advertises its cloud logger on every Trainer start; the run log does not need it."""
    return "litlogger" not in record.getMessage()


@hydra.main(version_base="1.3", config_path=None, config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        summary = run(cfg)
    except ConfigError as e:
        log.error("%s", e)
        raise SystemExit(2) from None
    keys = ("stage", "method", "fact_recall", "acc", "bwt", "forgetting", "base_ppl", "before_ppl", "after_ppl", "steps")
    log.info("summary: %s", {k: summary[k] for k in keys if k in summary})


def main() -> None:
    # Hydra resolves config_path relative to this file; point it at the repo's conf/ instead.
    sys.argv.insert(1, f"--config-dir={conf_dir()}")
    _hydra_main()


if __name__ == "__main__":
    main()
