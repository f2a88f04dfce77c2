"""The run's loggers, built from the ``logger`` config group (conf/logger/): CSV always, wandb
offline by default, and any Lightning logger a user adds as a ``_target_`` entry.

Every job closes its loggers and its wandb run (:func:`close_loggers`), so the jobs of a
multirun sweep never log into one shared run (a known lightning-hydra-template pitfall).

A resumed run (``ckpt_path=``; a sweep job launched again in its own folder) keeps the
``metrics.csv`` of the run it resumes, where Lightning's CSV logger would delete it: every task
checkpoint records how many rows each CSV logger had written (:func:`csv_rows`), and the
resumed run cuts the file back to that many rows (:func:`cut_csv_rows`) before it appends, so
each step of the finished tasks is kept once and the steps of an interrupted task are redone
once, as in an uninterrupted run. The checkpoint also records each wandb run's id
(:func:`wandb_ids`), and the resumed run logs under that id (``resume="allow"``): online it
continues the same wandb run; offline it writes a second ``offline-run-*-<id>`` folder with the
same id (wandb cannot resume offline runs; ``wandb sync --id <id> --append`` is its way to add it).
"""

from __future__ import annotations

import csv
import os

from omegaconf import DictConfig, OmegaConf

from .config import ConfigError
from .errors import target_class

WANDB_MODES = ("offline", "online", "disabled")


def _is_off(entry) -> bool:
    if entry is None or entry is False:
        return True
    return OmegaConf.is_dict(entry) and (entry.get("enabled", True) is False or entry.get("mode") == "disabled")


def logger_entries(cfg: DictConfig) -> dict[str, DictConfig]:
    """name -> config of every logger the run builds, each checked to name an importable
    Lightning logger class. Runs before anything is loaded."""
    from lightning.pytorch.loggers import Logger

    group = cfg.get("logger")
    if group is None:
        return {}
    if not OmegaConf.is_dict(group):
        raise ConfigError(f"bad config: logger must be a mapping NAME -> logger config, got {type(group).__name__}; "
                          f"add one with `+logger.NAME._target_=lightning.pytorch.loggers.CSVLogger`.")
    entries = {}
    for name, entry in group.items():
        if _is_off(entry):
            continue
        if not OmegaConf.is_dict(entry) or "_target_" not in entry:
            raise ConfigError(
                f"bad config: logger.{name}={entry!r} is not a logger config (it needs a _target_); the loggers of "
                f"conf/logger/default.yaml are on by default: drop the override, or turn one off with logger.{name}=false.")
        mode = entry.get("mode")
        if name == "wandb" and mode not in WANDB_MODES:
            raise ConfigError(f"bad config: logger.wandb.mode={mode!r}; allowed: {' | '.join(WANDB_MODES)}.")
        target_class(f"logger.{name}", entry._target_, Logger, prefix="bad config: ")
        entries[name] = entry
    return entries


def build_loggers(cfg: DictConfig) -> list:
    """The run's Lightning loggers, in the order of the ``logger`` group; on resume their CSV
    loggers append to the metrics.csv they find."""
    from hydra.utils import get_class, instantiate
    from lightning.pytorch.loggers import WandbLogger

    loggers = []
    resumed_ids = iter(_checkpoint_entry(cfg.get("ckpt_path"), "wandb_ids") or [])
    for entry in logger_entries(cfg).values():
        kwargs = OmegaConf.to_container(entry, resolve=True)
        kwargs.pop("enabled", None)  # ours, not the logger's: false leaves the entry out
        if issubclass(get_class(entry._target_), WandbLogger):
            run_id = next(resumed_ids, None)
            if kwargs.get("id") is None and run_id is not None:
                kwargs["id"] = run_id  # the interrupted run's; WandbLogger passes resume="allow"
            make = instantiate(_wandb_kwargs(cfg, kwargs), _partial_=True)
            # the run's config is handed over as it is: instantiate would build its _target_ entries
            loggers.append(make(config=kwargs.get("config") or OmegaConf.to_container(cfg, resolve=True)))
        else:
            loggers.append(instantiate(kwargs))
    if cfg.get("ckpt_path") is not None:
        for lg in _csv_loggers(loggers):
            lg._experiment = _kept_csv_writer(lg.log_dir)  # before Lightning builds its own
    return loggers


def _checkpoint_entry(ckpt_path, key: str):
    """One entry of a task checkpoint (memory-mapped: the weights are not read), or None when
    there is no checkpoint or it lacks the entry (an older one)."""
    if ckpt_path is None or not os.path.isfile(ckpt_path):
        return None
    import torch

    return torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get(key)


def wandb_ids(loggers: list) -> list[str | None]:
    """The run id of each wandb logger, in the order of the ``logger`` group: recorded in every
    task checkpoint (callbacks/checkpoint.py), so a resumed run logs under the same id."""
    from lightning.pytorch.loggers import WandbLogger

    return [lg.version for lg in loggers if isinstance(lg, WandbLogger)]


def _csv_loggers(loggers: list) -> list:
    from lightning.pytorch.loggers import CSVLogger

    return [lg for lg in loggers if isinstance(lg, CSVLogger)]


def _kept_csv_writer(log_dir: str):
    """Lightning's CSV writer, except that it appends to the metrics.csv it finds (with that
    file's columns) instead of deleting it."""
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class KeptCSVWriter(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:
            if os.path.isfile(self.metrics_file_path):
                with open(self.metrics_file_path, newline="") as f:
                    self.metrics_keys = next(csv.reader(f), [])

    os.makedirs(log_dir, exist_ok=True)
    return KeptCSVWriter(log_dir=log_dir)


def csv_rows(loggers: list) -> list[int]:
    """Rows (header aside) in each CSV logger's metrics.csv, after writing out what it holds:
    recorded in every task checkpoint (callbacks/checkpoint.py)."""
    counts = []
    for lg in _csv_loggers(loggers):
        lg.save()
        path = lg.experiment.metrics_file_path
        if not os.path.isfile(path):
            counts.append(0)
            continue
        with open(path, newline="") as f:
            counts.append(max(sum(1 for _ in csv.reader(f)) - 1, 0))
    return counts


def cut_csv_rows(loggers: list, counts: list[int] | None) -> None:
    """Cut each CSV logger's metrics.csv back to the rows it had at the checkpoint a run resumes
    from: the rows an interrupted task logged after it are logged again by the resumed run. A
    checkpoint without counts (an older one) leaves the files as they are."""
    for lg, n in zip(_csv_loggers(loggers), counts or []):
        path = lg.experiment.metrics_file_path
        if not os.path.isfile(path):
            continue
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if len(rows) - 1 > n:
            with open(path, "w", newline="") as f:
                csv.writer(f).writerows(rows[: n + 1])


def _wandb_kwargs(cfg: DictConfig, kwargs: dict) -> dict:
    """The run's defaults for a wandb entry: ``mode`` (offline | online) as WandbLogger's
    ``offline``, the experiment as group, the method as run name."""
    mode = kwargs.pop("mode", None)
    if mode is not None:
        kwargs["offline"] = mode == "offline"
    if kwargs.get("group") is None:
        kwargs["group"] = cfg.task_name
    if kwargs.get("name") is None:
        from .methods import method_class, method_config

        kwargs["name"] = method_class(cfg.method).run_label(method_config(cfg.method))
    return {k: v for k, v in kwargs.items() if k != "config"}


def close_loggers(loggers: list) -> None:
    for lg in loggers:
        lg.finalize("success")
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()


def wandb_run(trainer):
    """The live wandb run of this trainer, or None."""
    for lg in trainer.loggers:
        if type(lg).__name__ == "WandbLogger":
            return lg.experiment
    return None
