"""What the study drivers (recipe/smf_recipe.py, headline/headline_v2.py, rephrase/rephrase.py)
share: where a study's runs live, the multirun command of its rows, the command that reproduces a
finished row, the archive of its finished rows' files, and the launch.

A study lives in its own folder, ``experiments/<study>/``: its page, its driver, its row configs
``conf/experiment/<sweep>/<row>.yaml`` (put on Hydra's search path by the multirun command, so
``experiment=<sweep>/<row>`` composes; the product's conf/ knows nothing of them) and its results.
A study is one Hydra multirun over its rows into a fixed sweep directory, one job folder per row;
launched again, it skips the finished rows (summary.json) and resumes the stopped ones from their
last task checkpoint (callbacks/sweep.py).

The small files of every finished row (SMALL_FILES, items/) are committed as one archive per sweep,
``results/<sweep>/rows.tar.xz``; the driver unpacks it beside itself (``results/<sweep>/<row>/``,
ignored by git) and packs it again after its report, so the tables can be rebuilt and a fresh
checkout does not run its committed rows again.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import shlex
import subprocess
import sys
import tarfile
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


def _belongs(f: Path, fingerprints: set[str]) -> bool:
    """Whether cache file ``f`` is of one of the base models ``fingerprints``: by the fingerprint it
    holds, or, for a file that holds none (rewordings: question -> style -> text), by the
    fingerprint's first 16 digits in its name (data/rewording.reword_cache_file)."""
    held = _fingerprint_of(f)
    if held is not None:
        return held in fingerprints
    return any(f"-{fp[:16]}-" in f.name for fp in fingerprints)


def keep_cache(fingerprints: set[str], seed: Path = CACHE_SEED, root: Path | None = None) -> list[Path]:
    """Copy the project cache's probe, before and rewordings files of the ``fingerprints`` (the
    finished rows' base model) into the committed seed, where new or changed (probe and rewordings
    files grow as runs add items)."""
    from smf_lightning.assets import SEEDED_CACHES

    root = root or _cache_root()
    kept = []
    for kind in SEEDED_CACHES:
        for f in sorted((root / kind).glob("*.json")):
            dest = seed / kind / f.name
            if _belongs(f, fingerprints) and (not dest.exists() or dest.read_bytes() != f.read_bytes()):
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


def search_path(conf: Path) -> str:
    """The override that puts a study's config folder (``experiments/<study>/conf``, holding
    ``experiment/<sweep>/<row>.yaml``) on Hydra's search path, written from the repository root
    (the drivers launch from there)."""
    conf = conf.resolve()
    return f"hydra.searchpath=[file://{conf.relative_to(ROOT) if conf.is_relative_to(ROOT) else conf}]"


def multirun(study: str, rows, runs: Path, conf: Path | None = None) -> list[str]:
    """The train CLI's arguments of the study's multirun over ``rows``: the row configs
    ``<conf>/experiment/<study>/<row>.yaml`` (``conf`` None: the rows are in conf/experiment/)."""
    return ["-m", "experiment=" + ",".join(f"{study}/{r}" for r in rows), *([search_path(conf)] if conf else []),
            f"hydra.sweep.dir={runs}"]


# the small files of a finished row that a study's report keeps in results/<sweep>/<row>/
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
    from smf_lightning.eval.metrics import item_points as all_points

    points = all_points(run)
    after = [p for p in points if p != "before"]
    return [p for p in points if p == "before" or p in after[-1:]]


ROWS_ARCHIVE = "rows.tar.xz"  # results/<sweep>/rows.tar.xz: the row folders beside it, packed


def _archived(path: Path) -> bool:
    """Whether a file of a row folder goes into the archive: the figures are left out (the run
    draws them again from the CSVs; nothing reads them back)."""
    return path.is_file() and path.suffix != ".png"


def pack_rows(results: Path, archive: Path | None = None) -> Path | None:
    """Pack every row folder under ``results`` (its files but the figures; the files directly in
    ``results`` are committed as they are) into ``results/rows.tar.xz``, byte for byte the same
    archive for the same files (sorted, no times or owners), so that git sees a change only when
    a row's files changed. Rewritten only when different; None when there is no row folder."""
    archive = archive or results / ROWS_ARCHIVE
    files = sorted(p for d in results.iterdir() if d.is_dir() for p in d.rglob("*") if _archived(p)) if results.is_dir() else []
    if not files:
        return None
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz", preset=9, format=tarfile.PAX_FORMAT) as tar:
        for p in files:
            info = tarfile.TarInfo(p.relative_to(results).as_posix())
            info.size, info.mode = p.stat().st_size, 0o644
            with p.open("rb") as f:
                tar.addfile(info, f)
    if not archive.is_file() or archive.read_bytes() != buf.getvalue():
        archive.write_bytes(buf.getvalue())
    return archive


def unpack_rows(results: Path, archive: Path | None = None) -> list[Path]:
    """Unpack ``results/rows.tar.xz`` into ``results`` (or the given ``archive`` into ``results``):
    a file not there yet, or there but older than the archive and different (an archive pulled
    since, with a row run again elsewhere); a copy newer than the archive (a row just finished
    here, packed by the next report) is kept. Returns the files written; none without an archive."""
    archive = archive or results / ROWS_ARCHIVE
    if not archive.is_file():
        return []
    packed_at = archive.stat().st_mtime
    written = []
    with tarfile.open(archive, mode="r:xz") as tar:
        for member in tar.getmembers():
            dest = (results / member.name).resolve()
            if not member.isfile() or not dest.is_relative_to(results.resolve()):
                continue  # only plain files inside the folder
            data = tar.extractfile(member).read()
            if dest.exists() and (dest.stat().st_mtime >= packed_at or dest.read_bytes() == data):
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
            written.append(dest)
    return written


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


def command_of(run: Path, conf: Path | None = None) -> str:
    """The command that ran the row, from the run's .hydra/overrides.yaml (or the command.txt that
    copy_small_files kept); logger and ckpt_path overrides left out (they change no result). With
    the study's config folder ``conf``, its search path is added (a run records only its own overrides)."""
    f = run / ".hydra" / "overrides.yaml"
    if not f.is_file() and (run / "command.txt").is_file():
        command = (run / "command.txt").read_text().strip()
    else:
        overrides = yaml.safe_load(f.read_text()) if f.is_file() else []
        kept = [o for o in overrides if not o.lstrip("+~").startswith(("logger.", "ckpt_path="))]
        command = shlex.join(["python", "-m", "smf_lightning.train", *kept])
    if conf is not None and "hydra.searchpath=" not in command:
        command += " " + shlex.quote(search_path(conf))
    return command


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
    # the study's config folder on the search path, from the repository root whatever the cwd
    searched = [re.sub(r"file://(?!/)", f"file://{ROOT}/", a) for a in args if a.startswith("hydra.searchpath=")]
    fixed = [a for a in args if a not in ("-m", sweep) and not a.startswith("hydra.")] + searched
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
    unpack_rows(results)  # the committed rows' files, where the driver reads them
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


def archives() -> list[Path]:
    """Every study's committed rows archive: experiments/<study>/results/<sweep>/rows.tar.xz."""
    return sorted(Path(__file__).resolve().parent.glob(f"*/results/*/{ROWS_ARCHIVE}"))


if __name__ == "__main__":
    # By hand, for a study without a driver (smollm) or to read the rows of every study at once;
    # the drivers unpack and pack their own.
    ap = argparse.ArgumentParser(description="unpack or pack a study's rows archive (results/<sweep>/rows.tar.xz)")
    ap.add_argument("action", choices=("unpack", "pack"))
    ap.add_argument("folders", nargs="*", type=Path, help="results/<sweep> folders (default: every study's)")
    a = ap.parse_args()
    for folder in a.folders or [p.parent for p in archives()]:
        if a.action == "unpack":
            print(f"{folder}: {len(unpack_rows(folder))} files unpacked")
        else:
            print(f"{folder}: {pack_rows(folder) or 'no row folder, nothing packed'}")
