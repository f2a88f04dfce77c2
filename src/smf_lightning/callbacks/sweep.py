"""Sweeps: the Hydra callback that, when a multirun sweep ends, collects every job's
summary.json into ``sweep_summary.csv`` and draws the learning-vs-forgetting plot in the sweep
directory; and how the jobs of the submitit launchers of ``hydra/launcher=slurm`` /
``hydra/launcher=local`` (conf/hydra/launcher/; the classes live in
``hydra_plugins/smf_lightning_launcher``, the package Hydra takes launchers from) resume from
their last task checkpoint when they run again.

A SLURM job runs again after a time limit (submitit's USR2 ``signal_delay_s`` before it:
``checkpoint()`` resubmits the same call, up to ``max_num_timeout`` times) or after a
preemption that SLURM requeues: either way the same launcher call starts over in the same job
directory. :func:`resume_overrides` then adds ``ckpt_path=<job dir>/checkpoints/last.ckpt``
when that directory holds a task checkpoint and no ``summary.json`` (the job had not finished),
so the run continues after its last completed task with nothing of the completed tasks lost
(callbacks/checkpoint.py writes the checkpoint atomically after every task).

A study is a multirun into a fixed ``hydra.sweep.dir`` (the row configs of experiments/<study>/conf/,
e.g. experiments/recipe/), launched again until every job is done: :func:`resume_sweep_job`, called
by the job itself under any launcher (Hydra's basic one included), skips a job whose folder holds
a summary.json and resumes one that stopped after a task.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from ..eval.metrics import degradation_pct
from .plots import plot_pareto

log = logging.getLogger(__name__)

COLUMNS = [
    "job", "method", "selector", "top_t", "lr", "fact_recall", "fact_recall_heldout_template",
    "fact_recall_rephrased", "fact_recall_rephrased_contains",
    "acc", "bwt", "forgetting", "heldout_degradation_pct", "steps", "seconds_per_step",
    "peak_rss_mb", "trainable_params", "updated_params_per_step",
]


def heldout_degradation_pct(heldout: dict) -> float | None:
    """Mean over suites of how much worse the primary metric got, in % (positive = worse)."""
    return degradation_pct([(h.get("rel_change"), h.get("higher_is_better", True)) for h in heldout.values()])


def _interval_columns(prefix: str, interval) -> dict:
    low, high = interval if interval else (None, None)
    return {f"{prefix}_ci95_low": low, f"{prefix}_ci95_high": high}


def summarize_sweep(sweep_dir: Path) -> list[dict]:
    rows = []
    for f in sorted(sweep_dir.glob("*/summary.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
        s = json.loads(f.read_text())
        row = {k: s.get(k) for k in COLUMNS}
        row["job"] = f.parent.name
        row["lr"] = s.get("lr")
        row["heldout_degradation_pct"] = heldout_degradation_pct(s.get("heldout", {}))
        # 95% intervals (summary.json of runs with callbacks.intervals; empty for older runs)
        for key in ("fact_recall", "fact_recall_heldout_template", "fact_recall_rephrased", "heldout_degradation_pct"):
            row.update(_interval_columns(key, s.get(f"{key}_ci95")))
        for suite, h in s.get("heldout", {}).items():
            row[f"{suite}_rel_change"] = h.get("rel_change")
            row.update(_interval_columns(f"{suite}_rel_change", h.get("rel_change_ci95")))
        # lm-evaluation-harness tasks (callbacks.lm_eval): after the stream and the change since before
        for task, metrics in (s.get("lm_eval") or {}).items():
            for metric, m in metrics.items():
                row[f"lm_eval/{task}/{metric}"] = m.get("after")
                row[f"lm_eval/{task}/{metric}_rel_change"] = m.get("rel_change")
        rows.append(row)
    if not rows:
        return rows
    cols = COLUMNS + sorted({k for r in rows for k in r} - set(COLUMNS))
    with (sweep_dir / "sweep_summary.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    def interval(r, key):
        low, high = r[f"{key}_ci95_low"], r[f"{key}_ci95_high"]
        return None if low is None or high is None else (low, high)

    points = [
        {
            "fact_recall": r["fact_recall"],
            "forgetting_pct": r["heldout_degradation_pct"],
            "fact_recall_ci95": interval(r, "fact_recall"),
            "forgetting_pct_ci95": interval(r, "heldout_degradation_pct"),
            "label": f"{r['method']}" + (f" {r['selector']} t={r['top_t']}" if r.get("selector") else "") + f" lr={r['lr']}",
        }
        for r in rows
        if r["fact_recall"] is not None and r["heldout_degradation_pct"] is not None
    ]
    if points:
        plot_pareto(points, sweep_dir / "learning_vs_forgetting.png")
    return rows


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = summarize_sweep(sweep_dir)
        if rows:
            log.info("sweep summary of %d jobs: %s", len(rows), sweep_dir / "sweep_summary.csv")
        else:
            log.warning("no job of the sweep in %s wrote a summary.json; nothing to summarise", sweep_dir)


# ---- submitit launchers whose jobs resume -----------------------------------------------------

CHECKPOINT = Path("checkpoints") / "last.ckpt"  # under the job's output dir (conf/callbacks: checkpoint.dirpath)


def resume_checkpoint(job_dir: Path) -> Path | None:
    """The job's last task checkpoint when it stopped before finishing (checkpoint present, no summary.json)."""
    ckpt = Path(job_dir) / CHECKPOINT
    if not ckpt.is_file() or (Path(job_dir) / "summary.json").is_file():
        return None
    log.warning("job %s ran before and stopped after a completed task: resuming from %s", job_dir, ckpt)
    return ckpt


def resume_overrides(job_dir: Path, overrides: list[str]) -> list[str]:
    """The job's overrides, plus ``ckpt_path=`` its last task checkpoint when it stopped before
    finishing and no checkpoint was given explicitly."""
    if any(o.lstrip("+~").startswith("ckpt_path=") for o in overrides):
        return list(overrides)
    ckpt = resume_checkpoint(job_dir)
    return list(overrides) if ckpt is None else [*overrides, f"ckpt_path={ckpt}"]


def resume_sweep_job(cfg: DictConfig) -> dict | None:
    """In a multirun job whose folder a launch of the same sweep used before: its summary when
    it finished (summary.json; the job is skipped, the sweep's other jobs run), else None, with
    ``cfg.ckpt_path`` set to its last task checkpoint when it stopped after a task. Single runs
    (a fixed ``hydra.run.dir``) always run: rerunning one is asked for explicitly."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    job_dir = Path(cfg.paths.output_dir)
    _check_same_job(job_dir, list(HydraConfig.get().overrides.task))
    if (job_dir / "summary.json").is_file():
        log.warning("job %s finished earlier (summary.json): skipped; remove its folder to run it again", job_dir)
        return json.loads((job_dir / "summary.json").read_text())
    if cfg.get("ckpt_path") is None:
        ckpt = resume_checkpoint(job_dir)
        if ckpt is not None:
            cfg.ckpt_path = str(ckpt)
    return None


JOB_OVERRIDES = "job_overrides.json"  # what makes a job folder's run this job (job folders are numbered)


def _check_same_job(job_dir: Path, overrides: list[str]) -> None:
    """Skipping or resuming is right only for the same job: a job folder records its overrides
    (ckpt_path and debug.* aside) the first time it runs; another sweep's job in it stops here
    (.hydra/overrides.yaml cannot tell: Hydra rewrites it before the job starts)."""
    from ..errors import ConfigError

    mine = [o for o in overrides if not o.lstrip("+~").startswith(("ckpt_path=", "debug."))]
    record = job_dir / JOB_OVERRIDES
    if not record.is_file():  # a fresh folder (or one from before the record: trusted)
        job_dir.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(mine, indent=1))
        return
    earlier = json.loads(record.read_text())
    if earlier != mine:
        raise ConfigError(
            f"bad sweep: the job folder {job_dir} holds a run of other overrides ({' '.join(earlier)}), not "
            f"this job's ({' '.join(mine)}). Launch a study again with the same command, or give this sweep "
            f"its own hydra.sweep.dir."
        )
