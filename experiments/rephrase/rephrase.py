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
intervals over facts (items) of one run, not run-to-run spread. The test rows are also grouped by
method (``test_<method>_s<seed>``, seeds 0-2: the top-level seed and data.order_seed, on one stream
and one evaluation) into the "Rephrased questions" table between the ``rephrase-test-table``
markers: the mean over a method's finished seeds and their min - max (run-to-run spread).

    python experiments/rephrase/rephrase.py --only test_smf_s0 test_smf_s1 test_smf_s2
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

TEST_MARKERS = ("<!-- rephrase-test-table:start -->", "<!-- rephrase-test-table:end -->")

DEV_ROWS = ("dev_recipe", "dev_rewordings3", "dev_rewordings3_gate0.3", "dev_rewordings6_within",
            "dev_rewordings6_within_gate0.7", "dev_rewordings6_within_alpha0.03", "dev_rewordings6_within_serve0.9",
            "dev_rewordings6_within_skip0.5", "dev_rewordings6_within_prefix4")
# The test stream's rows, ``test_<method>_s<seed>``: a method's seeds differ only in the top-level seed and
# data.order_seed (the batch order), so their spread is run-to-run, on one stream and one evaluation.
SEEDS = (0, 1, 2)
TEST_METHODS = {  # method (the row name's middle) -> what it trains; the order of the test table
    "smf": "SMF, candidate (dev_rewordings6_within): + 6 rewordings, whitening within rewordings, serve gate 0.9",
    "lora": "LoRA lr 3e-4, + 6 rewordings",
    "full": "full finetuning lr 3e-6, + 6 rewordings",
    "recipe": "SMF recipe as it is (cost comparison)",
}
TEST_ROWS = (*(f"test_{m}_s{s}" for m in ("smf", "lora", "full") for s in SEEDS), "test_recipe_s0")
ROWS = (*DEV_ROWS, *TEST_ROWS)  # dev rows first
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


def method_of(row: str) -> str | None:
    """The method of a test row ``test_<method>_s<seed>`` (None: not a test row)."""
    if not row.startswith("test_") or "_s" not in row:
        return None
    method, seed = row[len("test_"):].rsplit("_s", 1)
    return method if seed.isdigit() else None


# the test table's columns: (row_of key, header, format of one value)
TEST_COLUMNS = (
    ("recall", "trained question", "share"), ("heldout_template", "held-out template", "share"),
    ("rephrased", "**rephrased** (exact)", "share"), ("known_kept", "known kept", "share"),
    *((f"{k}_rel_change", h, "pct") for k, h in zip(SUITES, ("NQ F1", "HellaSwag", "GSM8K NLL", "LAMBADA ppl"))),
    ("bwt", "BWT", "signed"),
)


def group_by_method(rows: list[dict], planned: tuple[str, ...] = TEST_ROWS) -> list[dict]:
    """The finished test rows grouped by method, in TEST_METHODS' order: per method the mean over
    its finished seeds of every TEST_COLUMNS value (and of steps, s/step), its min and max over
    those seeds (run-to-run spread: the same stream and evaluation, another batch order and seed),
    the seeds finished and the seeds planned (its rows in ``planned``)."""
    out = []
    for method, label in TEST_METHODS.items():
        seeds = [r for r in rows if method_of(r["row"]) == method]
        n_planned = sum(method_of(r) == method for r in planned)
        if not seeds:
            continue
        g = {"method": method, "label": label, "rows": [r["row"] for r in seeds], "n": len(seeds), "planned": n_planned}
        for key in [k for k, _, _ in TEST_COLUMNS] + ["steps", "seconds_per_step"]:
            values = [r[key] for r in seeds if r.get(key) is not None]
            g[key] = sum(values) / len(values) if values else None
            g[f"{key}_min"], g[f"{key}_max"] = (min(values), max(values)) if values else (None, None)
            g[f"{key}_n"] = len(values)
        out.append(g)
    return out


def _value(x, kind: str) -> str:
    if kind == "pct":
        return f"{100 * x:+.2f}%"
    return f"{x:+.3f}" if kind == "signed" else f"{x:.3f}"


def _mean_spread(g: dict, key: str, kind: str) -> str:
    if g[key] is None:
        return "–"
    text = _value(g[key], kind)
    if kind == "share" and key == "rephrased":
        text = f"**{text}**"
    if g[f"{key}_n"] > 1:  # min–max over the seeds (one seed: no spread to show)
        text += f" ({_value(g[f'{key}_min'], kind)} – {_value(g[f'{key}_max'], kind)})"
    return text


def methods_markdown(groups: list[dict]) -> str:
    """The "Rephrased questions" table of the test stream: one line per method, the mean over its
    finished seeds with the min – max over them in parentheses."""
    if not groups:
        return "(no finished test row yet)"
    lines = ["Rephrased questions, test stream (experiment=facts_seq_test, data.seed 1, 200 facts): per method the "
             "mean over its finished seeds, (min – max over the seeds) = run-to-run spread (the same stream and "
             "evaluation; the seeds vary the batch order and torch's seed). Suites: relative change after the "
             "last task (> 0: NQ F1, HellaSwag better; GSM8K NLL, LAMBADA perplexity worse).",
             "",
             "| method | seeds | " + " | ".join(h for _, h, _ in TEST_COLUMNS) + " | steps × s/step |",
             "|---|---:|" + "---:|" * len(TEST_COLUMNS) + "---:|"]
    for g in groups:
        partial = f" ({g['n']} of {g['planned']} seeds)" if g["n"] < g["planned"] else ""
        cost = "–" if g["steps"] is None else f"{g['steps']:.0f} × {g['seconds_per_step']:.1f}"
        lines.append(f"| {g['label']} (`test_{g['method']}_s*`){partial} | {g['n']} | "
                     + " | ".join(_mean_spread(g, k, kind) for k, _, kind in TEST_COLUMNS) + f" | {cost} |")
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
    groups = group_by_method([r for r in rows if r["stream"] == "test"])
    test_md = methods_markdown(groups)
    if groups:
        write_csv([{k: v for k, v in g.items() if k != "rows"} | {"rows": " ".join(g["rows"])} for g in groups],
                  RESULTS / "rephrase_test.csv")
        (RESULTS / "rephrase_test_table.md").write_text(test_md + "\n")
    write_between(HERE / "REPHRASE.md", test_md, *TEST_MARKERS)
    pack_rows(RESULTS)
    print(md)
    print()
    print(test_md)


def main() -> None:
    study_main(__doc__, ROWS, multirun, report, RUNS, RESULTS)


if __name__ == "__main__":
    main()
