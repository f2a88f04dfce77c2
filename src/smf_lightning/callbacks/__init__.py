"""Lightning callbacks of a run (evaluation and output files, slot statistics, checkpoints)
and the Hydra callback that summarises a multirun sweep."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ..interrupt import SelfSignal
from .checkpoint import TaskCheckpoint
from .evaluation import ContinualEvaluation
from .slot_stats import SlotStatsLogger


def build_callbacks(cfg: DictConfig, out_dir: Path, dm, tokenizer, run_info: dict, before_cache=None):
    """(callbacks, the evaluation callback) for a run's Trainer."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    c = cfg.callbacks
    prefix_cache = c.get("eval_prefix_cache", True)
    if not isinstance(prefix_cache, bool):
        raise ValueError(f"callbacks.eval_prefix_cache={prefix_cache!r}: use true or false")
    prefix_states = None
    if prefix_cache and cfg.method.name == "smf":  # only SMF leaves everything below its memory frozen
        from ..eval.prefix_states import EvalPrefixStates

        prefix_states = EvalPrefixStates()
    evaluator = ContinualEvaluation(out_dir, dm, tokenizer, run_info, plots=bool(c.plots),
                                   suites_at=str(c.get("suites_at", "every_task")), before_cache=before_cache,
                                   resamples=int(c.intervals.resamples), interval_seed=int(c.intervals.seed),
                                   prefix_states=prefix_states)
    callbacks = [evaluator]
    if cfg.method.name == "smf" and c.slot_stats.enabled:
        callbacks.append(SlotStatsLogger(out_dir, plots=bool(c.plots)))
    if c.progress_bar == "tqdm" and cfg.trainer.enable_progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    debug = cfg.get("debug") or {}
    if debug.get("signal"):  # deterministic stand-in for an external SIGTERM / SIGINT (tests)
        callbacks.append(SelfSignal(str(debug.signal), int(debug.signal_at_step)))
    if c.checkpoint.enabled:  # last: it must see this task's evaluation results
        callbacks.append(TaskCheckpoint(out_dir / "checkpoints", stop_after_task=debug.get("stop_after_task")))
    return callbacks, evaluator


__all__ = ["ContinualEvaluation", "SlotStatsLogger", "TaskCheckpoint", "build_callbacks"]
