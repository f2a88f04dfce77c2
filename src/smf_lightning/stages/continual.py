"""The continual-learning stage (``stage: continual``, the default): a stream of fact tasks
through one Lightning Trainer, one Trainer epoch per task, evaluated before training and after
every task.

    python -m smf_lightning.train experiment=facts_seq_quick

One recipe, three steps (cf. torchtune's recipes):
1. setup: the model (models/build.py: load, probe the stream on the base model, retrofit,
   whitening / k-means keys, SMF's background statistics), the method module (methods/), the
   loggers (conf/logger/, loggers.py), the callbacks (conf/callbacks/, callbacks/) and the
   Trainer (conf/trainer/);
2. run: ``trainer.fit`` over the stream; the method decides what each step trains (methods/smf.py:
   the slot selector of selection/ and the sparse optimizer of optim/), the data module the
   schedule of tasks and batches (streams/datamodule.py);
3. save: the evaluation callback has written every output file after each point
   (callbacks/evaluation.py) and the checkpoint callback ``last.ckpt`` after each task, so a
   stopped run keeps its completed tasks; here the loggers close and the summary comes back.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..config import ConfigError
from ..methods import method_class
from ..models.build import background_stats, load_model, maybe_retrofit, prepare_memory, skip_frequent_tokens
from . import start_run

log = logging.getLogger("smf_lightning")

# Trainer arguments the stage sets itself, and why (what to use instead)
STAGE_TRAINER_ARGS = {
    "max_epochs": "one Trainer epoch is one task: the stage sets max_epochs to the stream's tasks "
                  "(data.n_tasks; data.epochs_per_task sets passes over a task)",
    "min_epochs": "one Trainer epoch is one task: the stream's tasks set the epochs (data.n_tasks)",
    "reload_dataloaders_every_n_epochs": "every epoch serves the next task's batches, so the stage reloads them each epoch",
    "logger": "loggers come from the logger group: +logger.NAME._target_=... (conf/logger/)",
    "callbacks": "callbacks come from the callbacks group: +callbacks.NAME._target_=... (conf/callbacks/)",
}
# Trainer arguments that do not apply: the methods step their own optimizers (manual optimization,
# so that SMF selects its slots once per accumulation window; methods/base.py)
METHOD_TRAINER_ARGS = {
    "accumulate_grad_batches": ("method.accumulate", 1),
    "gradient_clip_val": ("method.grad_clip", None),
}


def check_config(cfg: DictConfig) -> None:
    """The trainer, logger and callbacks groups can build this stage's loop (before loading)."""
    from ..callbacks import check_callbacks_config
    from ..loggers import logger_entries

    t = cfg.trainer
    if t.get("_target_") is None:
        raise ConfigError("bad config: trainer._target_ is not set; the trainer group instantiates a Lightning "
                          "Trainer (conf/trainer/default.yaml: lightning.pytorch.Trainer).")
    for key, why in STAGE_TRAINER_ARGS.items():
        if t.get(key) is not None:
            raise ConfigError(f"bad config: trainer.{key}={t.get(key)!r} is set by the continual stage: {why}. Drop the override.")
    for key, (instead, default) in METHOD_TRAINER_ARGS.items():
        if t.get(key, default) != default:
            raise ConfigError(f"bad config: trainer.{key}={t.get(key)!r} does not apply: the methods step their own "
                              f"optimizers (manual optimization); use {instead}={t.get(key)} instead.")
    logger_entries(cfg)
    check_callbacks_config(cfg)


# data._target_ of configs saved before the data module moved out of data/ (a run's .hydra/config.yaml,
# e.g. one experiments/tools/diag_rephrased.py rebuilds): the same class at its place now
MOVED_DATA_TARGETS = {
    "smf_lightning.data.datamodule.FactStreamDataModule": "smf_lightning.streams.datamodule.FactStreamDataModule",
}


def build_datamodule(cfg: DictConfig, model, tokenizer):
    """The fact stream; probing for unknown facts runs on the starting model (before retrofit)."""
    from hydra.utils import instantiate

    from ..streams.datamodule import FactStreamDataModule

    moved = MOVED_DATA_TARGETS.get(str(cfg.data.get("_target_")))
    dm = instantiate(cfg.data, tokenizer=tokenizer, probe_model=model, _convert_="all",
                     **({"_target_": moved} if moved else {}))
    if not isinstance(dm, FactStreamDataModule):
        raise ConfigError(f"data._target_ must be a FactStreamDataModule, got {type(dm).__name__}")
    dm.setup()
    return dm


def build_method(cfg: DictConfig, model, background=None, dm=None):
    """The LightningModule of cfg.method (methods/): what trains and how; with the stream's data
    module ``dm``, the tokens its background says may not write (method.skip_frequent_tokens)."""
    from ..methods import build_method as _build

    module = _build(OmegaConf.to_container(cfg.method, resolve=True), model, background=background, seed=int(cfg.seed))
    skip_frequent_tokens(cfg, module, model, dm)
    return module


def run_summary_info(cfg: DictConfig, model_info: dict) -> dict:
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


def build_trainer(cfg: DictConfig, n_tasks: int, loggers: list, callbacks: list):
    """The Lightning Trainer of conf/trainer/ with what the stream fixes (one epoch per task)."""
    from hydra.utils import instantiate

    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs.pop("threads", None)  # ours: torch's thread count (stages.start_run)
    if kwargs.get("strategy") == "ddp_spawn":
        # ddp_spawn pickles the model to every rank through shared memory. The default
        # file-descriptor sharing failed in containers ("unable to resize file <filename not
        # specified>": measured on this project's CPU machines); named files in /dev/shm work.
        import torch.multiprocessing as mp

        if mp.get_sharing_strategy() != "file_system":
            log.info("trainer.strategy=ddp_spawn: torch.multiprocessing sharing strategy 'file_system'")
            mp.set_sharing_strategy("file_system")
    return instantiate(
        kwargs,
        max_epochs=n_tasks,  # one Trainer epoch = one task of the stream
        reload_dataloaders_every_n_epochs=1,  # each epoch serves the next task's batches
        logger=loggers or False,
        callbacks=callbacks,
    )


class ContinualRecipe:
    """``setup → run → save`` of one continual-learning run."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def setup(self) -> None:
        from ..callbacks import build_callbacks
        from ..loggers import build_loggers

        cfg = self.cfg
        self.out_dir = start_run(cfg)
        log.info("loading model %s (source=%s)", cfg.model.name, cfg.model.source)
        model, tokenizer, model_info = load_model(cfg)
        dm = build_datamodule(cfg, model, tokenizer)
        dm.write_augmented(self.out_dir)  # data.augment: the generated study material, kept and dropped
        before_cache = self._before_cache(model, dm)  # keyed by the base model, before any retrofit
        model = maybe_retrofit(cfg, model, model_info)
        log.info("parameters: %s", model_info["param_counts"])
        prepare_memory(cfg, model, model_info, dm)
        background = background_stats(cfg, model, dm) if method_class(cfg.method).needs_background else None
        self.module = build_method(cfg, model, background=background, dm=dm)
        self.dm = dm
        self.loggers = build_loggers(cfg)
        callbacks, self.evaluator = build_callbacks(cfg, dm, tokenizer, run_summary_info(cfg, model_info),
                                                    before_cache=before_cache)
        logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_drop_litlogger_tip)
        self.trainer = build_trainer(cfg, dm.n_tasks, self.loggers, callbacks)

    def _before_cache(self, model, dm):
        """The shared "before" evaluation (eval/before_cache.py), or None."""
        cfg = self.cfg
        if not cfg.callbacks.get("cache_before_eval", True):
            return None
        from ..eval.before_cache import BeforeEvalCache, before_eval_key, starts_from_base

        if not starts_from_base(cfg):
            return None
        from ..eval.probe import model_fingerprint

        base_fp = dm.model_fingerprint or model_fingerprint(model)  # of the base model, before any retrofit
        return BeforeEvalCache(Path(cfg.paths.cache_dir) / "before_eval", before_eval_key(cfg, dm, base_fp))

    def run(self) -> None:
        from ..loggers import close_loggers

        # Train mode before fit (Lightning warns about modules left in eval mode); every evaluation
        # switches to eval mode and back (eval/scoring.py), so this changes no forward.
        self.module.model.train()
        try:
            # weights_only: a checkpoint holds tensors and plain containers only; nothing is unpickled
            self.trainer.fit(self.module, datamodule=self.dm, ckpt_path=self.cfg.ckpt_path, weights_only=True)
        finally:
            close_loggers(self.loggers)

    def save(self) -> dict:
        """The summary (summary.json, written by the evaluation callback after the last task);
        a run stopped before it (Trainer interrupted, ``trainer.max_time``) exits 130 with the
        resume command."""
        from ..interrupt import log_resume_hint

        if self.trainer.interrupted or not self.evaluator.finished:
            log.warning("run interrupted before the last task finished; completed tasks' results are in %s.", self.out_dir)
            log_resume_hint(self.out_dir)
            raise SystemExit(130)
        return self.evaluator.summary


def run(cfg: DictConfig) -> dict:
    """One continual-learning run; returns its summary (also in summary.json). A multirun job
    launched again in the same sweep directory is skipped when it finished, resumed when it
    stopped after a task (callbacks/sweep.py: resume_sweep_job)."""
    from ..callbacks.sweep import resume_sweep_job

    finished = resume_sweep_job(cfg)
    if finished is not None:
        return finished
    recipe = ContinualRecipe(cfg)
    recipe.setup()
    recipe.run()
    return recipe.save()


def _drop_litlogger_tip(record: logging.LogRecord) -> bool:
    """Lightning advertises its cloud logger on every Trainer start; the run log does not need it."""
    return "litlogger" not in record.getMessage()
