"""Cluster sweeps (docs/usage.md "Scaling out"): ``hydra/launcher=local`` runs a sweep through the submitit code path
of ``hydra/launcher=slurm`` (every point a separate job process) and writes the sweep_summary.csv
that Hydra's basic launcher writes; a job that runs again after being stopped (what a SLURM
requeue does: the same call in the same job directory) resumes from its last task checkpoint.

The interruption is deterministic: ``debug.stop_after_task=0`` SIGKILLs the job right after
task 0's checkpoint is on disk (interrupt.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from smf_lightning.callbacks.sweep import resume_overrides
from test_train import TINY, check_contract, cli

MACHINE_DEPENDENT = {"seconds_per_step", "peak_rss_mb"}  # timing and memory columns differ between any two runs
SWEEP = [*TINY, "method.selector=kl,tfidf"]


def _rows(sweep_dir: Path) -> list[dict]:
    return list(csv.DictReader((sweep_dir / "sweep_summary.csv").open()))


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory) -> Path:
    sweep = tmp_path_factory.mktemp("local_sweep")
    res = cli(["-m", "hydra/launcher=local", *SWEEP, f"hydra.sweep.dir={sweep}"])
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "Submitit 'local' sweep output dir" in res.stdout + res.stderr  # really the submitit launcher
    return sweep


def test_local_launcher_writes_the_basic_launchers_sweep_summary(local_sweep, tmp_path):
    res = cli(["-m", *SWEEP, f"hydra.sweep.dir={tmp_path}"])
    assert res.returncode == 0, res.stderr[-3000:]
    for job in ("0", "1"):
        check_contract(local_sweep / job)
    local, basic = _rows(local_sweep), _rows(tmp_path)
    assert list(local[0]) == list(basic[0])  # the same columns, in the same order
    assert [r["selector"] for r in local] == ["kl", "tfidf"]
    for a, b in zip(local, basic, strict=True):
        assert {k: v for k, v in a.items() if k not in MACHINE_DEPENDENT} == \
               {k: v for k, v in b.items() if k not in MACHINE_DEPENDENT}
    assert (local_sweep / "learning_vs_forgetting.png").stat().st_size > 1000


def test_a_job_that_runs_again_resumes_from_its_last_task_checkpoint(local_sweep, tmp_path):
    """The first launch is killed after task 0; launching the identical command again (a requeue
    runs the same call with the same arguments in the same job directory) resumes after task 0
    and ends with the uninterrupted job's results."""
    cmd = ["-m", "hydra/launcher=local", *TINY, "method.selector=kl",
           "debug.stop_after_task=0", f"hydra.sweep.dir={tmp_path}"]
    first = cli(cmd)
    assert first.returncode != 0  # the job was killed
    job = tmp_path / "0"
    assert (job / "checkpoints" / "last.ckpt").is_file() and not (job / "summary.json").exists()
    again = cli(cmd)
    logs = again.stdout + again.stderr + "".join(p.read_text() for p in (tmp_path / ".submitit").rglob("*_log.*"))
    assert again.returncode == 0, logs[-3000:]
    assert f"resuming from {job / 'checkpoints' / 'last.ckpt'}" in logs
    resumed, ref = json.loads((job / "summary.json").read_text()), json.loads((local_sweep / "0" / "summary.json").read_text())
    assert resumed["selector"] == ref["selector"] == "kl"
    for key in ("accuracy_matrix", "accuracy_matrix_heldout_template", "fact_recall", "steps", "updated_params_per_step"):
        assert resumed[key] == ref[key], key
    assert (job / "accuracy_matrix.csv").read_text() == (local_sweep / "0" / "accuracy_matrix.csv").read_text()


def test_resume_overrides(tmp_path):
    base = ["experiment=tiny", "method.selector=kl"]
    assert resume_overrides(tmp_path, base) == base  # never ran: start from scratch
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    assert resume_overrides(tmp_path, base) == [*base, f"ckpt_path={ckpt}"]  # stopped after a task
    assert resume_overrides(tmp_path, [*base, "ckpt_path=/elsewhere.ckpt"]) == [*base, "ckpt_path=/elsewhere.ckpt"]
    (tmp_path / "summary.json").write_text("{}")
    assert resume_overrides(tmp_path, base) == base  # finished: nothing to resume (the job skips: resume_sweep_job)


def test_a_study_launched_again_skips_finished_jobs_and_resumes_stopped_ones(tmp_path):
    """A study is a multirun into a fixed hydra.sweep.dir, launched again until done (Hydra's basic
    launcher: the jobs run in this process, so the kill after job 0's task 0 stops the sweep). The
    second launch resumes job 0 after task 0 and runs job 1; the third runs nothing."""
    sweep = ["-m", *TINY, "method.selector=kl,tfidf", f"hydra.sweep.dir={tmp_path}"]
    first = cli([*sweep, "debug.stop_after_task=0"])
    assert first.returncode != 0  # killed
    ckpt = tmp_path / "0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and not (tmp_path / "0" / "summary.json").exists() and not (tmp_path / "1").exists()
    second = cli(sweep)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert f"resuming from {ckpt}" in second.stdout + second.stderr
    summaries = [check_contract(tmp_path / job) for job in ("0", "1")]
    assert [s["selector"] for s in summaries] == ["kl", "tfidf"]
    assert summaries[0]["steps"] == summaries[1]["steps"]  # the resumed job trained both tasks' steps
    mtimes = [(tmp_path / job / "summary.json").stat().st_mtime_ns for job in ("0", "1")]
    third = cli(sweep)
    assert third.returncode == 0, (third.stdout + third.stderr)[-3000:]
    assert (third.stdout + third.stderr).count("finished earlier (summary.json): skipped") == 2
    assert [(tmp_path / job / "summary.json").stat().st_mtime_ns for job in ("0", "1")] == mtimes
    assert len(_rows(tmp_path)) == 2  # the sweep summary still has both jobs
    other = cli(["-m", *TINY, "method.selector=kl", "method.top_t=8", f"hydra.sweep.dir={tmp_path}"])  # another sweep, job 0
    assert other.returncode == 2 and "holds a run of other overrides" in other.stdout + other.stderr
    assert (tmp_path / "0" / "summary.json").stat().st_mtime_ns == mtimes[0]
