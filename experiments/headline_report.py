"""Tables and plots of the headline experiment from its finished runs (experiments/headline.py),
through the generic experiments/report.py (which builds every row and table from the run files).

Reads experiments/runs/headline/<row>/{summary.json, slot_stats.csv, .hydra/overrides.yaml}
and writes experiments/results/headline/:
- headline.csv / headline.json: one row per run (the REPORT.md table, every figure measured);
- learning_vs_forgetting.png: fact recall vs held-out change, one point per run;
- <row>/: the run's summary.json, accuracy matrices, heldout.csv and slot_stats.csv;
and the table between the ``<!-- headline-table -->`` markers of experiments/REPORT.md.

    python experiments/headline_report.py            # the rows
    python experiments/headline_report.py --tune     # the learning-rate search (results/headline/tune.csv)
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path

from report import TABLES, heal_table, keys_table, plot, row_of, tune_table, write_csv

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs" / "headline"
OUT = HERE / "results" / "headline"
REPORT = HERE / "REPORT.md"
MARK_START, MARK_END = "<!-- headline-table:start -->", "<!-- headline-table:end -->"
KEPT_FILES = ("summary.json", "accuracy_matrix.csv", "accuracy_matrix_heldout_template.csv", "heldout.csv",
              "slot_stats.csv")


def collect(runs: list[tuple[str, Path]]) -> list[dict]:
    """One table row per finished run; its raw files are copied into results/headline/<row>/."""
    for name, run in runs:
        (OUT / name).mkdir(exist_ok=True)
        for f in KEPT_FILES:
            if (run / f).exists():
                shutil.copy2(run / f, OUT / name / f)
    return [row_of(name, run) for name, run in runs]


def commands_block() -> str:
    """The exact command of every row (python -m smf_lightning.train ...), as the runner issues it."""
    from headline import KEYS_ROWS, ROWS, TUNE, command

    lines = ["```bash"]
    for group, names, tune in (("rows", ROWS, False), ("issue 7 rows", KEYS_ROWS, False), ("learning-rate search", TUNE, True)):
        lines.append(f"# {group}")
        for n in names:
            cmd = command(n, [], tune)
            args = [shlex.quote(c.replace(str(HERE.parent) + "/", "")) for c in cmd[1:] if not c.startswith("ckpt_path=")]
            lines.append("python " + " ".join(args))
    lines.append("```")
    return "\n".join(lines)


def tune_main() -> int:
    from headline import TUNE, TUNE_RUNS

    rows = [row_of(n, TUNE_RUNS / n) for n in TUNE if (TUNE_RUNS / n / "summary.json").exists()]
    if not rows:
        print(f"no finished runs under {TUNE_RUNS}; run experiments/headline.py --tune first")
        return 1
    OUT.mkdir(parents=True, exist_ok=True)
    write_csv(rows, OUT / "tune.csv")
    table = tune_table(rows)
    print(table)
    _write_between(table, "<!-- tune-table:start -->", "<!-- tune-table:end -->")
    return 0


def _write_between(table: str, start: str, end: str) -> None:
    if not REPORT.exists():
        return
    text = REPORT.read_text()
    if start in text and end in text:
        pre, rest = text.split(start, 1)
        REPORT.write_text(pre + start + "\n" + table + "\n" + end + rest.split(end, 1)[1])
        print(f"table written into {REPORT}")


def main() -> int:
    if "--tune" in sys.argv[1:]:
        return tune_main()
    from headline import ROWS  # the row order of the runner

    runs = [(n, RUNS / n) for n in ROWS if (RUNS / n / "summary.json").exists()]
    if not runs:
        print(f"no finished runs under {RUNS}; run experiments/headline.py first")
        return 1
    OUT.mkdir(parents=True, exist_ok=True)
    rows = collect(runs)
    write_csv(rows, OUT / "headline.csv")
    (OUT / "headline.json").write_text(json.dumps(rows, indent=2))
    plot(rows, OUT / "learning_vs_forgetting.png")
    table = TABLES["headline"](rows)
    print(table)
    _write_between(table, MARK_START, MARK_END)
    _write_between(commands_block(), "<!-- commands:start -->", "<!-- commands:end -->")
    keys_section({r["row"]: r for r in rows})
    missing = [n for n in ROWS if n not in dict(runs)]
    if missing:
        print(f"rows not finished yet: {missing}")
    return 0


def keys_section(collected: dict[str, dict]) -> None:
    """Issue 7 at one budget: additive vs additive + k-means keys vs replace + healed (KEYS_ROWS),
    next to the additive smf_kl_t128 row (already in `collected`, the headline rows)."""
    from headline import HEAL_DIR, KEYS_ROWS

    runs = [(n, RUNS / n) for n in KEYS_ROWS if (RUNS / n / "summary.json").exists()]
    if not runs:
        return
    rows = [collected[n] for n in ("smf_kl_t128",) if n in collected] + collect(runs)
    write_csv(rows, OUT / "keys.csv")
    table = keys_table(rows)
    heal_summary = HEAL_DIR / "heal_summary.json"
    if heal_summary.exists():
        summary = json.loads(heal_summary.read_text())
        shutil.copy2(heal_summary, OUT / "heal_summary.json")
        table = "Healing run (`experiments/runs/heal_replace`):\n\n" + heal_table(summary) + "\n\n" + table
    print(table)
    _write_between(table, "<!-- keys-table:start -->", "<!-- keys-table:end -->")


if __name__ == "__main__":
    raise SystemExit(main())
