"""Continual evaluation: before training and after every task, measure fact recall on every
seen task (training templates and the held-out template) and every held-out capability
suite; keep the accuracy matrices R, write the run output contract (docs/design.md §8) after
each evaluation point so a crash never loses completed results, and the final
``summary.json`` and plots when the last task is done.

Every point keeps its per-item scores (``items/<point>/<suite>.csv``, ``fact_recall.csv``), from
which each number is recomputed exactly; 95% intervals come from a bootstrap over those items,
paired between "before" and a later point for changes (eval/intervals.py).

With ``prefix_states`` (callbacks.eval_prefix_cache, SMF), the hidden states entering the
lowest memory layer of every evaluation forward are kept from the first point on and the
layers below are skipped at later points: same numbers, less time (eval/prefix_states.py).

Data parallel (DDP): evaluation runs on rank 0 only while the other ranks wait at a barrier
(every rank holds the same weights, so one evaluation is the run's; sharding it would need
every suite's metrics to be reducible across ranks). Files, plots and wandb are written by
rank 0 only. The barrier waits up to the process group's timeout (Lightning's default: 30
minutes), which an evaluation of the real model fits. Under ``strategy=ddp_spawn`` the fit
runs in spawned processes, so the main process's callback never sees it: ``finished`` and
``summary`` then read back the ``summary.json`` that rank 0 wrote during this fit."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import resource
import time
from pathlib import Path

import lightning as L
import torch

from ..config import SUITES_AT
import numpy as np

from ..eval import intervals as ci
from ..eval.metrics import continual_learning_metrics, degradation_pct, exact_match, items_folder, relative_change
from ..eval.suites import REPHRASED
from ..loggers import wandb_run
from .plots import plot_accuracy_matrix, plot_forgetting_curves


log = logging.getLogger(__name__)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def peak_gpu_mb(device: torch.device) -> float | None:
    """Peak CUDA memory allocated by tensors on ``device`` since the process started (None off GPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def _synchronize(device: torch.device) -> None:
    # CUDA kernels run asynchronously: a step's wall time is only known once its kernels finished
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clean(x):
    """JSON-safe: NaN -> None."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def _csv_value(x):
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _csv_interval(prefix: str, interval) -> dict:
    low, high = interval if interval is not None else ("", "")
    return {f"{prefix}_low": low, f"{prefix}_high": high}


def _pair(interval) -> list[float] | None:
    return None if interval is None else [interval[0], interval[1]]


def _write_columns(path: Path, columns: dict[str, list]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(columns))
        w.writerows(zip(*columns.values()))  # floats as repr: read back, they are the same floats
    os.replace(tmp, path)


RECALL_FIGURES = {  # summary key -> (templates, per-fact score)
    "fact_recall": ("train", "em"),
    "fact_recall_heldout_template": ("heldout", "em"),
    "fact_recall_contains": ("train", "contains"),
}
# Recall on the evaluation-only rephrasings (docs/design.md "Rephrased questions"): computed from the
# per-item records (template "rephrased"), for the tasks whose facts have rephrasings.
REPHRASED_FIGURES = {
    "fact_recall_rephrased": ("rephrased", "em"),
    "fact_recall_rephrased_contains": ("rephrased", "contains"),
}


class ContinualEvaluation(L.Callback):
    def __init__(self, out_dir: Path, datamodule, tokenizer, run_info: dict, plots: bool = True,
                 suites_at: str = "every_task", before_cache=None, *, resamples: int, interval_seed: int,
                 prefix_states=None):
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
        if resamples < 0:
            raise ValueError(f"callbacks.intervals.resamples={resamples}: use a number of bootstrap resamples >= 0 (0: no intervals)")
        self.resamples = resamples  # bootstrap resamples per interval (callbacks.intervals; 0: none)
        self.interval_seed = interval_seed
        self.prefix_states = prefix_states  # eval/prefix_states.py: frozen-prefix states of every item, or None
        # evaluation points: 0 = before training, i+1 = after task i
        self.labels: list[str] = []
        self.R: list[list[float | None]] = []  # training templates (mean over them)
        self.R_heldout: list[list[float | None]] = []  # held-out template(s)
        self.R_contains: list[list[float | None]] = []  # training templates, alias anywhere in the answer
        self.heldout: list[dict[str, dict[str, float]]] = []  # per point: suite -> metrics
        self.items: list[dict[str, dict[str, list]]] = []  # per point: suite -> per-item columns
        self.recall_items: list[dict[str, list]] = []  # per point: one row per (task, template, fact)
        self.train_seconds = 0.0
        self.steps = 0
        self.eval_seconds = 0.0
        self._summary: dict = {}
        self._finished = False
        self._created = time.time()  # a summary.json older than this is not this run's
        self._t0: float | None = None

    # ---------------------------------------------------------------- result
    def _summary_on_disk(self) -> dict | None:
        """This fit's summary.json when another process (rank 0 of ddp_spawn) wrote it."""
        path = self.out_dir / "summary.json"
        if not path.is_file() or path.stat().st_mtime < self._created:
            return None
        return json.loads(path.read_text())

    @property
    def finished(self) -> bool:
        """The last task was evaluated (on any rank of this run)."""
        return self._finished or self._summary_on_disk() is not None

    @property
    def summary(self) -> dict:
        """summary.json's content ({} on ranks other than 0, and before the last task)."""
        if self._summary or self._finished:
            return self._summary
        return self._summary_on_disk() or {}

    def extend_summary(self, entries: dict) -> None:
        """Add another evaluator's results (callbacks/lm_eval.py) to summary.json, once the last
        task's summary is written (rank 0)."""
        self._summary = {**self._summary, **_clean(entries)}
        _atomic_write(self.out_dir / "summary.json", json.dumps(self._summary, indent=2))

    # ---------------------------------------------------------------- evaluation
    def _evaluate(self, module, label: str, tasks: range, suites: bool = True) -> None:
        t0 = time.perf_counter()
        model, states = module.model, self.prefix_states
        with states.active(model) if states is not None else contextlib.nullcontext():
            records, rows = self._evaluate_recall(model, label, tasks, t0)
            results, items = self._evaluate_suites(model, label, suites)
        if states is not None:
            log.info("evaluation '%s': prefix cache %d hits, %d misses so far (decoding steps: %d, %d), %.0f MB kept",
                     label, states.hits, states.misses, states.step_hits, states.step_misses, states.nbytes / 2**20)
        self.eval_seconds += time.perf_counter() - t0
        self._add_point(label, *rows, results, items, records)

    def _evaluate_recall(self, model, label: str, tasks: range, t0: float) -> tuple[dict, tuple]:
        log.info("evaluation '%s': fact recall of tasks 0..%d ...", label, tasks[-1])
        per_template: dict = {}
        with self._scope("fact_recall"):
            self.dm.evaluate_recall(model, self.tokenizer, list(tasks), items=per_template)  # one greedy pass for all
        records = {"task": [], "template": []}
        for (j, template), cols in per_template.items():
            records["task"] += [j] * len(cols["id"])
            records["template"] += [template] * len(cols["id"])
            for k, v in cols.items():
                records.setdefault(k, []).extend(v)
        row, row_h, row_c = self._recall_rows(records)
        rephrased = ci.recall_task_means(records, list(tasks), [REPHRASED], "em")
        log.info("evaluation '%s': recall %.2f (training templates), %.2f (held-out)%s in %.0f s", label,
                 sum(row[j] for j in tasks) / len(tasks), sum(row_h[j] for j in tasks) / len(tasks),
                 f", {sum(rephrased.values()) / len(rephrased):.2f} (rephrased)" if rephrased else "",
                 time.perf_counter() - t0)
        return records, (row, row_h, row_c)

    def _scope(self, name: str):
        """Kept prefix states of `name` that its run does not use again are dropped at its end."""
        return self.prefix_states.scope(name) if self.prefix_states is not None else contextlib.nullcontext()

    def _evaluate_suites(self, model, label: str, suites: bool) -> tuple[dict, dict]:
        results, items = {}, {}
        for name, suite in (self.dm.heldout_suites().items() if suites else ()):
            t1 = time.perf_counter()
            with self._scope(name):
                results[name] = suite.evaluate(model, self.tokenizer, self.dm.eval_batch_size)
            items[name] = dict(suite.last_items)
            log.info("evaluation '%s': %s (%d items) %s %.4g in %.0f s", label, name, len(suite.items),
                     suite.primary_metric, results[name][suite.primary_metric], time.perf_counter() - t1)
        return results, items

    def _recall_rows(self, records: dict[str, list]) -> tuple[list, list, list]:
        """Rows of R, R_heldout, R_contains (None for tasks not evaluated) from per-fact records."""
        n, tasks = self.dm.n_tasks, sorted(set(records["task"]))
        rows = []
        for templates, score in RECALL_FIGURES.values():
            means = ci.recall_task_means(records, tasks, self._templates(templates), score)
            rows.append([means.get(j) for j in range(n)])
        return tuple(rows)

    def _templates(self, which: str) -> list[str]:
        if which == "rephrased":
            return [REPHRASED]
        return list(self.dm.train_templates if which == "train" else self.dm.heldout_templates)

    def _figure_matrix(self, figure: str) -> list[list[float | None]]:
        """An accuracy matrix from the per-item records of every point (None: not evaluated)."""
        templates, score = {**RECALL_FIGURES, **REPHRASED_FIGURES}[figure]
        out = []
        for records in self.recall_items:
            means = ci.recall_task_means(records, sorted(set(records["task"])), self._templates(templates), score) \
                if records else {}
            out.append([means.get(j) for j in range(self.dm.n_tasks)])
        return out

    @property
    def has_rephrased(self) -> bool:
        return any(REPHRASED in records.get("template", ()) for records in self.recall_items if records)

    def _final_mean(self, row: list[float | None]) -> float | None:
        values = [v for v in row if v is not None]
        return sum(values) / len(values) if values else None

    def _add_point(self, label: str, row, row_h, row_c, results, items, recall_items) -> None:
        """Record one evaluation point and write the output files so far."""
        self.labels.append(label)
        self.R.append(row)
        self.R_heldout.append(row_h)
        self.R_contains.append(row_c)
        self.heldout.append(results)
        self.items.append(items)
        self.recall_items.append(recall_items)
        self._write_items(label, items, recall_items)
        self._write_progress()

    def _write_items(self, label: str, items: dict[str, dict[str, list]], recall_items: dict[str, list]) -> None:
        """Per-item scores of every suite and of fact recall (items/<point>/<suite>.csv,
        fact_recall.csv): each summary number is recomputed from them exactly (metrics.Aggregate)."""
        folder = items_folder(self.out_dir, label)
        folder.mkdir(parents=True, exist_ok=True)
        for name, columns in items.items():
            _write_columns(folder / f"{name}.csv", columns)
        if recall_items:
            _write_columns(folder / "fact_recall.csv", recall_items)

    # ---------------------------------------------------------------- intervals
    def _suite_intervals(self, point: int, name: str, metric: str) -> dict:
        """{"ci95", "change", "change_ci95", "rel_change", "rel_change_ci95"} of one suite metric at
        one point; the changes (paired with "before") only after training has started."""
        now = self.heldout[point][name][metric]
        out = {"ci95": None}
        if point > 0 and name in self.heldout[0]:
            before = self.heldout[0][name][metric]
            out.update(change=now - before, change_ci95=None, rel_change=relative_change(before, now), rel_change_ci95=None)
        cols = self.items[point].get(name) if point < len(self.items) else None
        if not self.resamples or not cols:
            return out
        agg = self.dm.heldout_suites()[name].aggregates[metric]
        out["ci95"] = _pair(ci.point_interval(agg, cols, self.resamples, self.interval_seed))
        before_cols = self.items[0].get(name) if self.items else None
        if "change" in out and before_cols:
            paired = ci.paired_intervals(agg, before_cols, cols, self.resamples, self.interval_seed)
            out["change_ci95"], out["rel_change_ci95"] = _pair(paired["change"]), _pair(paired["rel_change"])
        return out

    def _degradation(self) -> tuple[float | None, list[float] | None]:
        """Held-out degradation in % (metrics.degradation_pct) at the last point and its paired
        interval: in each resample, the mean over suites of the signed relative change (suites
        have unrelated items, so resample b of each suite together is a resample of all)."""
        suites, last = self.dm.heldout_suites(), len(self.heldout) - 1
        changes = {n: relative_change(self.heldout[0][n][s.primary_metric], self.heldout[last][n][s.primary_metric])
                   for n, s in suites.items()}
        point = degradation_pct([(changes[n], s.higher_is_better) for n, s in suites.items()])
        signed = []
        for n, s in suites.items():
            before, after = self.items[0].get(n), self.items[last].get(n) if last < len(self.items) else None
            if not self.resamples or not before or not after:
                return point, None
            if math.isnan(changes[n]):
                continue  # left out of the point estimate too
            b, a = ci.paired_resampled(s.aggregates[s.primary_metric], before, after, self.resamples, self.interval_seed)
            signed.append((-100.0 if s.higher_is_better else 100.0) * ci.relative_changes(b, a))
        return point, (_pair(ci.percentile_interval(np.mean(signed, axis=0))) if signed else None)

    def _recall_resampled(self, point: int, figure: str) -> dict[int, np.ndarray] | None:
        """Per evaluated task, the figure's task recall in every bootstrap resample."""
        records = self.recall_items[point] if point < len(self.recall_items) else None
        if not self.resamples or not records:
            return None
        templates, score = {**RECALL_FIGURES, **REPHRASED_FIGURES}[figure]
        return ci.recall_resampled(records, sorted(set(records["task"])), self._templates(templates), score,
                                   self.resamples, self.interval_seed)

    def _recall_intervals(self, figure: str, value: float, before: float) -> dict:
        """The final figure (mean over all tasks) with its interval and its paired change since before."""
        if value is None or before is None:
            return {"before": before, "after": value, "ci95": None, "change": None, "change_ci95": None,
                    "rel_change": None, "rel_change_ci95": None}
        out = {"before": before, "after": value, "ci95": None, "change": value - before, "change_ci95": None,
               "rel_change": relative_change(before, value), "rel_change_ci95": None}
        final, first = self._recall_resampled(len(self.R) - 1, figure), self._recall_resampled(0, figure)
        if final is None or first is None:
            return out
        tasks = [j for j in range(self.dm.n_tasks) if j in final and j in first]  # rephrased: the tasks that have them
        if not tasks:
            return out
        after_b = sum(final[j] for j in tasks) / len(tasks)
        before_b = sum(first[j] for j in tasks) / len(tasks)
        out["ci95"] = _pair(ci.percentile_interval(after_b))
        out["change_ci95"] = _pair(ci.percentile_interval(after_b - before_b))
        out["rel_change_ci95"] = _pair(ci.percentile_interval(ci.relative_changes(before_b, after_b)))
        return out

    def _other_fact_answers(self) -> dict:
        """Of the final point's wrong answers (exact match 0), how many give another taught fact's
        answer instead (an alias of any other fact of the stream, exact match of the first line):
        per group of templates (trained questions, held-out template, rephrased), with counts."""
        records = self.recall_items[-1] if self.recall_items else {}
        if not records:
            return {}
        facts = {f.id: f for j in range(self.dm.n_tasks) for f in self.dm.task_facts(j)}
        groups = {"trained": set(self.dm.train_templates), "heldout_template": set(self.dm.heldout_templates),
                  "rephrased": {REPHRASED}}
        out = {}
        for group, templates in groups.items():
            wrong = other = 0
            for fact_id, template, prediction, em in zip(records["id"], records["template"], records["prediction"],
                                                          records["em"]):
                if template not in templates or em:
                    continue
                wrong += 1
                line = prediction.split("\n", 1)[0].strip().rstrip(".")
                other += any(exact_match(line, f.aliases) for fid, f in facts.items() if fid != fact_id)
            if wrong or group != "rephrased":
                out[group] = {"wrong": wrong, "other_fact_answer": other, "share": other / wrong if wrong else None}
        return out

    def _log(self, trainer, point: int) -> None:
        metrics = {}
        for j, v in enumerate(self.R[point]):
            if v is not None:
                metrics[f"recall/task{j}"] = v
                metrics[f"recall_heldout_template/task{j}"] = self.R_heldout[point][j]
        if self.has_rephrased:
            for j, v in enumerate(self._figure_matrix("fact_recall_rephrased")[point]):
                if v is not None:
                    metrics[f"recall_rephrased/task{j}"] = v
        for suite, vals in self.heldout[point].items():
            metrics.update({f"heldout/{suite}/{k}": v for k, v in vals.items()})
        metrics["eval_point"] = point
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=trainer.global_step)

    def on_train_start(self, trainer, module) -> None:
        if trainer.is_global_zero:
            self._evaluate_before(trainer, module)
        trainer.strategy.barrier("evaluation before")
        module.model.train()

    def _evaluate_before(self, trainer, module) -> None:
        if not self.labels:  # not a resumed run: the baseline row, over every task
            cached = self.before_cache.load() if self.before_cache is not None else None
            if cached is not None:
                log.info("evaluation 'before': loaded from %s (same base model and evaluation setup)", self.before_cache.path)
                self.before_from_cache = True
                self._add_point("before", cached["R"], cached["R_heldout"], cached["R_contains"], cached["heldout"],
                                cached["items"], cached["recall_items"])
            else:
                self._evaluate(module, "before", range(self.dm.n_tasks))
                if self.before_cache is not None:
                    self.before_cache.save({"R": self.R[0], "R_heldout": self.R_heldout[0],
                                            "R_contains": self.R_contains[0], "heldout": self.heldout[0],
                                            "items": self.items[0], "recall_items": self.recall_items[0]})
            self._log(trainer, 0)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        _synchronize(module.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        _synchronize(module.device)
        self.train_seconds += time.perf_counter() - self._t0
        if module._micro == 0:
            self.steps += 1

    def on_train_epoch_end(self, trainer, module) -> None:
        task = trainer.current_epoch
        last = task == self.dm.n_tasks - 1
        if trainer.is_global_zero:
            self._evaluate(module, f"after task {task}", range(task + 1), suites=last or self.suites_at == "every_task")
            self._log(trainer, len(self.R) - 1)
            if last:
                self._finish(trainer, module)
        trainer.strategy.barrier(f"evaluation after task {task}")
        module.model.train()
        if last:
            self._finished = True  # on every rank: the run is complete

    # ---------------------------------------------------------------- files
    def _write_progress(self) -> None:
        n = self.dm.n_tasks
        matrices = [("accuracy_matrix.csv", self.R), ("accuracy_matrix_heldout_template.csv", self.R_heldout)]
        if self.has_rephrased:
            matrices.append(("accuracy_matrix_rephrased.csv", self._figure_matrix("fact_recall_rephrased")))
        for name, mat in matrices:
            lines = ["eval_point," + ",".join(f"task_{j}" for j in range(n))]
            for label, row in zip(self.labels, mat):
                lines.append(label + "," + ",".join("" if v is None else f"{v:.6f}" for v in row))
            _atomic_write(self.out_dir / name, "\n".join(lines) + "\n")
        suites = self.dm.heldout_suites()
        rows = []
        for point, (label, results) in enumerate(zip(self.labels, self.heldout)):
            for suite, vals in results.items():
                for metric, value in vals.items():
                    iv = self._suite_intervals(point, suite, metric)
                    rows.append({
                        "eval_point": point, "label": label, "after_task": point - 1, "suite": suite, "metric": metric,
                        "value": value, "primary": metric == suites[suite].primary_metric,
                        "higher_is_better": suites[suite].higher_is_better if metric == suites[suite].primary_metric else "",
                        **_csv_interval("ci95", iv["ci95"]),
                        "change": iv.get("change", ""), **_csv_interval("change_ci95", iv.get("change_ci95")),
                        "rel_change": _csv_value(iv.get("rel_change")),
                        **_csv_interval("rel_change_ci95", iv.get("rel_change_ci95")),
                    })
        tmp = self.out_dir / "heldout.csv.tmp"
        with tmp.open("w", newline="") as f:
            # the header from the first row, or (no held-out suites configured) from a blank one
            fields = list(rows[0]) if rows else ["eval_point", "label", "after_task", "suite", "metric", "value"]
            w = csv.DictWriter(f, fieldnames=fields)
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
            last = len(self.heldout) - 1
            iv = self._suite_intervals(last, name, metric)
            heldout[name] = {"metric": metric, "before": before, "after": now, "ci95": iv["ci95"],
                             "before_ci95": self._suite_intervals(0, name, metric)["ci95"],
                             "change": iv["change"], "change_ci95": iv["change_ci95"],
                             "rel_change": relative_change(before, now), "rel_change_ci95": iv["rel_change_ci95"],
                             "higher_is_better": suite.higher_is_better,
                             "all_before": self.heldout[0][name], "all_after": self.heldout[-1][name],
                             "all_after_ci95": {m: self._suite_intervals(last, name, m)["ci95"] for m in self.heldout[-1][name]}}
        recall = {}
        for figure, mat in zip(RECALL_FIGURES, (self.R, self.R_heldout, self.R_contains)):
            recall[figure] = self._recall_intervals(figure, sum(mat[-1]) / n, sum(mat[0]) / n)
        rephrased = {}
        if self.has_rephrased:
            for figure in REPHRASED_FIGURES:
                mat = self._figure_matrix(figure)
                recall[figure] = self._recall_intervals(figure, self._final_mean(mat[-1]), self._final_mean(mat[0]))
                rephrased[figure] = recall[figure]["after"]
            rephrased["accuracy_matrix_rephrased"] = self._figure_matrix("fact_recall_rephrased")
        rephrased["wrong_answer_is_other_fact"] = self._other_fact_answers()
        degradation, degradation_ci = self._degradation()
        history = module.updated_params_history
        self._summary = _clean({
            **self.run_info,
            "n_tasks": n,
            "facts_per_task": self.dm.facts_per_task,
            "fact_recall": sum(final) / n,
            "fact_recall_heldout_template": sum(final_h) / n,
            # the gold alias anywhere in the greedy answer: counts "Niger Niger Niger" (exact match does not)
            "fact_recall_contains": sum(self.R_contains[-1]) / n if self.R_contains else None,
            # the same facts asked in other words, never trained (null: no fact has rephrasings)
            "fact_recall_rephrased": rephrased.get("fact_recall_rephrased"),
            "fact_recall_rephrased_contains": rephrased.get("fact_recall_rephrased_contains"),
            **{f"{figure}_ci95": r["ci95"] for figure, r in recall.items()},
            "recall": recall,  # each figure before/after training, its interval, the paired change
            "acc": cl["acc"],
            "bwt": cl["bwt"],
            "forgetting": cl["forgetting"],
            "heldout": heldout,
            "heldout_degradation_pct": degradation,  # mean over suites of the primary metric's worsening, %
            "heldout_degradation_pct_ci95": degradation_ci,
            "steps": self.steps,
            "seconds_per_step": self.train_seconds / max(self.steps, 1),
            "eval_seconds": self.eval_seconds,
            "before_eval_from_cache": self.before_from_cache,
            "peak_rss_mb": peak_rss_mb(),
            "peak_gpu_mb": peak_gpu_mb(module.device),  # null on CPU
            "trainable_params": module.trainable_param_count(),
            "updated_params_per_step": sum(history) / len(history) if history else 0,
            **module.summary_extras(),  # the method's own figures (SMF: capacity of the memory)
            "accuracy_matrix": self.R,
            "accuracy_matrix_heldout_template": self.R_heldout,
            "accuracy_matrix_rephrased": rephrased.get("accuracy_matrix_rephrased"),
            # of the wrong final answers, the share that is another taught fact's answer (collapse onto a
            # few taught answers would otherwise pass for generalisation)
            "wrong_answer_is_other_fact": rephrased["wrong_answer_is_other_fact"],
            "eval_points": self.labels,
            "data": self.dm.info,
        })
        _atomic_write(self.out_dir / "summary.json", json.dumps(self._summary, indent=2))
        if self.plots:
            self._plot(trainer)

    def _plot(self, trainer) -> None:
        pngs = [
            plot_accuracy_matrix(self.R, self.labels, self.out_dir / "accuracy_matrix.png", "fact recall R (training templates)"),
            plot_accuracy_matrix(self.R_heldout, self.labels, self.out_dir / "accuracy_matrix_heldout_template.png", "fact recall R (held-out template)"),
        ]
        if self.has_rephrased:
            pngs.append(plot_accuracy_matrix(self._figure_matrix("fact_recall_rephrased"), self.labels,
                                             self.out_dir / "accuracy_matrix_rephrased.png",
                                             "fact recall R (rephrased questions, never trained)"))
        suites = self.dm.heldout_suites()
        curves = {f"{n} {s.primary_metric}": [h[n][s.primary_metric] if n in h else None for h in self.heldout]
                  for n, s in suites.items()}
        R_ci = []
        for point in range(len(self.R)):
            per_task = self._recall_resampled(point, "fact_recall") or {}
            R_ci.append([ci.percentile_interval(per_task[j]) if j in per_task else None for j in range(self.dm.n_tasks)])
        rel_ci = {f"{n} {s.primary_metric}": [self._suite_intervals(p, n, s.primary_metric).get("rel_change_ci95")
                                              if n in h else None for p, h in enumerate(self.heldout)]
                  for n, s in suites.items()}
        pngs.append(plot_forgetting_curves(self.R, curves, self.labels, self.out_dir / "forgetting_curves.png", R_ci, rel_ci))
        run = wandb_run(trainer)
        if run is not None:
            import wandb

            run.log({p.stem: wandb.Image(str(p)) for p in pngs})
            cols = ["eval_point"] + [f"task_{j}" for j in range(self.dm.n_tasks)]
            run.log({"accuracy_matrix": wandb.Table(columns=cols, data=[[lab] + row for lab, row in zip(self.labels, self.R)])})

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("labels", "R", "R_heldout", "R_contains", "heldout", "items", "recall_items",
                                              "train_seconds", "steps", "eval_seconds", "before_from_cache")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        for k in ("items", "recall_items"):  # a checkpoint from before per-item scores: no intervals for its points
            if k not in state:
                setattr(self, k, [{} for _ in self.labels])
