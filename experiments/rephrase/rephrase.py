"""The rephrased-questions study (REPHRASE.md) as a Hydra multirun: does a taught fact survive a
rewording of its question, and what does each lever cost?

Every row is a config ``conf/experiment/rephrase/<row>.yaml`` of this folder, put on Hydra's search
path by the multirun command. ``dev_*`` rows run on the dev stream (experiment=smf_recipe: 200
unknown TriviaQA facts, 5 tasks x 40, seed 0), where settings are chosen; ``test_*`` rows run on the
test stream (experiment=facts_seq_test: 200 other facts, seed 1, never tuned on), once per final
setting. Every fact carries two evaluation-only rephrasings (src/smf_lightning/data/rephrasings/),
asked after every task under the first training template.

    python experiments/rephrase/rephrase.py --list              # the multirun command, run nothing
    python experiments/rephrase/rephrase.py --only dev_recipe dev_rewordings3
    python experiments/rephrase/rephrase.py --report            # REPHRASE.md table + results/rephrase/

Runs live in $SMF_STUDY_RUNS/rephrase (default ~/.cache/smf_lightning/study_runs/rephrase); a stopped
row resumes from its last task checkpoint when launched again. --report copies each finished row's
small files into results/rephrase/<row>/, packs them into results/rephrase/rows.tar.xz (committed;
unpacked again by the driver, with the quick-stream runs REPHRASE.md cites) and writes the table
between the ``rephrase-table`` markers of REPHRASE.md. Intervals in the table are 95% bootstrap
intervals over facts (items) of one run, not run-to-run spread.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # experiments/: study.py and report.py, shared by the studies

from study import command_of, copy_small_files, finished_rows, pack_rows, runs_dir  # noqa: E402
from study import main as study_main  # noqa: E402
from study import multirun as study_multirun  # noqa: E402

RUNS = runs_dir("rephrase")
RESULTS = HERE / "results" / "rephrase"
CONF = HERE / "conf"  # the row configs: conf/experiment/rephrase/<row>.yaml, on Hydra's search path
MARKERS = ("<!-- rephrase-table:start -->", "<!-- rephrase-table:end -->")

ROWS = ("dev_recipe", "dev_rewordings3", "dev_rewordings3_gate0.3", "dev_rewordings6_within")
SUITES = ("nq_open", "hellaswag", "gsm8k", "lambada")


def multirun(rows: tuple[str, ...] | list[str] = ROWS) -> list[str]:
    return study_multirun("rephrase", rows, RUNS, CONF)


def _ci(interval) -> str:
    return f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""


def _share(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def _pct(x, interval=None) -> str:
    if x is None:
        return "–"
    text = f"{100 * x:+.1f}%"
    return text + (f" [{100 * interval[0]:+.1f}, {100 * interval[1]:+.1f}]" if interval else "")


def row_of(name: str, run: Path) -> dict:
    s = json.loads((run / "summary.json").read_text())
    h, r = s["heldout"], s.get("recall", {})
    other = (s.get("wrong_answer_is_other_fact") or {}).get("rephrased") or {}
    return {
        "row": name, "stream": "test" if name.startswith("test") else "dev", "method": s["method"],
        "facts": s["n_tasks"] * s["facts_per_task"],
        "recall": s["fact_recall"], "recall_ci95": s.get("fact_recall_ci95"),
        "heldout_template": s["fact_recall_heldout_template"],
        "heldout_template_ci95": s.get("fact_recall_heldout_template_ci95"),
        "rephrased": s.get("fact_recall_rephrased"), "rephrased_ci95": r.get("fact_recall_rephrased", {}).get("ci95"),
        "rephrased_contains": s.get("fact_recall_rephrased_contains"),
        "rephrased_wrong_other_fact": other.get("share"),
        "known_kept": h.get("triviaqa_known", {}).get("after"), "known_kept_ci95": h.get("triviaqa_known", {}).get("ci95"),
        "bwt": s["bwt"],
        **{f"{k}_rel_change": h[k]["rel_change"] for k in SUITES if k in h},
        **{f"{k}_rel_change_ci95": h[k].get("rel_change_ci95") for k in SUITES if k in h},
        "rewordings_kept": (s["data"].get("rewordings") or {}).get("kept"),
        "steps": s["steps"], "seconds_per_step": s["seconds_per_step"],
        "wall_minutes": (s["seconds_per_step"] * s["steps"] + s["eval_seconds"]) / 60,
        "command": command_of(run, CONF),
    }


def markdown(rows: list[dict]) -> str:
    head = ("| row | stream | trained question | held-out template | **rephrased** (contains) | rephrased wrong = other "
            "fact's answer | known kept | BWT | NQ F1 | HellaSwag | GSM8K NLL | LAMBADA ppl | steps × s/step | wall |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['row']} | {r['stream']} | {r['recall']:.3f}{_ci(r['recall_ci95'])} | {r['heldout_template']:.3f}"
            f"{_ci(r['heldout_template_ci95'])} | **{r['rephrased']:.3f}**{_ci(r['rephrased_ci95'])} "
            f"({r['rephrased_contains']:.3f}) | "
            f"{_share(r['rephrased_wrong_other_fact'])} | "
            f"{r['known_kept']:.3f}{_ci(r['known_kept_ci95'])} | {r['bwt']:+.3f} | "
            + " | ".join(_pct(r.get(f"{k}_rel_change"), r.get(f"{k}_rel_change_ci95")) for k in SUITES)
            + f" | {r['steps']} × {r['seconds_per_step']:.1f} | {r['wall_minutes']:.0f} min |")
    return "\n".join(lines)


def report() -> None:
    finished = finished_rows(ROWS, RUNS, RESULTS)
    if not finished:
        print("no finished rows yet")
        return
    rows = []
    for name, run in finished:
        copy_small_files(run, RESULTS / name)
        rows.append(row_of(name, run))
    from report import write_between, write_csv

    RESULTS.mkdir(parents=True, exist_ok=True)
    write_csv(rows, RESULTS / "rephrase.csv")
    md = markdown(rows)
    (RESULTS / "rephrase_table.md").write_text(md + "\n")
    write_between(HERE / "REPHRASE.md", md, *MARKERS)
    pack_rows(RESULTS)
    print(md)


def main() -> None:
    study_main(__doc__, ROWS, multirun, report, RUNS, RESULTS)


if __name__ == "__main__":
    main()
