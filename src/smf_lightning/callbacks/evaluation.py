"""Continual evaluation: before training and after every task, measure fact recall on every
seen task (training templates and the held-out template) and every held-out capability
suite; keep the accuracy matrices R, write the run output contract (design.md §8) after
each evaluation point so a crash never loses completed results, and the final
``summary.json`` and plots when the last task is done."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import resource
import time
from pathlib import Path

import lightning as L

from ..config import SUITES_AT
from ..eval.metrics import continual_learning_metrics, relative_change
from ..loggers import wandb_run
from .plots import plot_accuracy_matrix, plot_forgetting_curves


log = logging.getLogger(__name__)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _clean(x):
    """JSON-safe: NaN -> None."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


class ContinualEvaluation(L.Callback):
    def __init__(self, out_dir: Path, datamodule, tokenizer, run_info: dict, plots: bool = True,
                 suites_at: str = "every_task", before_cache=None):
        if suites_at not in SUITES_AT:
            raise ValueError(f"callbacks.suites_at={suites_at!r}: use {' or '.join(SUITES_AT)}")
        self.out_dir = Path(out_dir)
        self.suites_at = suites_at  # first_last: held-out suites before training and after the last task only
        self.dm = datamodule
        self.tokenizer = tokenizer
        self.run_info = run_info  # method/model settings copied into summary.json
        self.plots = plots
        self.before_cache = before_cache  # eval/before_cache.py: the "before" point shared across runs
        self.before_from_cache = False
        # evaluation points: 0 = before training, i+1 = after task i
        self.labels: list[str] = []
        self.R: list[list[float | None]] = []  # training templates (mean over them)
        self.R_heldout: list[list[float | None]] = []  # held-out template(s)
        self.R_contains: list[list[float | None]] = []  # training templates, alias anywhere in the answer
        self.heldout: list[dict[str, dict[str, float]]] = []  # per point: suite -> metrics
        self.train_seconds = 0.0
        self.steps = 0
        self.eval_seconds = 0.0
        self.summary: dict = {}
        self.finished = False
        self._t0: float | None = None

    # ---------------------------------------------------------------- evaluation
    def _evaluate(self, module, label: str, tasks: range, suites: bool = True) -> None:
        t0 = time.perf_counter()
        model, bs = module.model, self.dm.eval_batch_size
        n = self.dm.n_tasks
        row, row_h, row_c = [None] * n, [None] * n, [None] * n
        log.info("evaluation '%s': fact recall of tasks 0..%d ...", label, tasks[-1])
        recall = self.dm.evaluate_recall(model, self.tokenizer, list(tasks))  # one greedy pass for all
        for j in tasks:
            train = [recall[j][t]["em"] for t in self.dm.train_templates]
            held = [recall[j][t]["em"] for t in self.dm.heldout_templates]
            row[j] = sum(train) / len(train)
            row_h[j] = sum(held) / len(held)
            row_c[j] = sum(recall[j][t]["contains"] for t in self.dm.train_templates) / len(train)
        log.info("evaluation '%s': recall %.2f (training templates), %.2f (held-out) in %.0f s", label,
                 sum(row[j] for j in tasks) / len(tasks), sum(row_h[j] for j in tasks) / len(tasks), time.perf_counter() - t0)
        results = {}
        for name, suite in (self.dm.heldout_suites().items() if suites else ()):
            t1 = time.perf_counter()
            results[name] = suite.evaluate(model, self.tokenizer, bs)
            self._write_items(label, name, suite)
            log.info("evaluation '%s': %s (%d items) %s %.4g in %.0f s", label, name, len(suite.items),
                     suite.primary_metric, results[name][suite.primary_metric], time.perf_counter() - t1)
        self.eval_seconds += time.perf_counter() - t0
        self._add_point(label, row, row_h, row_c, results)

    def _add_point(self, label: str, row, row_h, row_c, results) -> None:
        """Record one evaluation point and write the output files so far."""
        self.labels.append(label)
        self.R.append(row)
        self.R_heldout.append(row_h)
        self.R_contains.append(row_c)
        self.heldout.append(results)
        self._write_progress()

    def _write_items(self, label: str, name: str, suite) -> None:
        """Per-item answers of the fact suites (items/<point>/<suite>.csv), for later analysis."""
        if not hasattr(suite, "per_fact"):
            return
        folder = self.out_dir / "items" / label.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{name}.csv.tmp"
        with tmp.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "prediction", "exact_match"])
            w.writerows(suite.per_fact())
        os.replace(tmp, folder / f"{name}.csv")

    def _log(self, trainer, point: int) -> None:
        metrics = {}
        for j, v in enumerate(self.R[point]):
            if v is not None:
                metrics[f"recall/task{j}"] = v
                metrics[f"recall_heldout_template/task{j}"] = self.R_heldout[point][j]
        for suite, vals in self.heldout[point].items():
            metrics.update({f"heldout/{suite}/{k}": v for k, v in vals.items()})
        metrics["eval_point"] = point
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=trainer.global_step)

    def on_train_start(self, trainer, module) -> None:
        if not self.labels:  # not a resumed run: the baseline row, over every task
            cached = self.before_cache.load() if self.before_cache is not None else None
            if cached is not None:
                log.info("evaluation 'before': loaded from %s (same base model and evaluation setup)", self.before_cache.path)
                self.before_from_cache = True
                self._add_point("before", cached["R"], cached["R_heldout"], cached["R_contains"], cached["heldout"])
            else:
                self._evaluate(module, "before", range(self.dm.n_tasks))
                if self.before_cache is not None:
                    self.before_cache.save({"R": self.R[0], "R_heldout": self.R_heldout[0],
                                            "R_contains": self.R_contains[0], "heldout": self.heldout[0]})
            self._log(trainer, 0)
        module.model.train()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.train_seconds += time.perf_counter() - self._t0
        if module._micro == 0:
            self.steps += 1

    def on_train_epoch_end(self, trainer, module) -> None:
        task = trainer.current_epoch
        last = task == self.dm.n_tasks - 1
        self._evaluate(module, f"after task {task}", range(task + 1), suites=last or self.suites_at == "every_task")
        self._log(trainer, len(self.R) - 1)
        module.model.train()
        if last:
            self._finish(trainer, module)

    # ---------------------------------------------------------------- files
    def _write_progress(self) -> None:
        n = self.dm.n_tasks
        for name, mat in (("accuracy_matrix.csv", self.R), ("accuracy_matrix_heldout_template.csv", self.R_heldout)):
            lines = ["eval_point," + ",".join(f"task_{j}" for j in range(n))]
            for label, row in zip(self.labels, mat):
                lines.append(label + "," + ",".join("" if v is None else f"{v:.6f}" for v in row))
            _atomic_write(self.out_dir / name, "\n".join(lines) + "\n")
        suites = self.dm.heldout_suites()
        rows = []
        for point, (label, results) in enumerate(zip(self.labels, self.heldout)):
            for suite, vals in results.items():
                for metric, value in vals.items():
                    rows.append({
                        "eval_point": point, "label": label, "after_task": point - 1, "suite": suite, "metric": metric,
                        "value": value, "primary": metric == suites[suite].primary_metric,
                        "higher_is_better": suites[suite].higher_is_better if metric == suites[suite].primary_metric else "",
                    })
        tmp = self.out_dir / "heldout.csv.tmp"
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.out_dir / "heldout.csv")

    def _finish(self, trainer, module) -> None:
        n = self.dm.n_tasks
        after = [[v if v is not None else math.nan for v in row] for row in self.R[1:]]
        cl = continual_learning_metrics(after)
        final, final_h = self.R[-1], self.R_heldout[-1]
        heldout = {}
        for name, suite in self.dm.heldout_suites().items():
            metric = suite.primary_metric
            before, now = self.heldout[0][name][metric], self.heldout[-1][name][metric]
            heldout[name] = {"metric": metric, "before": before, "after": now,
                             "rel_change": relative_change(before, now), "higher_is_better": suite.higher_is_better,
                             "all_before": self.heldout[0][name], "all_after": self.heldout[-1][name]}
        history = module.updated_params_history
        self.summary = _clean({
            **self.run_info,
            "n_tasks": n,
            "facts_per_task": self.dm.facts_per_task,
            "fact_recall": sum(final) / n,
            "fact_recall_heldout_template": sum(final_h) / n,
            # the gold alias anywhere in the greedy answer: counts "Niger Niger Niger" (exact match does not)
            "fact_recall_contains": sum(self.R_contains[-1]) / n if self.R_contains else None,
            "acc": cl["acc"],
            "bwt": cl["bwt"],
            "forgetting": cl["forgetting"],
            "heldout": heldout,
            "steps": self.steps,
            "seconds_per_step": self.train_seconds / max(self.steps, 1),
            "eval_seconds": self.eval_seconds,
            "before_eval_from_cache": self.before_from_cache,
            "peak_rss_mb": peak_rss_mb(),
            "trainable_params": module.trainable_param_count(),
            "updated_params_per_step": sum(history) / len(history) if history else 0,
            "accuracy_matrix": self.R,
            "accuracy_matrix_heldout_template": self.R_heldout,
            "eval_points": self.labels,
            "data": self.dm.info,
        })
        _atomic_write(self.out_dir / "summary.json", json.dumps(self.summary, indent=2))
        if self.plots:
            self._plot(trainer)
        self.finished = True

    def _plot(self, trainer) -> None:
        pngs = [
            plot_accuracy_matrix(self.R, self.labels, self.out_dir / "accuracy_matrix.png", "fact recall R (training templates)"),
            plot_accuracy_matrix(self.R_heldout, self.labels, self.out_dir / "accuracy_matrix_heldout_template.png", "fact recall R (held-out template)"),
        ]
        suites = self.dm.heldout_suites()
        curves = {f"{n} {s.primary_metric}": [h[n][s.primary_metric] if n in h else None for h in self.heldout]
                  for n, s in suites.items()}
        pngs.append(plot_forgetting_curves(self.R, curves, self.labels, self.out_dir / "forgetting_curves.png"))
        run = wandb_run(trainer)
        if run is not None:
            import wandb

            run.log({p.stem: wandb.Image(str(p)) for p in pngs})
            cols = ["eval_point"] + [f"task_{j}" for j in range(self.dm.n_tasks)]
            run.log({"accuracy_matrix": wandb.Table(columns=cols, data=[[lab] + row for lab, row in zip(self.labels, self.R)])})

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("labels", "R", "R_heldout", "R_contains", "heldout", "train_seconds", "steps",
                                              "eval_seconds", "before_from_cache")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
