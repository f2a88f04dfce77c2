"""Log SMF's slot statistics every optimizer step and memory layer (docs/design.md §7):
accessed and selected slots, KL(p_batch ‖ p_bg), overlap with earlier tasks' slots and hub
concentration — to the loggers, to ``slot_stats.csv`` and as ``slot_stats.png``.

Under DDP every rank holds the same global counts and selection (selection/distributed.py),
so every rank keeps the same rows; only rank 0 writes the files."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L

from ..selection.stats import SlotHistory, slot_step_stats
from .plots import plot_slot_stats


class SlotStatsLogger(L.Callback):
    def __init__(self, out_dir: Path, plots: bool = True):
        self.out_dir = Path(out_dir)
        self.plots = plots
        self.rows: list[dict] = []
        self.history = SlotHistory()
        self._seen_steps = -1

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if not getattr(module, "memory_only", False) or module._micro != 0:
            return  # not a memory method, or in the middle of an accumulation window
        step = len(module.updated_params_history)
        if step == self._seen_steps:
            return
        self._seen_steps = step
        metrics = {}
        capacity = module.capacity()
        for layer, sel in module.last_selection.items():
            mem = module.memories[layer]
            s = slot_step_stats(
                module.last_counts[layer], sel, bg=module.background.get(layer), history=self.history, layer=layer
            )
            self.history.record(layer, sel, mem.n_slots)
            s.update(owned_slots=capacity[layer]["owned"], free_slots=capacity[layer]["free"])
            self.rows.append({"step": step, "task": trainer.current_epoch, "layer": layer, **s})
            metrics.update({f"slots/L{layer}/{k}": v for k, v in s.items()})
        module.log_dict(metrics, on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer, module) -> None:
        if not self.rows:
            return
        self.history.end_task()
        if not trainer.is_global_zero:
            return
        cols = list(self.rows[0].keys()) + sorted({k for r in self.rows for k in r} - set(self.rows[0]))
        with (self.out_dir / "slot_stats.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(self.rows)
        if self.plots:
            plot_rows = [
                {"step": r["step"], "layer": r["layer"], "kl": r.get("kl_batch_bg"), "accessed": r["accessed_slots"],
                 "overlap": r.get("jaccard_earlier"), "hub_share": r["hub_share_batch"]}
                for r in self.rows
            ]
            plot_slot_stats(plot_rows, self.out_dir / "slot_stats.png")

    # resume: keep the statistics of completed tasks
    def state_dict(self) -> dict:
        return {"rows": self.rows, "history": self.history.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.rows = list(state["rows"])
        self.history.load_state_dict(state["history"])
