"""Tables and plots of the first headline study from its finished runs (the multirun of
conf/experiment/headline/: headline.py), through the generic experiments/report.py (which builds
every row and table from the run files).

Reads <sweep dir>/<row>/{summary.json, slot_stats.csv} (default experiments/runs/headline; --runs
another, e.g. experiments/headline/results/headline: the committed files, unpacked from its
rows.tar.xz) and writes results/headline/:
- headline.csv / headline.json: one row per run (the REPORT.md table, every figure measured);
- learning_vs_forgetting.png: fact recall vs held-out change, one point per run;
- <row>/: the run's summary.json, accuracy matrices, heldout.csv and slot_stats.csv, packed into
  rows.tar.xz (committed);
and the table between the ``<!-- headline-table -->`` markers of REPORT.md.

    python experiments/headline/headline_report.py                 # the rows
    python experiments/headline/headline_report.py --tune          # the learning-rate search (results/headline/tune.csv)
    python experiments/headline/headline_report.py --runs DIR      # the rows of another sweep dir
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # headline.py beside it; experiments/: report.py and study.py

from headline import HEAL_DIR, KEYS_ROWS, ROWS, RUNS, TUNE, TUNE_RUNS  # noqa: E402
from report import TABLES, heal_table, keys_table, plot, row_of, tune_table, write_between, write_csv  # noqa: E402
from study import pack_rows, unpack_rows  # noqa: E402

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
            if (run / f).exists() and (run / f).resolve() != (OUT / name / f).resolve():
                shutil.copy2(run / f, OUT / name / f)
    return [row_of(name, run) for name, run in runs]


def commands_block() -> str:
    """The exact commands of the study: one multirun per sweep (each row's overrides:
    conf/experiment/headline/<row>.yaml of this folder), the healing run of the healed rows first."""
    from headline import HEAL_CMD, multirun, shell

    lines = ["```bash", "# rows", shell(multirun("rows", ROWS)), "# k-means keys and healed replace rows (the healing run first)",
             shell(HEAL_CMD), shell(multirun("keys", KEYS_ROWS)), "# learning-rate search", shell(multirun("tune", TUNE)), "```"]
    return "\n".join(lines)


def tune_main(runs_dir: Path) -> int:
    rows = [row_of(n, runs_dir / n) for n in TUNE if (runs_dir / n / "summary.json").exists()]
    if not rows:
        print(f"no finished runs under {runs_dir}; run experiments/headline/headline.py --tune first")
        return 1
    OUT.mkdir(parents=True, exist_ok=True)
    write_csv(rows, OUT / "tune.csv")
    table = tune_table(rows)
    print(table)
    write_between(REPORT, table, "<!-- tune-table:start -->", "<!-- tune-table:end -->")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tune", action="store_true", help="the learning-rate search (default sweep dir: experiments/runs/headline_tune)")
    ap.add_argument("--runs", type=Path, help="the sweep dir holding the row folders (default: experiments/runs/headline)")
    args = ap.parse_args()
    unpack_rows(OUT)  # the committed rows' files (--runs experiments/headline/results/headline reads them)
    if args.tune:
        return tune_main(args.runs or TUNE_RUNS)
    runs_dir = args.runs or RUNS
    runs = [(n, runs_dir / n) for n in ROWS if (runs_dir / n / "summary.json").exists()]
    if not runs:
        print(f"no finished runs under {runs_dir}; run experiments/headline/headline.py first")
        return 1
    OUT.mkdir(parents=True, exist_ok=True)
    rows = collect(runs)
    write_csv(rows, OUT / "headline.csv")
    (OUT / "headline.json").write_text(json.dumps(rows, indent=2))
    plot(rows, OUT / "learning_vs_forgetting.png")
    table = TABLES["headline"](rows)
    print(table)
    write_between(REPORT, table, MARK_START, MARK_END)
    write_between(REPORT, commands_block(), "<!-- commands:start -->", "<!-- commands:end -->")
    keys_section({r["row"]: r for r in rows}, runs_dir)
    pack_rows(OUT)
    missing = [n for n in ROWS if n not in dict(runs)]
    if missing:
        print(f"rows not finished yet: {missing}")
    return 0


def keys_section(collected: dict[str, dict], runs_dir: Path) -> None:
    """The keys rows at one budget: additive vs additive + k-means keys vs replace + healed (KEYS_ROWS),
    next to the additive smf_kl_t128 row (already in `collected`, the headline rows)."""
    runs = [(n, runs_dir / n) for n in KEYS_ROWS if (runs_dir / n / "summary.json").exists()]
    if not runs:
        return
    rows = [collected[n] for n in ("smf_kl_t128",) if n in collected] + collect(runs)
    write_csv(rows, OUT / "keys.csv")
    table = keys_table(rows)
    heal_summary = HEAL_DIR / "heal_summary.json"
    if not heal_summary.exists() and (OUT / "heal_summary.json").exists():
        heal_summary = OUT / "heal_summary.json"  # the committed copy (no healing run in this checkout)
    if heal_summary.exists():
        summary = json.loads(heal_summary.read_text())
        if heal_summary.resolve() != (OUT / "heal_summary.json").resolve():
            shutil.copy2(heal_summary, OUT / "heal_summary.json")
        table = "Healing run (`experiments/runs/heal_replace`):\n\n" + heal_table(summary) + "\n\n" + table
    print(table)
    write_between(REPORT, table, "<!-- keys-table:start -->", "<!-- keys-table:end -->")


if __name__ == "__main__":
    raise SystemExit(main())
