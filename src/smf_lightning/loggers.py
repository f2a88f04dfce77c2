"""CSV always; wandb offline by default. Every job closes its wandb run, so the jobs of a
multirun sweep never log into one shared run (a known lightning-hydra-template pitfall)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def build_loggers(cfg: DictConfig, out_dir: Path) -> list:
    from lightning.pytorch.loggers import CSVLogger

    loggers = []
    if cfg.logger.get("csv", True):
        loggers.append(CSVLogger(save_dir=str(out_dir), name="csv", version=""))
    w = cfg.logger.wandb
    if w.enabled and w.mode != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        m = cfg.method
        name = f"{m.name}" + (f"-{m.selector}-t{m.top_t}" if m.name == "smf" else "")
        loggers.append(
            WandbLogger(
                project=w.project,
                entity=w.entity,
                group=w.group or cfg.task_name,
                name=name,
                save_dir=str(out_dir),
                offline=w.mode == "offline",
                tags=list(cfg.get("tags", [])),
                config=OmegaConf.to_container(cfg, resolve=True),
            )
        )
    return loggers


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
