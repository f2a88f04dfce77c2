"""What the study drivers (smf_recipe.py, headline_v2.py) share: where a study's runs live, the
multirun command of its rows, the command that reproduces a finished row, and the launch.

A study is one Hydra multirun over row configs ``conf/experiment/<study>/<row>.yaml`` into a fixed
sweep directory, one job folder per row; launched again, it skips the finished rows (summary.json)
and resumes the stopped ones from their last task checkpoint (callbacks/sweep.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


# The probe and before-evaluation caches of the studies' base model, committed: a fresh
# machine starts with an empty project cache, and recomputing them costs ~50 minutes of a 2-core
# CPU per machine (the probes of 600 stream candidates and ~3,000 known-fact candidates, the
# before point of 200-item suites). Seeded from here (smf_lightning.assets.seed_cache, also run by
# make train), every row on every machine also trains on the same stream and pairs with the same
# before point. Files are keyed as in the project cache (model fingerprint, prompts, suites, items,
# EVAL_FORMAT), so a changed setup computes anew.
CACHE_SEED = ROOT / "src" / "smf_lightning" / "seed_cache"  # the package's seed (smf_lightning.assets.SEED_CACHE)


def _cache_root() -> Path:
    from smf_lightning.assets import cache_root

    return cache_root()


def seed_cache(seed: Path = CACHE_SEED, root: Path | None = None) -> list[Path]:
    """smf_lightning.assets.seed_cache from the committed seed folder by default."""
    from smf_lightning.assets import seed_cache as seed_project_cache

    return seed_project_cache(seed, root)


def _fingerprint_of(f: Path) -> str | None:
    """The base model's fingerprint a cache file belongs to (probes: in its header; before: its key)."""
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return (data.get("header") or {}).get("model_fingerprint") or (data.get("key") or {}).get("base_model")


def keep_cache(fingerprints: set[str], seed: Path = CACHE_SEED, root: Path | None = None) -> list[Path]:
    """Copy the project cache's probe and before files of the ``fingerprints`` (the finished rows'
    base model) into the committed seed, where new or changed (probe files grow as runs add items)."""
    from smf_lightning.assets import SEEDED_CACHES

    root = root or _cache_root()
    kept = []
    for kind in SEEDED_CACHES:
        for f in sorted((root / kind).glob("*.json")):
            dest = seed / kind / f.name
            if _fingerprint_of(f) in fingerprints and (not dest.exists() or dest.read_bytes() != f.read_bytes()):
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dest)
                kept.append(dest)
    return kept


def runs_dir(study: str) -> Path:
    """Where a study's runs (with their task checkpoints) live: outside the work tree, beside the
    project's cache, so a study can span several launches on the same machine ($SMF_STUDY_RUNS, default
    <SMF cache>/study_runs)."""
    base = os.environ.get("SMF_STUDY_RUNS") or Path(os.environ.get("SMF_CACHE") or Path.home() / ".cache" / "smf_lightning") / "study_runs"
    return Path(base) / study


def multirun(study: str, rows, runs: Path) -> list[str]:
    """The train CLI's arguments of the study's multirun over ``rows``."""
    return ["-m", "experiment=" + ",".join(f"{study}/{r}" for r in rows), f"hydra.sweep.dir={runs}"]


# the small files of a finished row that a study's report keeps in experiments/results/<study>/<row>/
SMALL_FILES = ("summary.json", "accuracy_matrix.csv", "accuracy_matrix_heldout_template.csv",
               "accuracy_matrix_rephrased.csv", "heldout.csv", "slot_stats.csv", "accuracy_matrix.png",
               "forgetting_curves.png", "slot_stats.png")


def copy_small_files(run: Path, dest: Path) -> None:
    """Copy the row's SMALL_FILES that exist from its run folder into ``dest``, and its command
    (command.txt), so that the report can be rebuilt where the run folder is gone."""
    if run.resolve() == dest.resolve():
        return
    dest.mkdir(parents=True, exist_ok=True)
    for small in SMALL_FILES:
        if (run / small).is_file():
            shutil.copy2(run / small, dest / small)
    for point in item_points(run):  # per-item scores before and after the stream (claim.py pairs rows on them)
        (dest / "items" / point).mkdir(parents=True, exist_ok=True)
        for f in (run / "items" / point).glob("*.csv"):
            shutil.copy2(f, dest / "items" / point / f.name)
    (dest / "command.txt").write_text(command_of(run) + "\n")


def item_points(run: Path) -> list[str]:
    """The folders under items/ of the run's first and last evaluation points ("before",
    "after_task_<last>"), the points where every suite is scored (eval first_last)."""
    after = sorted((p.name for p in (run / "items").glob("after_task_*") if p.name[11:].isdigit()), key=lambda n: int(n[11:]))
    return [p for p in ("before", *after[-1:]) if (run / "items" / p).is_dir()]


def finished_rows(rows, runs: Path, results: Path) -> list[tuple[str, Path]]:
    """(row, folder) of each finished row in ``rows``' order: its run folder under ``runs``, or, on
    a machine without it (a fresh checkout), the copy of its small files in ``results``."""
    found = []
    for row in rows:
        for folder in (runs / row, results / row):
            if (folder / "summary.json").is_file():
                found.append((row, folder))
                break
    return found


def command_of(run: Path) -> str:
    """The command that ran the row, from the run's .hydra/overrides.yaml (or the command.txt that
    copy_small_files kept); logger and ckpt_path overrides left out (they change no result)."""
    f = run / ".hydra" / "overrides.yaml"
    if not f.is_file() and (run / "command.txt").is_file():
        return (run / "command.txt").read_text().strip()
    overrides = yaml.safe_load(f.read_text()) if f.is_file() else []
    kept = [o for o in overrides if not o.lstrip("+~").startswith(("logger.", "ckpt_path="))]
    return shlex.join(["python", "-m", "smf_lightning.train", *kept])


def check_rows(args: list[str]) -> None:
    """The config checks each job of the multirun ``args`` makes at its start (composition, then
    smf_lightning.train.check), made on every job before any is launched, so that a bad row
    stops the study now and not after hours of the rows before it."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import open_dict

    from smf_lightning.config import ConfigError
    from smf_lightning.train import check, conf_dir

    sweep = next(a for a in args if a.startswith("experiment="))
    fixed = [a for a in args if a not in ("-m", sweep) and not a.startswith("hydra.")]
    errors = []
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        for experiment in sweep.split("=", 1)[1].split(","):
            try:
                cfg = compose("train", overrides=[f"experiment={experiment}", *fixed], return_hydra_config=True)
                with open_dict(cfg):
                    del cfg["hydra"]
                    cfg.paths.output_dir = str(ROOT)  # the job's own folder does not exist yet: nothing is written
                check(cfg)
            except (HydraException, ConfigError) as e:  # it would not compose (missing file, bad override) or not pass
                errors.append(f"  {experiment}: {e}")
    if errors:
        raise SystemExit("rows that would stop at their start; nothing launched:\n" + "\n".join(errors))


def launch(args: list[str], runs: Path) -> None:
    """Run the multirun ``args`` from the repository root; a clear message if a row failed."""
    print(shlex.join(["python", "-m", "smf_lightning.train", *args]), flush=True)
    rc = subprocess.call([sys.executable, "-m", "smf_lightning.train", *args], cwd=ROOT)
    if rc != 0:
        raise SystemExit(f"a row failed (exit code {rc}); see its train.log under {runs}, then launch again to resume")


def main(doc: str, rows: tuple[str, ...], multirun_of, report, runs: Path, results: Path) -> None:
    """A study driver's command line: --list prints the multirun command of the rows, --only
    picks rows, --report writes the report of the finished rows; otherwise the multirun runs
    the rows not finished yet (no summary.json under ``runs`` nor ``results``, so that a fresh
    checkout does not run its committed rows again) and the report follows, even when a row failed."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="row names (default: every row)")
    ap.add_argument("--list", action="store_true", help="print the multirun command of the unfinished rows, run nothing")
    ap.add_argument("--report", action="store_true", help="tables from the finished rows")
    args = ap.parse_args()
    unknown = set(args.only or []) - set(rows)
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; rows: {', '.join(rows)}")
    if args.report:
        report()
        return
    done = {name for name, _ in finished_rows(rows, runs, results)}
    todo = [r for r in (args.only or rows) if r not in done]
    if not todo:
        print(f"every row asked for is finished ({runs} or {results}); writing the report")
        report()
        return
    cmd = multirun_of(todo)
    if args.list:
        print(shlex.join(["python", "-m", "smf_lightning.train", *cmd]))
        return
    check_rows(cmd)
    seeded = seed_cache()
    if seeded:
        print(f"project cache seeded with {len(seeded)} committed probe/before files ({CACHE_SEED})")
    try:
        launch(cmd, runs)
    finally:
        report()
        prints = {(json.loads((p / "summary.json").read_text()).get("data") or {}).get("probe", {}).get("model_fingerprint")
                  for _, p in finished_rows(rows, runs, results)}
        kept = keep_cache(prints - {None})
        if kept:
            print(f"kept {len(kept)} probe/before cache files in {CACHE_SEED}: commit them")
