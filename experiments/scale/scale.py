"""The scale study (SCALE.md) as a Hydra multirun: does the recipe hold on a stream of 1,000 facts,
and what does each 200 facts more cost?

The row is a config ``conf/experiment/scale/<row>.yaml`` of this folder, put on Hydra's search path
by the multirun command: ``facts1000`` is the recipe (experiment=smf_recipe) on 1,000 unknown
TriviaQA facts, 25 tasks x 40, seed 0, whose first 5 tasks are the dev stream's 200 facts in the dev
stream's order (data.lead_stream), each with two evaluation-only rephrasings
(src/smf_lightning/data/rephrasings/); recall of every seen task after every task, the known-facts
suite and the four suites before training and after the last task.

    python experiments/scale/scale.py --list              # the multirun command, run nothing
    python experiments/scale/scale.py --only facts1000    # run (or resume) the row
    python experiments/scale/scale.py --report            # curve.csv, curve.png, the SCALE.md table

Runs live in $SMF_STUDY_RUNS/scale (default ~/.cache/smf_lightning/study_runs/scale); a stopped row
resumes from its last task checkpoint when launched again. --report writes the scaling curve of
each row, finished or still running (from its run folder): after every 200 facts, recall of the
trained questions of every fact seen so far (accuracy_matrix.csv), of the first 200 (the dev
stream's), rephrased recall where rephrasings exist (accuracy_matrix_rephrased.csv: the mean over
the tasks that have them, as summary.json's fact_recall_rephrased), the slots still free and the
slots per fact of the last task (summary.json capacity.per_task, or the run log's "capacity after
task" lines while it runs), steps and seconds (train.log: a task trains from the previous log line
to its "evaluation 'after task k'" line; its evaluation takes the "in N s" of that point's lines);
after the last task, known facts kept, each suite's relative change and BWT (summary.json). It saves
results/scale/curve.csv and curve.png and writes the table between the ``scale-table`` markers of
SCALE.md; a finished row's small files (and its train.log, the timing's source) are copied into
results/scale/<row>/ and packed into results/scale/rows.tar.xz.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import sys
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # experiments/: study.py and report.py, shared by the studies

from study import copy_small_files, finished_rows, pack_rows, runs_dir  # noqa: E402
from study import main as study_main  # noqa: E402
from study import multirun as study_multirun  # noqa: E402

RUNS = runs_dir("scale")
RESULTS = HERE / "results" / "scale"
CONF = HERE / "conf"  # the row configs: conf/experiment/scale/<row>.yaml, on Hydra's search path
MARKERS = ("<!-- scale-table:start -->", "<!-- scale-table:end -->")

ROWS = ("facts1000",)
SUITES = ("nq_open", "hellaswag", "gsm8k", "lambada")
EVERY = 200  # facts between two points of the curve (and the last task's point)
FIRST = 200  # the first facts: the dev stream's, the ones with rephrasings
# SCALE.md's targets at 1,000 facts: (curve column, at least / at most, bound); suites: |change| <= 1%
TARGETS = {"recall": (">=", 0.95), "rephrased": (">=", 0.80), "known_kept": (">=", 0.98), "bwt": (">=", -0.02),
           "train_hours": ("<=", 2.0), **{f"{s}_rel_change": ("|<=|", 0.01) for s in SUITES}}


def multirun(rows: tuple[str, ...] | list[str] = ROWS) -> list[str]:
    return study_multirun("scale", rows, RUNS, CONF)


# ----------------------------------------------------------------------------- a run's files


def read_matrix(path: Path) -> dict[str, list[float | None]]:
    """An accuracy matrix CSV (eval_point, task_0, ...) as label -> per-task values (None: blank)."""
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        return {row[0]: [float(v) if v != "" else None for v in row[1:]] for row in list(csv.reader(f))[1:] if row}


def run_shape(run: Path) -> tuple[int, int]:
    """(n_tasks, facts_per_task) of the run: summary.json, else the job's .hydra/config.yaml."""
    if (run / "summary.json").is_file():
        s = json.loads((run / "summary.json").read_text())
        return int(s["n_tasks"]), int(s["facts_per_task"])
    import yaml

    d = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["data"]
    return int(d["n_tasks"]), int(d["facts_per_task"])


LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[[^\]]*\]\[\w+\] - (.*)$")
EVAL_START = re.compile(r"evaluation 'after task (\d+)': fact recall of tasks")
EVAL_PART = re.compile(r"evaluation 'after task (\d+)': .* in (\d+(?:\.\d+)?) s$")
CAPACITY = re.compile(r"capacity after task (\d+) \(memory layer (\d+)\): (\d+) slots written \((\S+) per fact\), "
                      r"(\d+) of (\d+) owned, (\d+) free \((\d+) hub slots")


def log_lines(run: Path) -> list[tuple[datetime, str]]:
    """(time, message) of every record of the run's train.log (continuation lines dropped)."""
    f = run / "train.log"
    if not f.is_file():
        return []
    out = []
    for line in f.read_text(errors="replace").splitlines():
        m = LOG_LINE.match(line)
        if m:
            out.append((datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f"), m.group(2)))
    return out


def task_timing(run: Path) -> dict[int, dict]:
    """task -> {"train_s", "eval_s"}: its training, from the log record before its "evaluation
    'after task k': fact recall" line (the previous evaluation's end, or a resume's restore: nothing
    is logged while a task trains) to that line; its evaluation, the sum of that point's "in N s".
    A task trained twice (stopped, resumed from the previous task's checkpoint) counts its last try."""
    lines = log_lines(run)
    out: dict[int, dict] = {}
    for i, (t, msg) in enumerate(lines):
        m = EVAL_START.search(msg)
        if m and i > 0:
            out[int(m.group(1))] = {"train_s": (t - lines[i - 1][0]).total_seconds(), "eval_s": 0.0}
    for _, msg in lines:
        m = EVAL_PART.search(msg)
        if m and int(m.group(1)) in out:
            out[int(m.group(1))]["eval_s"] += float(m.group(2))
    return out


def task_capacity(run: Path) -> dict[int, dict]:
    """task -> {"free", "per_fact"} after it (the memory layer with the fewest free slots):
    summary.json capacity.per_task, or the log's "capacity after task" lines of a running row."""
    entries = []
    if (run / "summary.json").is_file():
        entries = (json.loads((run / "summary.json").read_text()).get("capacity") or {}).get("per_task") or []
    if not entries:
        for _, msg in log_lines(run):
            m = CAPACITY.search(msg)
            if m:
                entries.append({"task": int(m.group(1)), "layer": int(m.group(2)), "free": int(m.group(7)),
                                "per_fact": None if m.group(4) == "-" else float(m.group(4))})
    out: dict[int, dict] = {}
    for e in entries:
        if int(e["task"]) not in out or e["free"] < out[int(e["task"])]["free"]:
            out[int(e["task"])] = {"free": int(e["free"]), "per_fact": e.get("per_fact")}
    return out


def task_steps(run: Path) -> dict[int, int]:
    """task -> optimizer steps it took (slot_stats.csv: one row per step and memory layer)."""
    f = run / "slot_stats.csv"
    if not f.is_file():
        return {}
    steps: dict[int, set] = {}
    with f.open(newline="") as fh:
        for r in csv.DictReader(fh):
            steps.setdefault(int(float(r["task"])), set()).add(int(float(r["step"])))
    return {t: len(s) for t, s in steps.items()}


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


# ----------------------------------------------------------------------------- the curve


def curve(run: Path, every: int = EVERY, first: int = FIRST) -> list[dict]:
    """The scaling curve of one run (module doc): a point after every task that completes a
    multiple of ``every`` facts, and after the last task evaluated; figures of the final point
    (known kept, suites, BWT) only once the run is finished (summary.json)."""
    n_tasks, per_task = run_shape(run)
    R = read_matrix(run / "accuracy_matrix.csv")
    rephrased = read_matrix(run / "accuracy_matrix_rephrased.csv")
    timing, capacity, steps = task_timing(run), task_capacity(run), task_steps(run)
    done = [k for k in range(n_tasks) if f"after task {k}" in R]
    if not done:
        return []
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else None
    points = [k for k in done if ((k + 1) * per_task) % every == 0 or k == done[-1]]
    rows, prev = [], -1
    first_tasks = max(1, first // per_task)
    for k in points:
        row, block = R[f"after task {k}"], range(prev + 1, k + 1)
        reph = [v for v in rephrased.get(f"after task {k}", [])[:k + 1] if v is not None]
        train = [timing[t]["train_s"] for t in block if t in timing]
        n_steps = [steps[t] for t in block if t in steps]
        facts_block = len(block) * per_task
        timed = [t for t in range(k + 1) if t in timing]
        out = {
            "facts": (k + 1) * per_task, "after_task": k,
            "recall": _mean(row[:k + 1]),
            "recall_first": _mean(row[:min(first_tasks, k + 1)]),
            "rephrased": _mean(reph), "rephrased_tasks": len(reph),
            "free_slots": capacity.get(k, {}).get("free"), "slots_per_fact": capacity.get(k, {}).get("per_fact"),
            "steps": sum(n_steps) if len(n_steps) == len(block) else None,
            "seconds_per_step": sum(train) / sum(n_steps) if len(train) == len(n_steps) == len(block) and sum(n_steps) else None,
            "train_seconds_per_fact": sum(train) / facts_block if len(train) == len(block) else None,
            "eval_seconds": timing[k]["eval_s"] if k in timing else None,
            "train_hours": sum(timing[t]["train_s"] for t in timed) / 3600 if len(timed) == k + 1 else None,
            "hours": sum(timing[t]["train_s"] + timing[t]["eval_s"] for t in timed) / 3600 if len(timed) == k + 1 else None,
        }
        if summary is not None and k == n_tasks - 1:
            h = summary.get("heldout") or {}
            out.update({"known_kept": (h.get("triviaqa_known") or {}).get("after"), "bwt": summary.get("bwt"),
                        **{f"{s}_rel_change": h[s]["rel_change"] for s in SUITES if s in h}})
        rows.append(out)
        prev = k
    return rows


def target_checks(point: dict) -> dict[str, bool | None]:
    """Each of SCALE.md's targets met (True), missed (False) or not measured (None) at ``point``."""
    out = {}
    for key, (how, bound) in TARGETS.items():
        v = point.get(key)
        out[key] = None if v is None else (v >= bound if how == ">=" else v <= bound if how == "<=" else abs(v) <= bound)
    return out


# ----------------------------------------------------------------------------- the report


def _f(v, digits=3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:+.2f}%"


def _signed(v) -> str:
    return "–" if v is None else f"{v:+.3f}"


def _int(v) -> str:
    return "–" if v is None else f"{v:,}"


def markdown(curves: dict[str, list[dict]], partial: set[str]) -> str:
    head = ("| row | facts | recall (all seen) | recall (first 200) | rephrased (tasks) | free slots | slots/fact "
            "(last task) | steps | s/step | train s/fact | recall eval s | train h (cum.) | h (cum.) |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for name, points in curves.items():
        for p in points:
            lines.append(
                f"| {name}{' (running)' if name in partial else ''} | {p['facts']:,} | {_f(p['recall'])} | "
                f"{_f(p['recall_first'])} | {_f(p['rephrased'])} ({p['rephrased_tasks']}) | "
                f"{_int(p['free_slots'])} | {_f(p['slots_per_fact'], 0)} | "
                f"{_int(p['steps'])} | {_f(p['seconds_per_step'], 1)} | "
                f"{_f(p['train_seconds_per_fact'], 1)} | {_f(p['eval_seconds'], 0)} | {_f(p['train_hours'], 2)} | "
                f"{_f(p['hours'], 2)} |")
    finals = [(n, ps[-1]) for n, ps in curves.items() if ps and "bwt" in ps[-1]]
    if finals:
        lines += ["", "After the last task (targets: recall >= 0.95, rephrased >= 0.80, known kept >= 0.98, every suite "
                      "within 1%, BWT >= -0.02, training <= 2 h; ✓ met, ✗ missed):", "",
                  "| row | facts | recall | rephrased | known kept | NQ F1 | HellaSwag | GSM8K NLL | LAMBADA ppl | BWT | "
                  "train h | targets met |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for name, p in finals:
            checks = target_checks(p)
            met = " ".join(f"{k.removesuffix('_rel_change')} {'✓' if ok else '✗'}" for k, ok in checks.items() if ok is not None)
            lines.append(f"| {name} | {p['facts']:,} | {_f(p['recall'])} | {_f(p['rephrased'])} | {_f(p['known_kept'])} | "
                         + " | ".join(_pct(p.get(f"{s}_rel_change")) for s in SUITES)
                         + f" | {_signed(p['bwt'])} | {_f(p['train_hours'], 2)} | {met} |")
    return "\n".join(lines)


def plot_curve(curves: dict[str, list[dict]], path: Path) -> None:
    """Recall (all seen, first 200, rephrased) and free slots against facts taught; seconds per fact."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, cost) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, points in curves.items():
        x = [p["facts"] for p in points]
        for key, style, label in (("recall", "-o", "trained questions, all seen"), ("recall_first", "--s", "first 200"),
                                  ("rephrased", ":^", "rephrased (first 200)")):
            xy = [(xi, p[key]) for xi, p in zip(x, points) if p[key] is not None]
            if xy:
                ax.plot(*zip(*xy), style, label=f"{name}: {label}")
        xy = [(xi, p["free_slots"]) for xi, p in zip(x, points) if p["free_slots"] is not None]
        if xy:
            slots = ax.twinx()
            slots.plot(*zip(*xy), "-", color="grey", alpha=0.6, label="free slots")
            slots.set_ylabel("free slots (memory layer with fewest)")
            slots.set_ylim(bottom=0)
        for key, style, label in (("train_seconds_per_fact", "-o", "training s / fact (block)"),
                                  ("eval_seconds", "--s", "recall evaluation s (point)")):
            xy = [(xi, p[key]) for xi, p in zip(x, points) if p[key] is not None]
            if xy:
                cost.plot(*zip(*xy), style, label=f"{name}: {label}")
    ax.axhline(0.95, color="tab:green", lw=0.8, ls="--")
    ax.axhline(0.80, color="tab:olive", lw=0.8, ls="--")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("facts taught")
    ax.set_ylabel("recall")
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("recall as the stream grows (targets: 0.95 trained, 0.80 rephrased)", fontsize=9)
    cost.set_xlabel("facts taught")
    cost.set_ylabel("seconds")
    cost.set_yscale("log")
    cost.legend(fontsize=7)
    cost.set_title("cost per block of facts", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report() -> None:
    finished = dict(finished_rows(ROWS, RUNS, RESULTS))
    running = {r: RUNS / r for r in ROWS if r not in finished and (RUNS / r / "accuracy_matrix.csv").is_file()}
    if not finished and not running:
        print("no row has finished a task yet")
        return
    curves: dict[str, list[dict]] = {}
    for name in ROWS:
        run = finished.get(name) or running.get(name)
        if run is None:
            continue
        if name in finished:
            copy_small_files(run, RESULTS / name)
            if (run / "train.log").is_file() and run.resolve() != (RESULTS / name).resolve():
                shutil.copy2(run / "train.log", RESULTS / name / "train.log")  # the timing's source
        curves[name] = curve(run, EVERY, FIRST)
    from report import write_between, write_csv

    RESULTS.mkdir(parents=True, exist_ok=True)
    write_csv([{"row": n, **p} for n, ps in curves.items() for p in ps], RESULTS / "curve.csv")
    plot_curve(curves, RESULTS / "curve.png")
    md = markdown(curves, set(running))
    (RESULTS / "curve_table.md").write_text(md + "\n")
    write_between(HERE / "SCALE.md", md, *MARKERS)
    if finished:
        pack_rows(RESULTS)
    print(md)


def main() -> None:
    study_main(__doc__, ROWS, multirun, report, RUNS, RESULTS)


if __name__ == "__main__":
    main()
