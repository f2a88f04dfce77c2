"""The SMF recipe study (RECIPE.md) as a Hydra multirun: one row per lever,
from the old defaults to the recipe. Every row is a config ``conf/experiment/recipe/<row>.yaml`` of this folder
(experiment=smf_recipe: 200 unknown TriviaQA facts in 5 tasks x 40, the known-facts suite and the
four suites before and after the stream, plus the row's overrides; each file says what its lever
changes). The recipe is the defaults of conf/; row ``+<lever>`` turns the levers after it back to
their old values, so the rows walk from the old defaults to the recipe one lever at a time; then
the recipe with the TF-IDF selector. The study is one multirun, one job folder per row:

    python -m smf_lightning.train -m experiment=recipe/old_defaults,recipe/+schedule,... \
        'hydra.searchpath=[file://experiments/recipe/conf]' hydra.sweep.dir=$SMF_STUDY_RUNS/recipe

launched again until done: finished rows (summary.json) are skipped, stopped ones resume from
their last task checkpoint (callbacks/sweep.py: resume_sweep_job). This script prints or launches
that command and writes the study's report:

    python experiments/recipe/smf_recipe.py --list             # the multirun command, run nothing
    python experiments/recipe/smf_recipe.py --only recipe_kl recipe_tfidf
    python experiments/recipe/smf_recipe.py                    # every row, then --report
    python experiments/recipe/smf_recipe.py --report           # RECIPE.md table + results/recipe/

Runs live in $SMF_STUDY_RUNS/recipe (default ~/.cache/smf_lightning/study_runs/recipe: outside the
work tree, so they survive a fresh checkout); --report copies the small files into
results/recipe/<row>/, packs them into results/recipe/rows.tar.xz (committed; unpacked again by
the driver) and writes the table of every finished row into RECIPE.md between its
``recipe-table`` markers.
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

RUNS = runs_dir("recipe")
RESULTS = HERE / "results" / "recipe"
CONF = HERE / "conf"  # the row configs: conf/experiment/recipe/<row>.yaml, on Hydra's search path
RECIPE_MARKERS = ("<!-- recipe-table:start -->", "<!-- recipe-table:end -->")  # in RECIPE.md

# The rows in the ablation's order (their overrides: CONF/experiment/recipe/<row>.yaml)
ROWS = ("old_defaults", "+schedule", "+output", "+whitening", "+hubs", "+ownership", "+selection", "+memory",
        "+background", "+zca", "+suffix", "+budget", "+gate", "recipe_kl", "recipe_tfidf")


def multirun(rows: tuple[str, ...] | list[str] = ROWS) -> list[str]:
    """The train CLI's arguments of the study's multirun over ``rows``."""
    return study_multirun("recipe", rows, RUNS, CONF)


# ----------------------------------------------------------------------------- report

SUITES = ("triviaqa_known", "nq_open", "gsm8k", "lambada", "hellaswag")


def report() -> None:
    table = []
    finished = finished_rows(ROWS, RUNS, RESULTS)
    for name, run in finished:
        s = json.loads((run / "summary.json").read_text())
        copy_small_files(run, RESULTS / name)
        h = s["heldout"]
        row = {
            "row": name, "recall": s["fact_recall"], "recall_heldout_template": s["fact_recall_heldout_template"],
            "acc": s["acc"], "bwt": s["bwt"], "known_kept": h.get("triviaqa_known", {}).get("after"),
            "known_kept_ci95": h.get("triviaqa_known", {}).get("ci95"),
            **{f"{k}_rel_change": h[k]["rel_change"] for k in SUITES if k in h},
            **{f"{k}_rel_change_ci95": h[k].get("rel_change_ci95") for k in SUITES if k in h},
            **{f"{k}_metric": h[k]["metric"] for k in SUITES if k in h},
            "steps": s["steps"], "seconds_per_step": s["seconds_per_step"],
            "wall_minutes": (s["seconds_per_step"] * s["steps"] + s["eval_seconds"]) / 60,
            "command": command_of(run, CONF),
        }
        table.append(row)
    if not table:
        print("no finished rows yet")
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    from report import table_of, write_between, write_csv

    write_csv(table, RESULTS / "recipe.csv")

    _, md = table_of("recipe", finished)  # the table of experiments/report.py
    lines = md.splitlines()
    (RESULTS / "recipe_table.md").write_text("\n".join(lines) + "\n")
    write_between(HERE / "RECIPE.md", md, *RECIPE_MARKERS)
    pack_rows(RESULTS)
    print("\n".join(lines))
    print(f"\nwritten: {RESULTS / 'recipe.csv'}, {RESULTS / 'recipe_table.md'}, {RESULTS / 'rows.tar.xz'}")


def main() -> None:
    study_main(__doc__, ROWS, multirun, report, RUNS, RESULTS)


if __name__ == "__main__":
    main()
