"""The trainer, logger and callbacks groups instantiate as Lightning + Hydra users expect
(lightning-hydra-template's convention): a callback, a logger or a Trainer argument added from
the command line takes effect without code; the project's own callbacks keep their order; a
list that breaks the run's guarantees fails before loading, saying what to do."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir

from smf_lightning.callbacks import ContinualEvaluation, SlotStatsLogger, TaskCheckpoint, build_callbacks
from smf_lightning.config import ConfigError
from smf_lightning.loggers import build_loggers
from smf_lightning.stages.continual import build_trainer, check_config
from smf_lightning.train import conf_dir, run

TINY = ["experiment=tiny", "logger.wandb.mode=disabled", "callbacks.plots=false", "callbacks.cache_before_eval=false"]


def tiny_cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose("train", overrides=[*TINY, f"paths.output_dir={tmp_path}", *overrides])


def callback_types(cfg) -> list[type]:
    """The Trainer's callback list of cfg, built without a model (the evaluation only stores its data)."""
    callbacks, _ = build_callbacks(cfg, SimpleNamespace(), tokenizer=None, run_info={})
    return [type(c) for c in callbacks]


def test_user_callback_logger_and_trainer_argument_take_effect_on_a_run(tmp_path):
    """One tiny run with a Lightning callback, a second logger and a Trainer argument, all
    from overrides: the callback's metric reaches both loggers' files, the argument the Trainer."""
    extra = tmp_path / "extra_csv"
    cfg = tiny_cfg(
        tmp_path,
        "+callbacks.lr_monitor._target_=lightning.pytorch.callbacks.LearningRateMonitor",
        "+logger.extra._target_=lightning.pytorch.loggers.CSVLogger", f"+logger.extra.save_dir={extra}",
        "trainer.log_every_n_steps=2",
    )
    summary = run(cfg)
    assert summary["steps"] == 16
    for metrics in (tmp_path / "csv" / "metrics.csv", next(extra.rglob("metrics.csv"))):
        rows = list(csv.DictReader(metrics.open()))
        assert any(k.startswith("lr-") for k in rows[0]), rows[0].keys()  # LearningRateMonitor's column
        logged = sorted({int(r["step"]) for r in rows if r.get("train/loss")})
        assert len(logged) >= 4 and all(b - a == 2 for a, b in zip(logged, logged[1:])), logged  # every 2nd step
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_any_trainer_argument_reaches_the_trainer(tmp_path):
    from lightning.pytorch.callbacks import Timer

    cfg = tiny_cfg(tmp_path, "trainer.max_time=00:01:00:00", "+trainer.max_steps=7", "trainer.precision=bf16-mixed")
    check_config(cfg)
    trainer = build_trainer(cfg, n_tasks=3, loggers=[], callbacks=[])
    assert trainer.max_epochs == 3 and trainer.max_steps == 7
    assert trainer.precision == "bf16-mixed"
    timer = next(c for c in trainer.callbacks if isinstance(c, Timer))
    assert timer._duration == 3600
    assert trainer.default_root_dir == str(tmp_path)


def test_own_callbacks_evaluation_first_checkpoint_last_whatever_the_order(tmp_path):
    # re-adding the evaluation puts it last in the config; a user's callback comes after the checkpoint
    cfg = tiny_cfg(tmp_path, "~callbacks.evaluation", "+callbacks.evaluation._target_=smf_lightning.callbacks.ContinualEvaluation",
                   f"+callbacks.evaluation.out_dir={tmp_path}", "+callbacks.evaluation.resamples=0",
                   "+callbacks.evaluation.interval_seed=0",
                   "+callbacks.lr_monitor._target_=lightning.pytorch.callbacks.LearningRateMonitor")
    assert list(cfg.callbacks)[-2:] == ["evaluation", "lr_monitor"]
    from lightning.pytorch.callbacks import LearningRateMonitor

    assert callback_types(cfg) == [ContinualEvaluation, SlotStatsLogger, LearningRateMonitor, TaskCheckpoint]


def test_existing_callback_keys_still_switch_callbacks(tmp_path):
    from lightning.pytorch.callbacks import TQDMProgressBar

    assert callback_types(tiny_cfg(tmp_path)) == [ContinualEvaluation, SlotStatsLogger, TaskCheckpoint]  # bar off in tiny
    assert TQDMProgressBar in callback_types(tiny_cfg(tmp_path, "trainer.enable_progress_bar=true"))
    assert TQDMProgressBar not in callback_types(tiny_cfg(tmp_path, "trainer.enable_progress_bar=true", "callbacks.progress_bar=none"))
    assert callback_types(tiny_cfg(tmp_path, "callbacks.checkpoint.enabled=false", "callbacks.slot_stats.enabled=false")) == [
        ContinualEvaluation]
    assert callback_types(tiny_cfg(tmp_path, "method=full_ft")) == [ContinualEvaluation, TaskCheckpoint]  # slot stats: SMF only
    evaluation = build_callbacks(tiny_cfg(tmp_path, "callbacks.suites_at=first_last", "callbacks.intervals.resamples=7"),
                                 SimpleNamespace(), None, {})[1]
    assert (evaluation.suites_at, evaluation.resamples, evaluation.plots) == ("first_last", 7, False)


@pytest.mark.parametrize(
    "override,expect",
    [
        (["callbacks.evaluation=null"], "exactly one evaluation callback"),
        (["+callbacks.eval2._target_=smf_lightning.callbacks.ContinualEvaluation"], "callbacks.eval2"),
        (["+callbacks.ckpt2._target_=smf_lightning.callbacks.TaskCheckpoint"], "more than one task checkpoint"),
        (["+callbacks.x._target_=lightning.pytorch.callbacks.NoSuchCallback"], "callbacks.x._target_"),
        (["+callbacks.x._target_=lightning.pytorch.loggers.CSVLogger"], "not a Lightning Callback"),
        (["+callbacks.x.target_=lightning.pytorch.callbacks.LearningRateMonitor"], "give it a _target_"),
        (["callbacks.progress_bar=tqdm"], "callbacks.progress_bar=null"),
        (["+trainer.max_epochs=5"], "data.n_tasks"),
        (["+trainer.callbacks=[]"], "+callbacks.NAME._target_"),
        (["+trainer.accumulate_grad_batches=4"], "method.accumulate=4"),
        (["+trainer.gradient_clip_val=1.0"], "method.grad_clip"),
        (["logger.csv=true"], "logger.csv=false"),
        (["+logger.x._target_=lightning.pytorch.callbacks.LearningRateMonitor"], "not a Lightning Logger"),
        (["logger.wandb.mode=sometimes"], "logger.wandb.mode"),
    ],
)
def test_broken_lists_fail_before_loading_with_what_to_do(tmp_path, override, expect):
    with pytest.raises(ConfigError, match=expect.replace(".", r"\.").replace("+", r"\+").replace("[", r"\[")):
        check_config(tiny_cfg(tmp_path, *override))


def test_loggers_from_the_logger_group(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    loggers = build_loggers(tiny_cfg(tmp_path, "logger.wandb.mode=offline", "tags=[a]"))
    assert [type(lg) for lg in loggers] == [CSVLogger, WandbLogger]
    csv_logger, wandb_logger = loggers
    assert Path(csv_logger.log_dir) == tmp_path / "csv"
    init = wandb_logger._wandb_init  # built lazily: nothing starts until the first log
    assert (init["group"], init["name"], init["tags"], wandb_logger._offline) == ("tiny", "smf-kl-t16", ["a"], True)
    assert init["config"]["data"]["n_tasks"] == 2 and init["config"]["trainer"]["_target_"] == "lightning.pytorch.Trainer"
    assert [type(lg) for lg in build_loggers(tiny_cfg(tmp_path, "logger=csv"))] == [CSVLogger]
    assert [type(lg) for lg in build_loggers(tiny_cfg(tmp_path, "logger.csv=false"))] == []  # wandb disabled in TINY
    assert build_loggers(tiny_cfg(tmp_path, "logger.wandb.mode=online"))[1]._offline is False


def test_a_resumed_run_logs_under_the_checkpoints_wandb_id(tmp_path):
    """The task checkpoint's wandb run id (callbacks/checkpoint.py) becomes the resumed run's id;
    a checkpoint without one (an older one) and a run without ckpt_path leave wandb to choose."""
    import torch

    ckpt = tmp_path / "last.ckpt"
    torch.save({"wandb_ids": ["run7abc"]}, ckpt)
    wandb_logger = build_loggers(tiny_cfg(tmp_path, "logger.wandb.mode=offline", f"ckpt_path={ckpt}"))[1]
    assert (wandb_logger._wandb_init["id"], wandb_logger._wandb_init["resume"], wandb_logger.version) == (
        "run7abc", "allow", "run7abc")
    torch.save({"csv_rows": [3]}, ckpt)
    assert build_loggers(tiny_cfg(tmp_path, "logger.wandb.mode=offline", f"ckpt_path={ckpt}"))[1].version is None
    assert build_loggers(tiny_cfg(tmp_path, "logger.wandb.mode=offline"))[1].version is None
    # an id the user sets wins over the checkpoint's
    torch.save({"wandb_ids": ["run7abc"]}, ckpt)
    cfg = tiny_cfg(tmp_path, "logger.wandb.mode=offline", f"ckpt_path={ckpt}", "+logger.wandb.id=mine")
    assert build_loggers(cfg)[1].version == "mine"


def test_tensorboard_logger_option(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger

    loggers = build_loggers(tiny_cfg(tmp_path, "logger=tensorboard"))
    tb = next(lg for lg in loggers if isinstance(lg, TensorBoardLogger))
    assert Path(tb.log_dir) == tmp_path / "tensorboard"


@pytest.mark.parametrize("option,name,target", [("tensorboard", "tensorboard", "TensorBoardLogger"), ("mlflow", "mlflow", "MLFlowLogger")])
def test_logger_options_compose_on_top_of_the_default(tmp_path, option, name, target):
    from smf_lightning.loggers import logger_entries

    entries = logger_entries(tiny_cfg(tmp_path, f"logger={option}", "logger.wandb.mode=offline"))
    assert list(entries) == ["csv", "wandb", name]
    assert entries[name]._target_ == f"lightning.pytorch.loggers.{target}"


def test_a_logger_group_without_wandb_passes_the_checks(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from smf_lightning.config import validate_config

    cfg = tiny_cfg(tmp_path, "logger.wandb=null")
    validate_config(cfg)
    check_config(cfg)
    assert [type(lg) for lg in build_loggers(cfg)] == [CSVLogger]
