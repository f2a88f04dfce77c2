"""The headline experiment of issue 6: every row of experiments/REPORT.md is one training run of
``experiment=facts_seq_report`` plus the overrides below, run one after another (two CPU cores:
parallel runs only slow each other down). Finished rows are skipped, an interrupted row resumes
from its last task checkpoint, so the script can be stopped and started again at any point.

    python experiments/headline.py                    # every row, then the report tables and plots
    python experiments/headline.py --only smf_kl_t500 lora_lr1e-3
    python experiments/headline.py --list              # rows and their commands
    python experiments/headline_report.py             # tables and plots from finished rows only

Runs go to experiments/runs/headline/<row>/ (ignored by git: checkpoints); the report script
copies the small files that matter into experiments/results/headline/.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs" / "headline"
EXPERIMENT = "facts_seq_report"

# name -> overrides on top of experiment=facts_seq_report. Learning rates were chosen on one
# task of the same stream first (experiments/REPORT.md, "Learning rates tried").
ROWS: dict[str, list[str]] = {
    "smf_kl_t100": ["method.selector=kl", "method.top_t=100"],
    "smf_kl_t500": ["method.selector=kl", "method.top_t=500"],
    "smf_kl_t2000": ["method.selector=kl", "method.top_t=2000"],
    "smf_tfidf_t100": ["method.selector=tfidf", "method.top_t=100"],
    "smf_tfidf_t500": ["method.selector=tfidf", "method.top_t=500"],
    "smf_tfidf_t2000": ["method.selector=tfidf", "method.top_t=2000"],
    "smf_random_t500": ["method.selector=random", "method.top_t=500"],
    "smf_all": ["method.selector=all"],
    "lora": ["method=lora"],
    # full finetuning checkpoints would be 6 GB per task (weights + AdamW state): not kept
    "full_ft": ["method=full_ft", "callbacks.checkpoint.enabled=false"],
}


# Learning-rate search before the rows above: the first 2 tasks of the same stream (6 facts,
# 30 steps), NQ-open and LAMBADA only. `python experiments/headline.py --tune`
TUNE_BASE = ["data.n_tasks=2", "data.suites.nq_open.n_items=32", "data.suites.lambada.n_items=32",
             "~data.suites.hellaswag", "~data.suites.gsm8k", "callbacks.checkpoint.enabled=false"]
TUNE: dict[str, list[str]] = {
    "smf_adam_lr0.1": ["method.optimizer=adam", "method.lr=0.1"],
    "smf_adam_lr0.3": ["method.optimizer=adam", "method.lr=0.3"],
    "smf_sgd_lr300": ["method.optimizer=sgd", "method.lr=300"],
    "smf_sgd_lr1000": ["method.optimizer=sgd", "method.lr=1000"],
    "smf_sgd_lr3000": ["method.optimizer=sgd", "method.lr=3000"],
    "lora_lr1e-3": ["method=lora", "method.lr=1e-3"],
    "lora_lr3e-3": ["method=lora", "method.lr=3e-3"],
    "full_ft_lr1e-5": ["method=full_ft", "method.lr=1e-5"],
    "full_ft_lr3e-5": ["method=full_ft", "method.lr=3e-5"],
}
TUNE_RUNS = HERE / "runs" / "headline_tune"


def command(name: str, extra: list[str], tune: bool = False) -> list[str]:
    out = (TUNE_RUNS if tune else RUNS) / name
    overrides = TUNE_BASE + TUNE[name] if tune else ROWS[name]
    cmd = [sys.executable, "-m", "smf_lightning.train", f"experiment={EXPERIMENT}", *overrides, *extra,
           f"hydra.run.dir={out}"]
    last = out / "checkpoints" / "last.ckpt"
    if last.exists():
        cmd.append(f"ckpt_path={last}")
    return cmd


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=sorted(ROWS) + sorted(TUNE), help="run these rows only")
    ap.add_argument("--tune", action="store_true", help="the learning-rate search (TUNE) instead of the rows")
    ap.add_argument("--list", action="store_true", help="print the rows and their commands, run nothing")
    ap.add_argument("--rerun", action="store_true", help="run rows again even when finished")
    ap.add_argument("--extra", nargs="*", default=[], help="extra Hydra overrides for every row")
    ap.add_argument("--no-report", action="store_true", help="skip experiments/headline_report.py at the end")
    args = ap.parse_args()
    names = args.only or list(TUNE if args.tune else ROWS)
    runs = TUNE_RUNS if args.tune else RUNS
    if args.list:
        for n in names:
            print(f"{n}:\n  {' '.join(command(n, args.extra, args.tune)[1:])}")
        return 0
    failed = []
    for i, name in enumerate(names, 1):
        done = (runs / name / "summary.json").exists()
        if done and not args.rerun:
            print(f"[{i}/{len(names)}] {name}: finished earlier, skipped")
            continue
        cmd = command(name, args.extra, args.tune)
        print(f"[{i}/{len(names)}] {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd)
        print(f"[{i}/{len(names)}] {name}: exit {rc} after {time.time() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if not args.no_report:
        subprocess.call([sys.executable, str(HERE / "headline_report.py")] + (["--tune"] if args.tune else []))
    if failed:
        print(f"failed rows: {failed} (rerun the script to resume them)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
