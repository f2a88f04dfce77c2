"""The second headline study (REPORT.md): SMF with the recipe against LoRA
and full finetuning on one stream, each method at several learning rates or budgets. Every row is
``conf/experiment/headline_v2/<row>.yaml`` of this folder: experiment=smf_recipe (200 unknown TriviaQA facts in
5 tasks x 40, recorded by fact id in each run's summary.json; the known-facts suite and the four
suites before and after the stream; recall after every task) plus the row's method settings. The
study is one Hydra multirun, one job folder per row:

    python -m smf_lightning.train -m experiment=headline_v2/smf_kl_t300,headline_v2/lora_lr3e-4,... \\
        'hydra.searchpath=[file://experiments/headline/conf]' hydra.sweep.dir=$SMF_STUDY_RUNS/headline_v2

launched again until done: finished rows are skipped, stopped ones resume from their last task
checkpoint. This script prints or launches that command and writes the study's report:

    python experiments/headline/headline_v2.py --list        # the multirun command, run nothing
    python experiments/headline/headline_v2.py --only lora_lr3e-4 full_ft_lr1e-5
    python experiments/headline/headline_v2.py               # every row, then --report
    python experiments/headline/headline_v2.py --report      # results/headline_v2/

Runs live in $SMF_STUDY_RUNS/headline_v2 (default ~/.cache/smf_lightning/study_runs/headline_v2);
--report copies each finished row's small files into results/headline_v2/<row>/ and packs them into
results/headline_v2/rows.tar.xz (committed; unpacked again by the driver), writes the table
(table.md, rows.csv) and the learning-vs-forgetting plot there, and the table into REPORT.md
between its ``headline-v2-table`` markers.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # experiments/: study.py and report.py, shared by the studies

from study import command_of, copy_small_files, finished_rows, pack_rows, runs_dir  # noqa: E402
from study import main as study_main  # noqa: E402
from study import multirun as study_multirun  # noqa: E402

RUNS = runs_dir("headline_v2")
RESULTS = HERE / "results" / "headline_v2"
CONF = HERE / "conf"  # the row configs: conf/experiment/headline_v2/<row>.yaml, on Hydra's search path
# where --report writes the table into REPORT.md (the prose around it is hand-written)
REPORT_MARKERS = ("<!-- headline-v2-table:start -->", "<!-- headline-v2-table:end -->")

# The rows in the report's order (their settings: CONF/experiment/headline_v2/<row>.yaml)
SMF_ROWS = ("smf_kl_t100", "smf_kl_t300", "smf_kl_t1000", "smf_tfidf_t100", "smf_tfidf_t300", "smf_tfidf_t1000",
            "smf_kl_t300_lr0.1", "smf_kl_t300_lr1", "smf_random_t300", "smf_all")
BASELINE_ROWS = ("lora_lr1e-4", "lora_lr3e-4", "lora_lr1e-3", "full_ft_lr3e-6", "full_ft_lr1e-5", "full_ft_lr3e-5")
ROWS = SMF_ROWS + BASELINE_ROWS


def multirun(rows: tuple[str, ...] | list[str] = ROWS) -> list[str]:
    """The train CLI's arguments of the study's multirun over ``rows``."""
    return study_multirun("headline_v2", rows, RUNS, CONF)


def report() -> None:
    from report import table_of, write_between, write_csv

    finished = finished_rows(ROWS, RUNS, RESULTS)
    rows, md = table_of("headline_v2", finished)
    if not rows:
        print(f"no finished rows yet under {RUNS} or {RESULTS}")
        return
    for r, (name, run) in zip(rows, finished):
        r["command"] = command_of(run, CONF)
        copy_small_files(run, RESULTS / name)
    pack_rows(RESULTS)
    write_csv(rows, RESULTS / "rows.csv")
    (RESULTS / "table.md").write_text(md + "\n")
    write_between(HERE / "REPORT.md", md, *REPORT_MARKERS)
    from report import curves_plot

    curves_plot(rows, RESULTS / "learning_vs_forgetting.png")
    print(md)
    print(f"\nwritten: {RESULTS}/rows.csv, table.md, learning_vs_forgetting.png")


def main() -> None:
    study_main(__doc__, ROWS, multirun, report, RUNS, RESULTS)


if __name__ == "__main__":
    main()
