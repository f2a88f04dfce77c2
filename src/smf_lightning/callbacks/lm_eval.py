"""lm-evaluation-harness as an extra evaluator (``callbacks.lm_eval``, optional:
``pip install .[lm_eval]``): at the first and last evaluation points of a run (before training,
after the last task: the points where callbacks/evaluation.py scores the held-out suites under
either ``suites_at``) it runs ``lm_eval.simple_evaluate`` on the in-memory model and tokenizer
and records the results beside ours: ``lm_eval.json`` (every point's metrics per task),
``items/<point>/lm_eval_<task>.csv`` (per-document scores) and ``summary.json["lm_eval"]``
(``<task>.<metric>.before / after / change``, shaped like ``summary.json["heldout"]``).

Training is unaffected: ``simple_evaluate`` reseeds Python's, NumPy's and torch's global RNGs
unless its seeds are None, and some tasks' document processing draws from ``random`` itself, so
the seeds are passed as None *and* the global RNG states are restored after the call. The
few-shot sampler has its own generator (``fewshot_seed``), so few-shot examples are the same
at both points without touching the global state.

Data parallel (DDP): like our own evaluation, rank 0 evaluates while the other ranks wait at a
barrier (every rank holds the same weights)."""

from __future__ import annotations

import contextlib
import csv
import difflib
import functools
import importlib.util
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from ..errors import ConfigError
from ..eval.metrics import items_folder, relative_change
from .evaluation import ContinualEvaluation

log = logging.getLogger(__name__)

INSTALL_HINT = "lm-evaluation-harness is an optional dependency: pip install .[lm_eval] (or pip install 'lm-eval>=0.4.10,<0.5')"


def check_lm_eval_config(entry, key: str = "callbacks.lm_eval") -> None:
    """A clear error before any model loads: tasks a list of names, lm-eval installed when
    there are any, include_path an existing folder or file, task names known to lm-eval."""
    tasks, include_path = entry.get("tasks"), entry.get("include_path")
    if tasks is None or isinstance(tasks, (str, bytes)) or not _is_list(tasks):
        raise ConfigError(f"bad config: {key}.tasks={tasks!r}: use a list of lm-eval task names, e.g. "
                          f"`{key}.tasks=[hellaswag,arc_easy]` ([]: off).")
    tasks = list(tasks)
    if not all(isinstance(t, str) and t for t in tasks):
        raise ConfigError(f"bad config: {key}.tasks={tasks!r}: every entry is an lm-eval task name (a string).")
    for name, ok in (("limit", lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0)),
                     ("num_fewshot", lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0))):
        if not ok(entry.get(name)):
            raise ConfigError(f"bad config: {key}.{name}={entry.get(name)!r}: use "
                              + ("null (every document), a count > 0 or a share < 1" if name == "limit"
                                 else "null (each task's own default) or a count >= 0") + ".")
    if not tasks:
        return
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(f"bad config: {key}.tasks={tasks} needs lm-eval, which is not installed. {INSTALL_HINT}.")
    if include_path is not None and not Path(str(include_path)).exists():
        raise ConfigError(f"bad config: {key}.include_path={include_path!r} does not exist: point it at a folder of "
                          f"lm-eval task YAMLs (or one YAML file), or set it to null.")
    known = task_manager(None if include_path is None else str(include_path)).all_tasks
    unknown = [t for t in tasks if t not in known]
    if unknown:
        hints = {t: difflib.get_close_matches(t, known, n=3) for t in unknown}
        raise ConfigError(f"bad config: {key}.tasks: lm-eval knows no task {', '.join(map(repr, unknown))}"
                          + "".join(f" (close: {', '.join(h)})" for t, h in hints.items() if h)
                          + (f" in its own tasks or {key}.include_path={include_path!r}" if include_path else
                             f"; a task of one's own needs {key}.include_path=<folder of its YAML>") + ".")


def _is_list(value) -> bool:
    from omegaconf import ListConfig

    return isinstance(value, (list, tuple, ListConfig))


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None):
    """lm-eval's index of its tasks and those under ``include_path``; built once per process
    (indexing lm-eval's ~15k task YAMLs takes seconds), shared by the config check and the run."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


@contextlib.contextmanager
def global_rng_kept(device: torch.device):
    """Python's, NumPy's and torch's global RNG states (CPU, and the CUDA device of the model)
    are as before when the block ends, whatever it drew or reseeded."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def numeric_metrics(task_results: dict) -> dict[str, float]:
    """lm-eval's per-task results {"acc,none": .., "acc_stderr,none": .., "alias": ..} as
    {"acc": .., "acc_stderr": ..}; a filter other than "none" stays in the name ("exact_match,strict-match")."""
    out = {}
    for key, value in task_results.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or key == "sample_len":
            continue  # "alias", a stderr of "N/A", the document count (kept as "documents")
        metric, _, filt = key.partition(",")
        out[metric if filt in ("", "none") else key] = float(value)
    return out


def evaluate_with_lm_eval(model, tokenizer, tasks: list[str], *, include_path: str | None = None, limit=None,
                          num_fewshot: int | None = None, batch_size: int = 8, bootstrap_iters: int = 100000,
                          fewshot_seed: int | None = 1234) -> dict:
    """``lm_eval.simple_evaluate`` on an in-memory model, global RNGs untouched: its result
    (``results``, ``samples`` per document, ``n-samples``, ...)."""
    import copy

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    device = next(model.parameters()).device
    was_training = model.training
    # lm-eval may give the tokenizer it gets a pad token; ours is shared with our own suites
    lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
    try:
        with global_rng_kept(device), torch.no_grad():
            return lm_eval.simple_evaluate(
                model=lm, tasks=list(tasks), task_manager=task_manager(include_path), limit=limit,
                num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters, log_samples=True,
                # None: lm-eval leaves the global RNGs alone (its defaults reseed them, which would change training)
                random_seed=None, numpy_random_seed=None, torch_random_seed=None,
                fewshot_random_seed=fewshot_seed,  # its own generator: the same few-shot examples at both points
            )
    finally:
        model.train(was_training)  # HFLM switches the model to eval mode


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _finite(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


class LmEvalHarness(L.Callback):
    """lm-evaluation-harness tasks at the first and last evaluation points (module docstring)."""

    def __init__(self, tasks: list[str], include_path: str | None = None, limit=None, num_fewshot: int | None = None,
                 batch_size: int = 8, bootstrap_iters: int = 100000, fewshot_seed: int | None = 1234):
        self.tasks = list(tasks)
        self.include_path = None if include_path is None else str(include_path)
        self.options = {"limit": limit, "num_fewshot": num_fewshot, "batch_size": int(batch_size),
                        "bootstrap_iters": int(bootstrap_iters), "fewshot_seed": fewshot_seed}
        self.points: list[dict] = []  # per evaluation point: label, seconds, task -> metrics, documents
        self.evaluator: ContinualEvaluation | None = None

    def setup(self, trainer, module, stage: str) -> None:
        found = [cb for cb in trainer.callbacks if isinstance(cb, ContinualEvaluation)]
        if len(found) != 1:
            raise RuntimeError("callbacks.lm_eval records its results beside the run's evaluation callback; "
                               f"the Trainer has {len(found)} ContinualEvaluation callbacks")
        self.evaluator = found[0]

    # ---------------------------------------------------------------- points
    def on_train_start(self, trainer, module) -> None:
        if self.tasks and not self.points:  # a resumed run has its "before" point in the checkpoint
            if trainer.is_global_zero:
                if self.evaluator.labels == ["before"]:  # training has not started
                    self._evaluate(module, "before")
                else:  # resumed from a checkpoint of a run without lm-eval: there is no "before" to measure
                    log.warning("lm-eval: resumed run without an lm-eval 'before' point; only the last point is measured")
            trainer.strategy.barrier("lm_eval before")

    def on_train_epoch_end(self, trainer, module) -> None:
        ev = self.evaluator
        if not self.tasks or trainer.current_epoch != ev.dm.n_tasks - 1:
            return
        if trainer.is_global_zero:
            self._evaluate(module, ev.labels[-1] if ev.labels else f"after task {trainer.current_epoch}")
            ev.extend_summary({"lm_eval": self.summary()})
        trainer.strategy.barrier("lm_eval after the last task")

    def _evaluate(self, module, label: str) -> None:
        log.info("lm-eval '%s': tasks %s ...", label, ", ".join(self.tasks))
        t0 = time.perf_counter()
        out = evaluate_with_lm_eval(module.model, self.evaluator.tokenizer, self.tasks, include_path=self.include_path,
                                    **self.options)
        seconds = time.perf_counter() - t0
        results = {task: numeric_metrics(r) for task, r in out["results"].items()}
        documents = {task: int(n.get("effective", 0)) for task, n in out.get("n-samples", {}).items()}
        self.points.append({"label": label, "seconds": seconds, "results": results, "documents": documents})
        self._write_items(label, out.get("samples", {}))
        self._write()
        for task, metrics in results.items():
            log.info("lm-eval '%s': %s %s", label, task,
                     ", ".join(f"{m} {v:.4g}" for m, v in metrics.items() if not m.endswith("_stderr")))
        log.info("lm-eval '%s' in %.0f s", label, seconds)

    # ---------------------------------------------------------------- files
    @property
    def out_dir(self) -> Path:
        return self.evaluator.out_dir

    def _write_items(self, label: str, samples: dict[str, list[dict]]) -> None:
        """Per-document scores (doc_id and every per-document metric) of each task at one point."""
        folder = items_folder(self.out_dir, label)
        folder.mkdir(parents=True, exist_ok=True)
        for task, rows in samples.items():
            metrics = [k for k, v in (rows[0].items() if rows else ())
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "doc_id"]
            tmp = folder / f"lm_eval_{task}.csv.tmp"
            with tmp.open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["doc_id", *metrics])
                w.writerows([r["doc_id"], *(r[m] for m in metrics)] for r in sorted(rows, key=lambda r: r["doc_id"]))
            os.replace(tmp, folder / f"lm_eval_{task}.csv")

    def _write(self) -> None:
        from importlib.metadata import version

        _atomic_write(self.out_dir / "lm_eval.json", json.dumps({
            "tasks": self.tasks, "include_path": self.include_path, **self.options, "lm_eval_version": version("lm_eval"),
            "points": self.points}, indent=2))

    def summary(self) -> dict:
        """summary.json's ``lm_eval``: task -> metric -> before / after / change (as ``heldout``)."""
        first = self.points[0]["results"] if self.points[0]["label"] == "before" else {}
        last = self.points[-1]["results"]
        out = {}
        for task, metrics in last.items():
            out[task] = {}
            for metric, after in metrics.items():
                if metric.endswith("_stderr"):
                    continue
                before = first.get(task, {}).get(metric)
                out[task][metric] = {
                    "before": before, "after": after,
                    "before_stderr": _finite(first.get(task, {}).get(metric + "_stderr")),
                    "after_stderr": _finite(metrics.get(metric + "_stderr")),
                    "change": None if before is None else after - before,
                    "rel_change": None if before is None else _finite(relative_change(before, after)),
                }
        return out

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        return {"points": self.points}

    def load_state_dict(self, state: dict) -> None:
        self.points = state.get("points", [])
