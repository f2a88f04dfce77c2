"""The first headline study (REPORT.md, appendix) as Hydra multiruns: every row is a config
``conf/experiment/headline/<row>.yaml`` of this folder (experiment=facts_seq_report, also here, plus
the row's overrides; the folder conf/ goes on Hydra's search path) and
a study is one multirun of its rows into a fixed sweep directory, one job folder per row. This
script prints that command and launches it; the study itself needs nothing here:

    python -m smf_lightning.train -m experiment=headline/smf_kl_t32,headline/lora,... \\
        'hydra.searchpath=[file://experiments/headline/conf]' hydra.sweep.dir=experiments/runs/headline

Launched again, the multirun skips the rows that finished (summary.json) and resumes the ones that
stopped from their last task checkpoint (callbacks/sweep.py: resume_sweep_job).

    python experiments/headline/headline.py --list      # the multirun command, run nothing
    python experiments/headline/headline.py             # the rows, then headline_report.py
    python experiments/headline/headline.py --keys      # the keys rows (k-means keys, healed replace; heals first)
    python experiments/headline/headline.py --tune      # the learning-rate search (2 tasks of the stream)
    python experiments/headline/headline.py --only lora full_ft --lanes 2 -- trainer.max_time=00:02:00:00

Runs go to experiments/runs/<sweep>/<row>/ (ignored by git: checkpoints); headline_report.py
copies the small files that matter into results/headline/<row>/ and packs them into
results/headline/rows.tar.xz.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))  # experiments/: study.py and report.py, shared by the studies

from study import search_path  # noqa: E402

CONF = HERE / "conf"  # the row configs (conf/experiment/headline/), on Hydra's search path
RUNS = ROOT / "experiments" / "runs" / "headline"  # ignored by git: the runs with their checkpoints
TUNE_RUNS = ROOT / "experiments" / "runs" / "headline_tune"
HEAL_DIR = ROOT / "experiments" / "runs" / "heal_replace"  # model.init_checkpoint of the healed rows: <HEAL_DIR>/healed

# The study's rows in the report's order (their overrides: CONF/experiment/headline/<row>.yaml).
ROWS = ("smf_kl_t32", "smf_kl_t128", "smf_kl_t512", "smf_tfidf_t32", "smf_tfidf_t128", "smf_tfidf_t512",
        "smf_random_t128", "smf_all", "lora", "full_ft")
KEYS_ROWS = ("smf_kl_t128_kmeans", "smf_kl_t128_replace_healed", "smf_kl_t128_kmeans_lr0.3",
             "smf_kl_t128_replace_healed_lr0.1")
# CONF/experiment/headline/tune/<row>.yaml; a config file cannot delete a suite, the command does
TUNE = ("smf_adam_lr0.1", "smf_adam_lr0.3", "smf_sgd_lr300", "smf_sgd_lr1000", "smf_sgd_lr3000",
        "smf_t64_adam_lr0.3", "smf_t64_adam_lr1", "smf_t64_sgd_lr1000", "smf_t64_sgd_lr3000",
        "smf_t64_sgd_lr3000_suffix", "smf_t64_adam_lr1_suffix", "lora_lr1e-3", "lora_lr3e-3", "lora_lr3e-5",
        "lora_lr1e-4", "lora_lr3e-4", "full_ft_lr1e-6", "full_ft_lr3e-6",
        "keys_kmeans_lr0.1", "keys_kmeans_lr0.3", "keys_healed_lr0.01", "keys_healed_lr0.1", "keys_healed_lr0.3")
TUNE_DELETIONS = ("~data.suites.hellaswag", "~data.suites.gsm8k")

# sweep -> (config folder under CONF/experiment, rows, sweep dir, overrides every job of it gets)
SWEEPS = {
    "rows": ("headline", ROWS, RUNS, ()),
    "keys": ("headline", KEYS_ROWS, RUNS, ()),
    "tune": ("headline/tune", TUNE, TUNE_RUNS, TUNE_DELETIONS),
}
HEAL_CMD = ["experiment=headline/heal_replace", search_path(CONF), f"hydra.run.dir={HEAL_DIR.relative_to(ROOT)}"]


def multirun(sweep: str, rows: tuple[str, ...] | list[str], extra: list[str] = ()) -> list[str]:
    """The train CLI's arguments of one multirun over ``rows`` of ``sweep``."""
    group, _, sweep_dir, common = SWEEPS[sweep]
    return ["-m", "experiment=" + ",".join(f"{group}/{r}" for r in rows), *common, *extra, search_path(CONF),
            f"hydra.sweep.dir={sweep_dir.relative_to(ROOT)}"]


def shell(args: list[str]) -> str:
    return shlex.join(["python", "-m", "smf_lightning.train", *args])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", action="store_true", help="the k-means-keys and healed-replace rows")
    ap.add_argument("--tune", action="store_true", help="the learning-rate search instead of the rows")
    ap.add_argument("--only", nargs="+", help="these rows of the sweep only")
    ap.add_argument("--list", action="store_true", help="print the multirun command(s), run nothing")
    ap.add_argument("--lanes", type=int, default=1,
                    help="multiruns at once over disjoint rows, the cores split between them (one log per lane)")
    ap.add_argument("--no-report", action="store_true", help="skip headline_report.py at the end")
    ap.add_argument("extra", nargs="*", help="Hydra overrides for every row (after --)")
    args = ap.parse_args()
    sweep = "tune" if args.tune else "keys" if args.keys else "rows"
    rows = args.only or list(SWEEPS[sweep][1])
    unknown = set(rows) - set(SWEEPS[sweep][1])
    if unknown:
        ap.error(f"not rows of the {sweep} sweep: {sorted(unknown)}; rows: {', '.join(SWEEPS[sweep][1])}")
    lanes = [rows[i::args.lanes] for i in range(min(args.lanes, len(rows)))]
    commands = [multirun(sweep, lane, args.extra) for lane in lanes]
    healing = any("healed" in r for r in rows) and not (HEAL_DIR / "healed" / "retrofit.json").exists()
    if args.list:
        print("\n".join(([shell(HEAL_CMD)] if healing else []) + [shell(c) for c in commands]))
        return 0
    train = [sys.executable, "-m", "smf_lightning.train"]
    if healing and subprocess.call([*train, *HEAL_CMD], cwd=ROOT):
        print(f"healing failed; see {HEAL_DIR / 'train.log'}")
        return 1

    def launch(i: int) -> int:
        print(shell(commands[i]), flush=True)
        if len(lanes) == 1:
            return subprocess.call([*train, *commands[i]], cwd=ROOT)
        threads = str(max(1, (os.cpu_count() or 2) // len(lanes)))  # share the cores: seconds per step are per lane
        env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS="1")
        SWEEPS[sweep][2].mkdir(parents=True, exist_ok=True)
        with (SWEEPS[sweep][2] / f"lane{i}.log").open("a") as log:  # interleaved output would be unreadable
            return subprocess.call([*train, *commands[i]], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    with ThreadPoolExecutor(max_workers=len(lanes)) as pool:
        failed = [i for i, rc in enumerate(pool.map(launch, range(len(lanes)))) if rc]
    if not args.no_report:
        subprocess.call([sys.executable, str(HERE / "headline_report.py")] + (["--tune"] if args.tune else []))
    if failed:
        print("a multirun failed; launch the same command again: finished rows are skipped, stopped ones resume")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
