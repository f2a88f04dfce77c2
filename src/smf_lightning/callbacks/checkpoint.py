"""``checkpoints/last.ckpt`` after every task: the resume point of an interrupted run.

Written atomically (temp file, then rename, then fsync of file and folder), so a kill
during the write leaves the previous task's checkpoint intact. The methods strip frozen
weights from it (see ``ContinualLM.on_save_checkpoint``); it carries trainable weights,
optimizer state and every callback's state (evaluation history, slot statistics), and how
many rows each CSV logger had written, so a run resumed in its own folder keeps its
``csv/metrics.csv`` as far as the checkpoint and logs the rest once, and the wandb run's id, so
the resumed run logs into the same wandb run (loggers.py).

``stop_after_task=k`` (``debug.stop_after_task``) SIGKILLs the run right after task k's
checkpoint is durable: the deterministic kill point of the resume tests (interrupt.py).

Data parallel (DDP): Lightning's ``save_checkpoint`` writes the file on rank 0 only (every rank
holds the same state) and ends with a barrier; the rename and fsync are rank 0's too (two
ranks renaming one temp file crashed the second), followed by a barrier so no rank
starts the next task before the checkpoint is durable."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L

from ..interrupt import fsync_file_and_dir, kill_self_hard
from ..loggers import csv_rows, cut_csv_rows, wandb_ids


class TaskCheckpoint(L.Callback):
    def __init__(self, dirpath: Path, stop_after_task: int | None = None):
        self.path = Path(dirpath) / "last.ckpt"
        self.stop_after_task = stop_after_task

    def on_save_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        if trainer.is_global_zero:
            checkpoint["csv_rows"] = csv_rows(trainer.loggers)
            checkpoint["wandb_ids"] = wandb_ids(trainer.loggers)

    def on_load_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        if trainer.is_global_zero:
            cut_csv_rows(trainer.loggers, checkpoint.get("csv_rows"))

    def on_train_epoch_end(self, trainer, module) -> None:
        # Runs after the evaluation callback (it is last in the callback list), so the
        # checkpoint includes this task's results.
        tmp = self.path.with_suffix(".ckpt.tmp")
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(tmp, weights_only=False)  # with optimizer and callback states; rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
            fsync_file_and_dir(self.path)
        trainer.strategy.barrier("task checkpoint")
        if self.stop_after_task is not None and trainer.current_epoch == int(self.stop_after_task):
            kill_self_hard()
