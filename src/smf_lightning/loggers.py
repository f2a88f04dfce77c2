"""The run's loggers, built from the ``logger`` config group (conf/logger/): CSV always, wandb
offline by default, and any Lightning logger a user adds as a ``_target_`` entry.

Every job closes its loggers and its wandb run (:func:`close_loggers`), so the jobs of a
multirun sweep never log into one shared run (a known lightning-hydra-template pitfall).
"""

from __future__ import annotations

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
    """The run's Lightning loggers, in the order of the ``logger`` group."""
    from hydra.utils import get_class, instantiate
    from lightning.pytorch.loggers import WandbLogger

    loggers = []
    for entry in logger_entries(cfg).values():
        kwargs = OmegaConf.to_container(entry, resolve=True)
        kwargs.pop("enabled", None)  # ours, not the logger's: false leaves the entry out
        if issubclass(get_class(entry._target_), WandbLogger):
            make = instantiate(_wandb_kwargs(cfg, kwargs), _partial_=True)
            # the run's config is handed over as it is: instantiate would build its _target_ entries
            loggers.append(make(config=kwargs.get("config") or OmegaConf.to_container(cfg, resolve=True)))
        else:
            loggers.append(instantiate(kwargs))
    return loggers


def _wandb_kwargs(cfg: DictConfig, kwargs: dict) -> dict:
    """The run's defaults for a wandb entry: ``mode`` (offline | online) as WandbLogger's
    ``offline``, the experiment as group, the method as run name."""
    mode = kwargs.pop("mode", None)
    if mode is not None:
        kwargs["offline"] = mode == "offline"
    if kwargs.get("group") is None:
        kwargs["group"] = cfg.task_name
    if kwargs.get("name") is None:
        m = cfg.method
        kwargs["name"] = f"{m.name}" + (f"-{m.selector}-t{m.top_t}" if m.name == "smf" else "")
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
