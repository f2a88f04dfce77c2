"""The SMF recipe study of issue 13: one row per lever, from the old defaults to the recipe.

Every row is ``experiment=smf_recipe`` (200 unknown TriviaQA facts in 5 tasks x 40, the
known-facts suite and the four suites, before and after the stream) plus overrides. The recipe
is the defaults of conf/ (method/smf.yaml, model/qwen2.5-0.5b*.yaml, data/facts_triviaqa.yaml);
row k turns the levers after the k-th back to their old values, so the rows walk from the old
defaults (row 0) to the recipe (the last lever row) one lever at a time. Then the recipe with
the TF-IDF selector.

    python experiments/smf_recipe.py --list             # rows and their exact commands
    python experiments/smf_recipe.py --only recipe_kl recipe_tfidf
    python experiments/smf_recipe.py                    # every row not finished yet
    python experiments/smf_recipe.py --report           # experiments/RECIPE.md table + results/recipe/

Rows run one after another (two CPU cores); a finished row (summary.json) is skipped and an
interrupted one resumes from its last task checkpoint. Runs live in $SMF_STUDY_RUNS/recipe
(default ~/.cache/smf_lightning/study_runs/recipe: outside the work tree, so they survive a fresh
checkout); --report copies the small files into experiments/results/recipe/<row>/.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Runs (with their task checkpoints) live outside the work tree, beside the project's cache, so a
# study can span sessions on the same machine: $SMF_STUDY_RUNS, default <SMF cache>/study_runs.
RUNS = Path(os.environ.get("SMF_STUDY_RUNS") or Path(os.environ.get("SMF_CACHE") or Path.home() / ".cache" / "smf_lightning")
            / "study_runs") / "recipe"
RESULTS = HERE / "results" / "recipe"
EXPERIMENT = "smf_recipe"

# (lever, what it changes, the overrides that restore its old value). Order = the ablation path.
LEVERS: list[tuple[str, str, list[str]]] = [
    ("schedule", "facts interleaved in batches of 16, 5 passes per task (was: one fact per batch, 5 steps)",
     ["data.schedule=sequential", "data.train_batch_size=4", "data.epochs_per_task=1", "data.repeats_per_batch=5"]),
    ("output", "value rows added to the residual (was: gated swilu output)", ["model.memory.output=swilu"]),
    ("whitening", "memory input whitened with background mean/std (was: raw)", ["model.memory.input_norm=none"]),
    ("hubs", "10% most-read background slots never selected (was: none)", ["method.exclude_hubs=0.0"]),
    ("ownership", "slots of earlier tasks never selected again (was: shared)",
     ["method.exclude_owned=false", "method.optimizer_state=carry"]),
    ("selection", "top-t per fact, chosen once per task (was: top-500 per step)",
     ["method.select_per=step", "method.top_t=500"]),
    ("memory", "one head, 262,144 slots, knn 32 at layer 15 (was: 4 heads, 16,384 slots, knn 16 at layer 12)",
     ["model.memory.heads=4", "model.memory.n_slots=16384", "model.memory.knn=16", "model.memory.layers=[12]"]),
    ("background", "1,000 TriviaQA + 500 NQ QA-format background sequences (was: 128 + 64)",
     ["data.background.triviaqa=128", "data.background.nq_open=64"]),
    # session 5: the learning bottleneck (RECIPE.md, "Why it learned slowly")
    ("zca", "memory input ZCA-whitened with the answer positions' covariance (was: diagonal, all tokens)",
     ["model.memory.input_norm=whiten", "model.memory.whiten_on=all"]),
    ("suffix", "loss also on the newline after the answer (was: answer tokens only)", ["data.loss_on=answer"]),
    ("budget", "top-300 slots per fact at Adam lr 0.3 (was: top-30 at lr 1.0)", ["method.top_t=30", "method.lr=1.0"]),
]


# The defaults before issue 13, every key the recipe may touch (what `make train` ran: 5 steps per fact).
OLD_DEFAULTS = [
    "model.memory.layers=[12]", "model.memory.n_slots=16384", "model.memory.heads=4", "model.memory.knn=16",
    "model.memory.output=swilu", "model.memory.input_norm=none", "model.memory.whiten_on=all",
    "model.memory.score_scale=1.0",
    "method.selector=kl", "method.top_t=500", "method.optimizer=adam", "method.lr=1.0", "method.select_per=step",
    "method.exclude_hubs=0.0", "method.exclude_owned=false", "method.optimizer_state=carry", "method.prefix_cache=4",
    "data.schedule=sequential", "data.train_batch_size=4", "data.repeats_per_batch=5", "data.epochs_per_task=1",
    "data.loss_on=answer", "data.background.triviaqa=128", "data.background.nq_open=64", "data.background.lambada=64",
]


def rows() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"old_defaults": OLD_DEFAULTS}
    for k in range(1, len(LEVERS) + 1):
        # levers k.. back to their old values; an earlier lever's old value wins where two set the same key
        out[f"+{LEVERS[k - 1][0]}"] = [o for _, _, old in reversed(LEVERS[k:]) for o in old]
    out["recipe_kl"] = out.pop(f"+{LEVERS[-1][0]}")  # every lever on: the recipe
    out["recipe_tfidf"] = ["method.selector=tfidf"]
    return out


def command(name: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "smf_lightning.train", f"experiment={EXPERIMENT}", *overrides,
            f"hydra.run.dir={RUNS / name}", "logger.wandb.mode=disabled"]


def run_row(name: str, overrides: list[str]) -> int:
    run_dir = RUNS / name
    if (run_dir / "summary.json").is_file():
        print(f"[{name}] finished, skipped")
        return 0
    cmd = command(name, overrides)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if ckpt.is_file():
        cmd.append(f"ckpt_path={ckpt}")
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"[{name}] {shlex.join(cmd)}", flush=True)
    with (run_dir / "stdout.log").open("a") as log:
        return subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)


# ----------------------------------------------------------------------------- report

SUITES = ("triviaqa_known", "nq_open", "gsm8k", "lambada", "hellaswag")


def report() -> None:
    table = []
    for name, overrides in rows().items():
        f = RUNS / name / "summary.json"
        if not f.is_file():
            continue
        s = json.loads(f.read_text())
        dest = RESULTS / name
        dest.mkdir(parents=True, exist_ok=True)
        for small in ("summary.json", "accuracy_matrix.csv", "accuracy_matrix_heldout_template.csv", "heldout.csv",
                      "slot_stats.csv", "accuracy_matrix.png", "forgetting_curves.png", "slot_stats.png"):
            if (RUNS / name / small).is_file():
                shutil.copy2(RUNS / name / small, dest / small)
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
            "command": shlex.join(["python", "-m", "smf_lightning.train", f"experiment={EXPERIMENT}", *overrides]),
        }
        table.append(row)
    if not table:
        print("no finished rows yet")
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    cols = list(dict.fromkeys(k for r in table for k in r))
    with (RESULTS / "recipe.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(table)
    sys.path.insert(0, str(HERE))
    from report import report as sweep_report

    _, md = sweep_report(RUNS, "recipe", [r["row"] for r in table])  # the table of experiments/report.py
    lines = md.splitlines()
    (RESULTS / "recipe_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten: {RESULTS / 'recipe.csv'}, {RESULTS / 'recipe_table.md'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="row names (default: every row)")
    ap.add_argument("--list", action="store_true", help="print the rows and their commands")
    ap.add_argument("--report", action="store_true", help="tables from the finished rows")
    args = ap.parse_args()
    all_rows = rows()
    if args.list:
        for name, overrides in all_rows.items():
            print(f"{name}:\n  python -m smf_lightning.train experiment={EXPERIMENT} {shlex.join(overrides)}")
        return
    if args.report:
        report()
        return
    unknown = set(args.only or []) - set(all_rows)
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; rows: {', '.join(all_rows)}")
    for name in args.only or all_rows:
        rc = run_row(name, all_rows[name])
        if rc != 0:
            raise SystemExit(f"[{name}] failed with exit code {rc}; see {RUNS / name / 'stdout.log'}")
    report()


if __name__ == "__main__":
    main()
