"""Entry point: ``python -m smf_lightning.train experiment=facts_seq_quick [overrides]``.

The command line only: Hydra composes the config (conf/), :func:`run` checks it before
anything heavy loads and hands it to the stage it names (``stage:``), one recipe module each
under stages/ (continual.py: the fact stream; heal.py: healing replace-mode memory). Data
flows one way: config → model + data → Lightning loop → evaluation → files and loggers
(docs/design.md §8). SIGTERM / SIGINT stop a run within seconds, completed results kept (interrupt.py).

Where each decision is made, one place each:
- the settings: conf/ (defaults and their comments); bad values: config.py, and each stage's
  ``check_config`` for what its loop needs (stages/continual.py: trainer, logger, callbacks groups);
- the model: models/build.py (load, retrofit, whitening, k-means keys, background statistics);
  the memory layer itself: memory/;
- the schedule (tasks, their order, batches and passes): streams/schedule.py, built by streams/datamodule.py (``data.*``);
- the selector (which slots a step may update): selection/selectors.py, applied each step by
  methods/smf.py (``method.selector``, ``method.top_t``);
- the optimizer (how the selected rows move): optim/sparse.py (SlotAdam, SlotSGD), built by
  methods/smf.py; the baselines' in methods/baselines.py;
- the loop: stages/continual.py (the Lightning Trainer, conf/trainer/), stages/heal.py;
- the evaluation: callbacks/evaluation.py decides when (before training, after every task),
  eval/ what (suites, scoring, metrics, intervals);
- the output files: callbacks/evaluation.py (summary.json, accuracy matrices, heldout.csv,
  items/; PNGs drawn by callbacks/plots.py), callbacks/slot_stats.py (slot_stats.csv), callbacks/checkpoint.py
  (checkpoints/last.ckpt), loggers.py (csv/, wandb/), callbacks/sweep.py (sweep_summary.csv),
  stages/heal.py (heal_summary.json, healed/).
- what a hyperparameter search maximises (``hparams_search=``, conf/hparams_search/): eval/objective.py.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from .config import ConfigError, validate_config
from .eval.objective import check_objective_config, optimized_value

log = logging.getLogger("smf_lightning")

STAGES = ("continual", "heal")  # stage: -> the recipe module stages/<stage>.py


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


def stage_module(cfg: DictConfig):
    """The recipe module of cfg.stage: ``check_config(cfg)`` before loading, ``run(cfg) -> summary``."""
    from .stages import continual, heal

    name = cfg.get("stage", "continual")
    if name not in STAGES:
        raise ConfigError(f"bad config: stage={name!r}; allowed: {' | '.join(STAGES)} (experiment=heal runs healing).")
    return {"continual": continual, "heal": heal}[name]


def check(cfg: DictConfig):
    """The config checks a run makes before it loads anything (values, the hyperparameter
    search's metric, the stage's trainer, logger and callback groups); returns the stage's
    module. ConfigError says what is wrong and what to do. Study drivers run it on every row
    before launching any (experiments/study.py)."""
    validate_config(cfg)
    if cfg.get("optimized_metric"):  # a hyperparameter search (hparams_search=...): its metric must exist
        check_objective_config(cfg)
    stage = stage_module(cfg)
    stage.check_config(cfg)
    return stage


def run(cfg: DictConfig) -> dict:
    """One run of the stage cfg.stage names; returns its summary (also written to the run directory)."""
    from .interrupt import RunInterrupted, log_resume_hint, stop_on_signals

    stage = check(cfg)
    try:
        with stop_on_signals():
            return stage.run(cfg)
    except RunInterrupted as e:
        out_dir = Path(cfg.paths.output_dir)
        log.warning("%s: run stopped; completed tasks' results are in %s.", e, out_dir)
        log_resume_hint(out_dir)
        raise SystemExit(e.exit_code) from None


@hydra.main(version_base="1.3", config_path=None, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    """One run; returns cfg.optimized_metric's value (what hparams_search's Optuna sweeper maximises), if set."""
    try:
        summary = run(cfg)
        value = optimized_value(summary, cfg) if cfg.get("optimized_metric") else None
    except ConfigError as e:
        log.error("%s", e)
        raise SystemExit(2) from None
    keys = ("stage", "method", "fact_recall", "fact_recall_heldout_template", "fact_recall_rephrased", "acc", "bwt",
            "forgetting", "base_ppl", "before_ppl", "after_ppl", "steps")
    log.info("summary: %s", {k: summary[k] for k in keys if summary.get(k) is not None})
    if value is not None:
        log.info("optimized_metric %s = %r", cfg.optimized_metric, value)
    return value


def main() -> None:
    # Hydra resolves config_path relative to this file; point it at the repo's conf/ instead.
    sys.argv.insert(1, f"--config-dir={conf_dir()}")
    _hydra_main()


if __name__ == "__main__":
    main()
