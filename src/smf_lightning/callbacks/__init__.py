"""Lightning callbacks of a run (evaluation and output files, slot statistics, checkpoints)
and the Hydra callback that summarises a multirun sweep."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from .evaluation import ContinualEvaluation
from .slot_stats import SlotStatsLogger


def build_callbacks(cfg: DictConfig, out_dir: Path, dm, tokenizer, run_info: dict):
    """(callbacks, the evaluation callback) for a run's Trainer."""
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

    c = cfg.callbacks
    evaluator = ContinualEvaluation(out_dir, dm, tokenizer, run_info, plots=bool(c.plots))
    callbacks = [evaluator]
    if cfg.method.name == "smf" and c.slot_stats.enabled:
        callbacks.append(SlotStatsLogger(out_dir, plots=bool(c.plots)))
    if c.checkpoint.enabled:
        # last.ckpt after every task (trainable weights + optimizer + callback state): the
        # resume point of an interrupted run; completed tasks are never redone.
        callbacks.append(ModelCheckpoint(dirpath=out_dir / "checkpoints", save_last=True, save_top_k=0,
                                         every_n_epochs=1, save_on_train_epoch_end=True))
    if c.progress_bar == "tqdm" and cfg.trainer.enable_progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    return callbacks, evaluator


__all__ = ["ContinualEvaluation", "SlotStatsLogger", "build_callbacks"]
