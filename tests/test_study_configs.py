"""Studies as Hydra experiment configs: every row of the headline study
(experiments/headline/conf/experiment/headline/) and of the SMF recipe study
(experiments/recipe/conf/experiment/recipe/) composes, with its study's conf/ folder on Hydra's
search path, to the config the old bespoke runners (experiments/headline.py, experiments/smf_recipe.py
before the studies became configs) ran for that row: ``experiment=<row file>`` against the runner's
base experiment plus its override list, both resolved, with the run directory as the only
difference allowed. The row configs live in their study's folder, not in the product's conf/."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from smf_lightning.train import conf_dir

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
sys.path[:0] = [*(str(EXPERIMENTS / study) for study in ("headline", "recipe", "rephrase", "scale")), str(EXPERIMENTS)]

import headline  # noqa: E402  (the thin wrappers that print and launch the multiruns)
import rephrase  # noqa: E402
import scale  # noqa: E402
import smf_recipe  # noqa: E402
import study  # noqa: E402

pytestmark = pytest.mark.study  # the studies under experiments/, not the package

HEAL_DIR = ROOT / "experiments" / "runs" / "heal_replace"

# ---- the old runners' rows, verbatim (experiments/headline.py and smf_recipe.py at ace9a87) ----

SMF = ["method.optimizer=adam", "method.lr=1.0"]
ROWS: dict[str, list[str]] = {
    **{f"smf_{sel}_t{t}": [*SMF, f"method.selector={sel}", f"method.top_t={t}"]
       for sel in ("kl", "tfidf") for t in (32, 128, 512)},
    "smf_random_t128": [*SMF, "method.selector=random", "method.top_t=128"],
    "smf_all": [*SMF, "method.selector=all"],
    "lora": ["method=lora", "method.lr=1e-4"],
    "full_ft": ["method=full_ft", "method.lr=1e-6", "callbacks.checkpoint.enabled=false"],
}
TUNE_BASE = ["data.n_tasks=2", "data.suites.nq_open.n_items=32", "data.suites.lambada.n_items=32",
             "~data.suites.hellaswag", "~data.suites.gsm8k", "callbacks.checkpoint.enabled=false"]
TUNE: dict[str, list[str]] = {
    "smf_adam_lr0.1": ["method.optimizer=adam", "method.lr=0.1"],
    "smf_adam_lr0.3": ["method.optimizer=adam", "method.lr=0.3"],
    "smf_sgd_lr300": ["method.optimizer=sgd", "method.lr=300"],
    "smf_sgd_lr1000": ["method.optimizer=sgd", "method.lr=1000"],
    "smf_sgd_lr3000": ["method.optimizer=sgd", "method.lr=3000"],
    "smf_t64_adam_lr0.3": ["method.top_t=64", "method.optimizer=adam", "method.lr=0.3"],
    "smf_t64_adam_lr1": ["method.top_t=64", "method.optimizer=adam", "method.lr=1.0"],
    "smf_t64_sgd_lr1000": ["method.top_t=64", "method.optimizer=sgd", "method.lr=1000"],
    "smf_t64_sgd_lr3000": ["method.top_t=64", "method.optimizer=sgd", "method.lr=3000"],
    "smf_t64_sgd_lr3000_suffix": ["method.top_t=64", "method.optimizer=sgd", "method.lr=3000", "data.loss_on=answer_and_suffix"],
    "smf_t64_adam_lr1_suffix": ["method.top_t=64", "method.optimizer=adam", "method.lr=1.0", "data.loss_on=answer_and_suffix"],
    "lora_lr1e-3": ["method=lora", "method.lr=1e-3"],
    "lora_lr3e-3": ["method=lora", "method.lr=3e-3"],
    "lora_lr3e-5": ["method=lora", "method.lr=3e-5"],
    "lora_lr1e-4": ["method=lora", "method.lr=1e-4"],
    "lora_lr3e-4": ["method=lora", "method.lr=3e-4"],
    "full_ft_lr1e-6": ["method=full_ft", "method.lr=1e-6"],
    "full_ft_lr3e-6": ["method=full_ft", "method.lr=3e-6"],
}
HEAL_CMD = ["experiment=heal", "heal.trainable=[values,gate,out]", "heal.max_steps=60", "heal.eval_every=20",
            "heal.n_heldout=50", "heal.target_ppl_ratio=null"]
KEYS_ROWS: dict[str, list[str]] = {
    "smf_kl_t128_kmeans": [*SMF, "method.selector=kl", "method.top_t=128", "model.memory.key_init=kmeans"],
    "smf_kl_t128_replace_healed": [*SMF, "method.selector=kl", "method.top_t=128", f"model.init_checkpoint={HEAL_DIR}/healed"],
}


def with_lr(overrides: list[str], lr: float) -> list[str]:
    return [o for o in overrides if not o.startswith("method.lr=")] + [f"method.lr={lr}"]


TUNE.update({
    **{f"keys_kmeans_lr{lr}": with_lr(KEYS_ROWS["smf_kl_t128_kmeans"], lr) for lr in (0.1, 0.3)},
    **{f"keys_healed_lr{lr}": with_lr(KEYS_ROWS["smf_kl_t128_replace_healed"], lr) for lr in (0.01, 0.1, 0.3)},
})
KEYS_ROWS["smf_kl_t128_kmeans_lr0.3"] = with_lr(KEYS_ROWS["smf_kl_t128_kmeans"], 0.3)
KEYS_ROWS["smf_kl_t128_replace_healed_lr0.1"] = with_lr(KEYS_ROWS["smf_kl_t128_replace_healed"], 0.1)

LEVERS: list[tuple[str, list[str]]] = [
    ("schedule", ["data.schedule=sequential", "data.train_batch_size=4", "data.epochs_per_task=1", "data.repeats_per_batch=5"]),
    ("output", ["model.memory.output=swilu"]),
    ("whitening", ["model.memory.input_norm=none"]),
    ("hubs", ["method.exclude_hubs=0.0"]),
    ("ownership", ["method.exclude_owned=false", "method.optimizer_state=carry"]),
    ("selection", ["method.select_per=step", "method.top_t=500"]),
    ("memory", ["model.memory.heads=4", "model.memory.n_slots=16384", "model.memory.knn=16", "model.memory.layers=[12]"]),
    ("background", ["data.background.triviaqa=128", "data.background.nq_open=64"]),
    ("zca", ["model.memory.input_norm=whiten", "model.memory.whiten_on=all"]),
    ("suffix", ["data.loss_on=answer"]),
    ("budget", ["method.top_t=30", "method.lr=1.0"]),
    ("gate", ["model.memory.read_gate=null"]),
    ("positions", ["method.loss_tokens_only=true", "model.memory.read_gate=0.3"]),
]
OLD_DEFAULTS = [
    "model.memory.layers=[12]", "model.memory.n_slots=16384", "model.memory.heads=4", "model.memory.knn=16",
    "model.memory.output=swilu", "model.memory.input_norm=none", "model.memory.whiten_on=all",
    "model.memory.score_scale=1.0", "model.memory.read_gate=null",
    "method.selector=kl", "method.top_t=500", "method.optimizer=adam", "method.lr=1.0", "method.select_per=step",
    "method.exclude_hubs=0.0", "method.exclude_owned=false", "method.optimizer_state=carry", "method.prefix_cache=4", "method.loss_tokens_only=true",
    "data.schedule=sequential", "data.train_batch_size=4", "data.repeats_per_batch=5", "data.epochs_per_task=1",
    "data.loss_on=answer", "data.background.triviaqa=128", "data.background.nq_open=64", "data.background.lambada=64",
]


def recipe_rows() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"old_defaults": OLD_DEFAULTS}
    for k in range(1, len(LEVERS) + 1):
        out[f"+{LEVERS[k - 1][0]}"] = [o for _, old in reversed(LEVERS[k:]) for o in old]
    out["recipe_kl"] = out.pop(f"+{LEVERS[-1][0]}")
    out["recipe_tfidf"] = ["method.selector=tfidf"]
    return out


# (row file under <study>/conf/experiment, the old runner's overrides of its row, the job folder's name)
CASES: list[tuple[str, list[str], str]] = [
    *[(f"headline/{n}", ["experiment=facts_seq_report", *o], n) for n, o in {**ROWS, **KEYS_ROWS}.items()],
    *[(f"headline/tune/{n}", ["experiment=facts_seq_report", *TUNE_BASE, *o], n) for n, o in TUNE.items()],
    *[(f"recipe/{n}", ["experiment=smf_recipe", *o, "logger.wandb.mode=disabled"], n) for n, o in recipe_rows().items()],
]
TUNE_DELETIONS = list(headline.TUNE_DELETIONS)  # on the tune multirun's command line: a file cannot delete


# every study's config folder, on the search path of the configs composed here
SMOLLM_CONF = EXPERIMENTS / "smollm" / "conf"  # rows launched with the training CLI (experiments/smollm/SMOLLM.md)
STUDY_CONFS = (smf_recipe.CONF, headline.CONF, rephrase.CONF, SMOLLM_CONF, scale.CONF)
SEARCH_ALL = "hydra.searchpath=[" + ",".join(f"file://{c}" for c in STUDY_CONFS) + "]"


def composed(overrides: list[str]) -> tuple[dict, dict]:
    """(the job's config, resolved, its run directory made a placeholder; hydra.sweep), with
    every study's conf/ folder on the search path."""
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, SEARCH_ALL], return_hydra_config=True)
    sweep = OmegaConf.to_container(cfg.hydra.sweep)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = "<run dir>"  # ${hydra:runtime.output_dir}: set when the job runs
    return OmegaConf.to_container(cfg, resolve=True), sweep


@pytest.fixture(autouse=True)
def _repo_root_cwd(monkeypatch):
    monkeypatch.setenv("PWD", str(ROOT))  # paths.root_dir: the commands run from the repository root


def row_files(conf: Path, sweep: str) -> set[str]:
    """The row configs of a study's sweep: ``<conf>/experiment/<sweep>/**.yaml`` as ``experiment=`` names."""
    root = conf / "experiment"
    return {p.relative_to(root).with_suffix("").as_posix() for p in (root / sweep).rglob("*.yaml")}


def test_every_row_file_is_a_case():
    files = row_files(headline.CONF, "headline") | row_files(smf_recipe.CONF, "recipe")
    assert files == {c for c, _, _ in CASES} | {"headline/heal_replace"}
    # the wrappers' studies are the old runners' rows, in the report's order
    assert (headline.ROWS, headline.KEYS_ROWS, headline.TUNE) == (tuple(ROWS), tuple(KEYS_ROWS), tuple(TUNE))
    assert smf_recipe.ROWS == tuple(recipe_rows())


def test_multirun_commands():
    args = headline.multirun("tune", ["lora_lr1e-3", "smf_adam_lr0.1"], ["trainer.max_time=00:01:00:00"])
    assert args == ["-m", "experiment=headline/tune/lora_lr1e-3,headline/tune/smf_adam_lr0.1", *TUNE_DELETIONS,
                    "trainer.max_time=00:01:00:00", "hydra.searchpath=[file://experiments/headline/conf]",
                    "hydra.sweep.dir=experiments/runs/headline_tune"]
    assert smf_recipe.multirun(["old_defaults", "+zca"]) == \
        ["-m", "experiment=recipe/old_defaults,recipe/+zca", "hydra.searchpath=[file://experiments/recipe/conf]",
         f"hydra.sweep.dir={smf_recipe.RUNS}"]
    assert rephrase.multirun(["dev_recipe", "dev_rewordings3_gate0.3"]) == \
        ["-m", "experiment=rephrase/dev_recipe,rephrase/dev_rewordings3_gate0.3",
         "hydra.searchpath=[file://experiments/rephrase/conf]", f"hydra.sweep.dir={rephrase.RUNS}"]


def test_study_configs_live_in_their_study_folder():
    """A study's rows (and the base experiments only its rows use) are in ``experiments/<study>/conf``,
    none in the product's conf/experiment/, and none shadows a product experiment: with the study's
    folder on the search path, ``experiment=<name>`` must still mean the product's config."""
    product = {p.relative_to(Path(conf_dir()) / "experiment").with_suffix("").as_posix()
               for p in (Path(conf_dir()) / "experiment").rglob("*.yaml")}
    for conf, sweeps, bases in ((smf_recipe.CONF, {"recipe"}, set()),
                                (headline.CONF, {"headline", "headline_v2"}, {"facts_seq_report"}),
                                (rephrase.CONF, {"rephrase"}, set()),
                                (SMOLLM_CONF, {"smollm"}, set()),
                                (scale.CONF, {"scale"}, set())):
        root = conf / "experiment"
        assert conf.parent.parent == EXPERIMENTS, conf  # experiments/<study>/conf
        assert {p.name for p in root.iterdir() if p.is_dir()} == sweeps, conf
        assert {p.stem for p in root.glob("*.yaml")} == bases, conf
        names = {p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml")}
        assert not names & product, f"{conf} shadows product experiments {sorted(names & product)}"
        assert not (Path(conf_dir()) / "experiment" / next(iter(sweeps))).exists()  # moved, not copied


@pytest.mark.parametrize("row,old,name", CASES, ids=[c for c, _, _ in CASES])
def test_row_config_is_the_old_runners_row(row, old, name):
    deletions = TUNE_DELETIONS if row.startswith("headline/tune/") else []
    new, sweep = composed([f"experiment={row}", *deletions])
    ref, _ = composed(old)
    assert new == ref
    assert sweep["subdir"] == name  # <sweep dir>/<row>: the old runner's run directory, the report's row name


def test_heal_replace_is_the_old_runners_healing_run():
    assert composed(["experiment=headline/heal_replace"])[0] == composed(HEAL_CMD)[0]


def test_row_files_open_with_their_command():
    for row, _, _ in CASES:
        conf = smf_recipe.CONF if row.startswith("recipe/") else headline.CONF
        text = (conf / "experiment" / f"{row}.yaml").read_text()
        assert text.startswith("# @package _global_\n# ")
        # the command runs from the repository root: the study's folder on the search path
        assert f"python -m smf_lightning.train -m experiment={row} '{study.search_path(conf)}' " in text


def study_row_files() -> list[tuple[str, Path | None]]:
    """(experiment name, the study's conf folder to put on the search path; None: in conf/)."""
    rows = [(r, headline.CONF) for d in ("headline", "headline_v2") for r in sorted(row_files(headline.CONF, d))]
    rows += [(r, smf_recipe.CONF) for r in sorted(row_files(smf_recipe.CONF, "recipe"))]
    rows += [(r, rephrase.CONF) for r in sorted(row_files(rephrase.CONF, "rephrase"))]
    rows += [(r, SMOLLM_CONF) for r in sorted(row_files(SMOLLM_CONF, "smollm"))]
    return [("heal", None), ("facts_seq_test", None), *rows]  # with the healing stage's own experiment and the test stream


@pytest.mark.parametrize("row,conf", study_row_files(), ids=[r for r, _ in study_row_files()])
def test_every_study_row_passes_the_config_check(row, conf):
    """The config checks a job makes at its start (study.check_rows, as the study drivers run
    them) accept every row of every study: a row that would stop at its start (smf_random_t300
    and smf_all once asked for hub exclusion, which needs the background statistics of
    kl/tfidf; experiment=heal inherited the recipe's read gate, which replace mode refuses)
    fails here, not in a sweep."""
    deletions = TUNE_DELETIONS if row.startswith("headline/tune/") else []
    study.check_rows(["-m", f"experiment={row}", *deletions, *([study.search_path(conf)] if conf else [])])


# ---- the second headline study (experiments/headline/conf/experiment/headline_v2/) ----

import headline_v2  # noqa: E402

V2_DIR = headline_v2.CONF / "experiment" / "headline_v2"


# row -> (method, selector, top_t, lr): what the row's name promises
V2_ROWS = {
    **{f"smf_{sel}_t{t}": ("smf", sel, t, 0.3) for sel in ("kl", "tfidf") for t in (100, 300, 1000)},
    "smf_kl_t300_lr0.1": ("smf", "kl", 300, 0.1), "smf_kl_t300_lr1": ("smf", "kl", 300, 1.0),
    "smf_random_t300": ("smf", "random", 300, 0.3), "smf_all": ("smf", "all", 300, 0.3),
    **{f"lora_lr{lr}": ("lora", None, None, float(lr)) for lr in ("1e-4", "3e-4", "1e-3")},
    **{f"full_ft_lr{lr}": ("full_ft", None, None, float(lr)) for lr in ("3e-6", "1e-5", "3e-5")},
}


def test_headline_v2_rows_are_its_files_and_share_one_stream():
    assert {p.stem for p in V2_DIR.glob("*.yaml")} == set(headline_v2.ROWS) == set(V2_ROWS)
    recipe, _ = composed(["experiment=recipe/recipe_kl"])
    for row, expected in V2_ROWS.items():
        cfg, sweep = composed([f"experiment=headline_v2/{row}"])
        assert sweep["subdir"] == row
        # the same stream, suites, model source and seed for every row: only the method differs
        assert (cfg["data"], cfg["seed"], cfg["model"]["source"]) == (recipe["data"], recipe["seed"], "offline"), row
        m = cfg["method"]
        assert (m["name"], m["selector"], m["top_t"], m["lr"]) == expected, row
    # the recipe's row is the recipe study's final row, setting for setting
    assert composed(["experiment=headline_v2/smf_kl_t300"])[0] == recipe


def test_headline_v2_multirun_command():
    assert headline_v2.CONF == headline.CONF  # one study folder, one search path: the page's two editions
    assert headline_v2.multirun(["lora_lr3e-4", "smf_kl_t100"]) == \
        ["-m", "experiment=headline_v2/lora_lr3e-4,headline_v2/smf_kl_t100",
         "hydra.searchpath=[file://experiments/headline/conf]", f"hydra.sweep.dir={headline_v2.RUNS}"]


def test_a_fresh_checkout_keeps_committed_rows_and_runs_only_the_rest(tmp_path, monkeypatch, capsys):
    """study.main: a row finished in the runs folder or kept in the results folder (a fresh
    checkout has only the latter) is not launched again; the report reads it from where it is."""
    runs, results = tmp_path / "runs", tmp_path / "results"
    for folder in (runs / "a", results / "b", results / "a"):
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text("{}")
    (runs / "a" / ".hydra").mkdir()
    (runs / "a" / ".hydra" / "overrides.yaml").write_text("- experiment=s/a\n- logger.wandb.mode=disabled\n")
    assert study.finished_rows(("a", "b", "c"), runs, results) == [("a", runs / "a"), ("b", results / "b")]
    study.copy_small_files(runs / "a", results / "a")
    assert study.command_of(results / "a") == study.command_of(runs / "a") == "python -m smf_lightning.train experiment=s/a"

    launched, reported, checked = [], [], []
    monkeypatch.setenv("SMF_CACHE", str(tmp_path / "cache"))  # the committed cache seed lands here, not in ~/.cache
    monkeypatch.setattr(study, "launch", lambda cmd, where: launched.append(cmd))
    monkeypatch.setattr(study, "check_rows", lambda cmd: checked.append(cmd))
    def run(*argv):
        monkeypatch.setattr(sys, "argv", ["driver", *argv])
        study.main("doc", ("a", "b", "c"), lambda rows: ["-m", ",".join(rows)], lambda: reported.append(1), runs, results)
    run()
    assert launched == checked == [["-m", "c"]] and reported == [1]  # every launched row checked first
    run("--only", "a", "b")
    assert launched == [["-m", "c"]] and reported == [1, 1]
    run("--list", "--only", "b", "c")
    assert capsys.readouterr().out.strip().endswith("smf_lightning.train -m c")
    with pytest.raises(SystemExit, match="unknown rows"):
        run("--only", "d")
    # a row's command with its study's config folder: the search path the row needs, added once
    conf = EXPERIMENTS / "recipe" / "conf"
    assert study.command_of(results / "a", conf) == \
        "python -m smf_lightning.train experiment=s/a 'hydra.searchpath=[file://experiments/recipe/conf]'"
    (results / "a" / "command.txt").write_text(study.command_of(results / "a", conf))
    assert study.command_of(results / "a", conf) == (results / "a" / "command.txt").read_text()


def test_rows_archive_round_trip(tmp_path, monkeypatch, capsys):
    """study.pack_rows packs the row folders (not the figures, not the files beside them) into
    rows.tar.xz, the same bytes for the same files; study.unpack_rows puts them back, over a copy
    older than the archive, not over a newer one; a fresh checkout with only the archive runs none
    of its rows."""
    import os

    results = tmp_path / "results"
    for row in ("a", "b"):
        (results / row / "items" / "before").mkdir(parents=True)
        (results / row / "summary.json").write_text(f'{{"row": "{row}"}}')
        (results / row / "items" / "before" / "nq_open.csv").write_text("id,em\n1,1.0\n")
        (results / row / "accuracy_matrix.png").write_bytes(b"png")
    (results / "table.md").write_text("| row |\n")
    archive = study.pack_rows(results)
    assert archive == results / study.ROWS_ARCHIVE
    first = archive.read_bytes()
    (results / "a" / "summary.json").touch()  # a newer time, the same bytes: the same archive
    assert study.pack_rows(results).read_bytes() == first

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / study.ROWS_ARCHIVE).write_bytes(first)
    (fresh / "b").mkdir()
    (fresh / "b" / "summary.json").write_text("newer")
    written = study.unpack_rows(fresh)
    assert sorted(p.relative_to(fresh).as_posix() for p in written) == \
        ["a/items/before/nq_open.csv", "a/summary.json", "b/items/before/nq_open.csv"]
    assert (fresh / "b" / "summary.json").read_text() == "newer" and not (fresh / "a" / "accuracy_matrix.png").exists()
    assert not (fresh / "table.md").exists() and study.unpack_rows(fresh) == []
    stale = fresh / "b" / "summary.json"  # a copy from before the archive was pulled: the archive's wins
    os.utime(stale, (0, 0))
    assert study.unpack_rows(fresh) == [stale.resolve()] and stale.read_text() == '{"row": "b"}'
    assert study.pack_rows(tmp_path / "empty") is None

    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / study.ROWS_ARCHIVE).write_bytes(first)
    launched = []
    monkeypatch.setattr(study, "launch", lambda cmd, where: launched.append(cmd))
    monkeypatch.setattr(study, "check_rows", lambda cmd: None)
    monkeypatch.setattr(study, "seed_cache", lambda: [])
    monkeypatch.setenv("SMF_CACHE", str(tmp_path / "cache"))  # the cache kept after the launch: here, not in ~/.cache
    monkeypatch.setattr(sys, "argv", ["driver"])
    study.main("doc", ("a", "b", "c"), lambda rows: ["-m", ",".join(rows)], lambda: None, tmp_path / "runs", checkout)
    assert launched == [["-m", "c"]]


def test_study_checks_every_row_before_launching_any():
    """study.check_rows makes each job's start-of-run checks on every row of a multirun: a bad
    row is named with the reason, before any row runs."""
    study.check_rows(headline_v2.multirun(["smf_kl_t100", "lora_lr1e-4", "smf_all"]))  # good rows pass
    bad = ["-m", "experiment=headline_v2/lora_lr1e-4,headline_v2/smf_random_t300,headline_v2/smf_nope",
           "++method.exclude_hubs=0.1", study.search_path(headline_v2.CONF), "hydra.sweep.dir=x"]
    with pytest.raises(SystemExit, match="nothing launched") as e:
        study.check_rows(bad)
    assert "headline_v2/smf_random_t300: bad config: method.exclude_hubs=0.1" in str(e.value)
    assert "headline_v2/smf_nope: " in str(e.value)  # no such row file: the job would not compose
    assert "lora_lr1e-4" not in str(e.value)  # LoRA has no hub exclusion to refuse


def test_cache_seed_round_trip(tmp_path):
    """study.keep_cache keeps the base model's probe and before files (new or grown), not other
    models'; study.seed_cache puts them into an empty project cache and never overwrites."""
    import json

    root, seed, fp = tmp_path / "cache", tmp_path / "seed", "f" * 64
    files = {"probes/probe-a.json": {"header": {"model_fingerprint": fp}, "records": {"q1": {}}},
             "before_eval/before_b.json": {"key": {"base_model": fp}, "point": {}},
             "probes/probe-tiny.json": {"header": {"model_fingerprint": "other"}, "records": {}},
             f"rewordings/rewordings-{fp[:16]}-40.json": {"Q?": {"synonyms-0": "R?"}},  # no header: its name
             f"rewordings/rewordings-{'e' * 16}-40.json": {"Q?": {}}}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(data))
    kept = study.keep_cache({fp}, seed=seed, root=root)
    assert sorted(p.relative_to(seed).as_posix() for p in kept) == ["before_eval/before_b.json", "probes/probe-a.json",
                                                                    f"rewordings/rewordings-{fp[:16]}-40.json"]
    assert study.keep_cache({fp}, seed=seed, root=root) == []  # unchanged: nothing to keep
    (root / "probes/probe-a.json").write_text(json.dumps({"header": {"model_fingerprint": fp}, "records": {"q1": {}, "q2": {}}}))
    assert study.keep_cache({fp}, seed=seed, root=root) == [seed / "probes/probe-a.json"]  # grown

    fresh = tmp_path / "fresh"
    assert sorted(p.relative_to(fresh).as_posix() for p in study.seed_cache(seed, fresh)) == \
        ["before_eval/before_b.json", "probes/probe-a.json", f"rewordings/rewordings-{fp[:16]}-40.json"]
    (fresh / "probes/probe-a.json").write_text("{}")
    assert study.seed_cache(seed, fresh) == [] and (fresh / "probes/probe-a.json").read_text() == "{}"


# ---- the rephrased-questions study (experiments/rephrase/conf/experiment/rephrase/) ----


def test_rephrase_rows_are_its_files_and_run_on_the_dev_or_test_stream():
    conf = rephrase.CONF / "experiment" / "rephrase"
    assert set(rephrase.ROWS) == {p.stem for p in conf.glob("*.yaml")}
    for row in rephrase.ROWS:  # each file opens with the driver's command that runs (or resumes) it
        text = (conf / f"{row}.yaml").read_text()
        assert text.startswith("# @package _global_\n# ")
        assert f"\n#   python experiments/rephrase/rephrase.py --only {row}\n" in text
    dev, _ = composed(["experiment=smf_recipe"])
    test, _ = composed(["experiment=facts_seq_test"])
    for row in rephrase.ROWS:
        cfg, sweep = composed([f"experiment=rephrase/{row}"])
        stream = test if row.startswith("test") else dev
        assert sweep["subdir"] == row
        for key in ("seed", "probe_pool_size", "n_tasks", "facts_per_task", "exclude_streams", "suites"):
            assert cfg["data"][key] == stream["data"][key], (row, key)
    assert test["data"]["exclude_streams"] == ["dev", "quick"] and test["data"]["seed"] != dev["data"]["seed"]


# the dev candidate's overrides of the dev stream (dev_rewordings6_within.yaml), which its test rows repeat
REPHRASE_CANDIDATE = ["data.rewordings=6", "model.memory.input_norm=zca_within",
                      "model.memory.within_groups=rewordings", "model.memory.within_questions=200"]
# test method -> the overrides of the test stream its rows add (besides seed and data.order_seed)
REPHRASE_TEST = {
    "smf": [*REPHRASE_CANDIDATE, "model.memory.serve_gate=0.9"],  # trained as the candidate, answering at 0.9
    "lora": ["method=lora", "method.lr=3e-4", "data.rewordings=6"],
    "full": ["method=full_ft", "method.lr=3e-6", "data.rewordings=6"],
    "recipe": [],
}


def test_rephrase_test_rows_are_the_candidate_and_its_matched_baselines_with_three_seeds():
    """The test rows: on the test stream (data.seed 1, no fact of dev or quick); the SMF rows are the
    dev candidate's overrides answering at serve_gate 0.9, the baselines the stated lr on the same training data (the six
    rewordings, no whitening); a method's seeds differ only in seed and data.order_seed."""
    assert rephrase.ROWS[:len(rephrase.DEV_ROWS)] == rephrase.DEV_ROWS  # dev rows first
    assert set(rephrase.TEST_ROWS) == {f"test_{m}_s{s}" for m in ("smf", "lora", "full") for s in (0, 1, 2)} | {"test_recipe_s0"}
    off = ["logger.wandb.mode=disabled"]
    dev, _ = composed(["experiment=rephrase/dev_rewordings6_within"])
    assert dev == composed(["experiment=smf_recipe", *REPHRASE_CANDIDATE, *off])[0]
    by_method: dict[str, dict[int, dict]] = {}
    for row in rephrase.TEST_ROWS:
        method, s = rephrase.method_of(row), int(row.rsplit("_s", 1)[1])
        cfg, sweep = composed([f"experiment=rephrase/{row}"])
        assert sweep["subdir"] == row
        assert cfg["data"]["seed"] == 1 and cfg["data"]["exclude_streams"] == ["dev", "quick"], row
        assert (cfg["seed"], cfg["data"]["order_seed"]) == (s, s), row
        assert cfg == composed(["experiment=facts_seq_test", *REPHRASE_TEST[method], *off, f"seed={s}", f"data.order_seed={s}"])[0], row
        by_method.setdefault(method, {})[s] = cfg
    assert {m: sorted(v) for m, v in by_method.items()} == {"smf": [0, 1, 2], "lora": [0, 1, 2], "full": [0, 1, 2], "recipe": [0]}

    def unseeded(cfg: dict) -> dict:
        cfg = {**cfg, "data": dict(cfg["data"])}
        del cfg["seed"], cfg["data"]["order_seed"]
        return cfg

    for method, seeds in by_method.items():
        assert all(unseeded(c) == unseeded(seeds[0]) for c in seeds.values()), method
    smf, lora, full = (by_method[m][0] for m in ("smf", "lora", "full"))
    # the SMF rows: the dev candidate everywhere but the stream's keys (facts_seq_test over smf_recipe) and the seeds
    # ... and answering at the serving gate the dev frontier chose; training reads at the candidate's gate
    assert smf["model"]["memory"] == {**dev["model"]["memory"], "serve_gate": 0.9} and smf["method"] == dev["method"]
    assert smf["model"]["memory"]["read_gate"] == dev["model"]["memory"]["read_gate"] == 0.5
    assert smf["data"]["rewordings"] == 6 and smf["model"]["memory"]["input_norm"] == "zca_within"
    assert (lora["method"]["name"], lora["method"]["lr"]) == ("lora", 3e-4)
    assert (full["method"]["name"], full["method"]["lr"]) == ("full_ft", 3e-6)
    assert lora["data"] == full["data"] == smf["data"]  # the same training data: stream, rewordings, seeds
    assert lora["model"]["memory"]["input_norm"] != "zca_within"  # the whitening is the memory's, not the baselines'
    assert by_method["recipe"][0]["data"]["rewordings"] == 0


def test_rephrase_multirun_of_test_rows():
    assert rephrase.multirun(["test_smf_s0", "test_lora_s2"]) == \
        ["-m", "experiment=rephrase/test_smf_s0,rephrase/test_lora_s2",
         "hydra.searchpath=[file://experiments/rephrase/conf]", f"hydra.sweep.dir={rephrase.RUNS}"]


def _fake_summary(recall: float, rephrased: float, known: float, lambada: float, bwt: float, steps: int = 100) -> dict:
    """A summary.json with the keys rephrase.row_of reads; made-up numbers for the aggregation test."""
    suite = lambda rel: {"rel_change": rel, "rel_change_ci95": [rel - 0.01, rel + 0.01], "after": 0.5}  # noqa: E731
    return {"method": "smf", "n_tasks": 5, "facts_per_task": 40, "fact_recall": recall, "fact_recall_ci95": [0.0, 1.0],
            "fact_recall_heldout_template": 1.0, "fact_recall_rephrased": rephrased,
            "fact_recall_rephrased_contains": rephrased, "recall": {"fact_recall_rephrased": {"ci95": [0.0, 1.0]}},
            "wrong_answer_is_other_fact": {"rephrased": {"share": 0.0}}, "bwt": bwt,
            "heldout": {"triviaqa_known": {"after": known, "ci95": [0.9, 1.0]}, "nq_open": suite(0.0),
                        "hellaswag": suite(0.0), "gsm8k": suite(0.002), "lambada": suite(lambada)},
            "data": {"rewordings": {"kept": 543}}, "steps": steps, "seconds_per_step": 5.0, "eval_seconds": 60.0}


def test_rephrase_test_table_groups_the_seeds_of_each_method(tmp_path, monkeypatch):
    """report(): the test rows grouped by method, the mean over the finished seeds with their min and
    max, "(n of 3 seeds)" for a method not finished; dev rows stay out of the test table; the table
    lands between the rephrase-test-table markers."""
    import json

    runs, results = tmp_path / "runs", tmp_path / "results"
    summaries = {
        "dev_recipe": _fake_summary(1.0, 0.2, 0.99, 0.001, 0.0),
        "test_smf_s0": _fake_summary(1.0, 0.80, 0.96, 0.010, 0.0),
        "test_smf_s1": _fake_summary(0.98, 0.86, 0.94, 0.016, -0.01),
        "test_smf_s2": _fake_summary(0.99, 0.83, 0.95, 0.013, -0.02),
        "test_lora_s1": _fake_summary(0.70, 0.40, 0.90, 0.050, -0.30, steps=200),
        "test_lora_s2": _fake_summary(0.60, 0.30, 0.80, 0.070, -0.40, steps=200),
    }
    for row, s in summaries.items():
        (runs / row).mkdir(parents=True)
        (runs / row / "summary.json").write_text(json.dumps(s))
    page = tmp_path / "REPHRASE.md"
    page.write_text(f"# page\n\n{rephrase.TEST_MARKERS[0]}\n(no finished test row yet)\n{rephrase.TEST_MARKERS[1]}\n\n"
                    f"{rephrase.MARKERS[0]}\n{rephrase.MARKERS[1]}\nend\n")
    monkeypatch.setattr(rephrase, "RUNS", runs)
    monkeypatch.setattr(rephrase, "RESULTS", results)
    monkeypatch.setattr(rephrase, "HERE", tmp_path)

    rows = [rephrase.row_of(r, runs / r) for r in summaries]
    groups = rephrase.group_by_method([r for r in rows if r["stream"] == "test"])
    assert [g["method"] for g in groups] == ["smf", "lora"]  # TEST_METHODS' order; no row of full or recipe: no line
    smf, lora = groups
    assert (smf["n"], smf["planned"], lora["n"], lora["planned"]) == (3, 3, 2, 3)
    assert smf["rephrased"] == pytest.approx((0.80 + 0.86 + 0.83) / 3)
    assert (smf["rephrased_min"], smf["rephrased_max"]) == (0.80, 0.86)
    assert smf["known_kept"] == pytest.approx(0.95) and smf["lambada_rel_change"] == pytest.approx(0.013)
    assert smf["bwt"] == pytest.approx(-0.01) and lora["recall"] == pytest.approx(0.65) and lora["steps"] == 200
    assert lora["lambada_rel_change_min"] == 0.05 and lora["lambada_rel_change_max"] == 0.07

    rephrase.report()
    doc = page.read_text()
    table = doc.split(rephrase.TEST_MARKERS[0], 1)[1].split(rephrase.TEST_MARKERS[1], 1)[0]
    smf_line = next(line for line in table.splitlines() if "`test_smf_s*`" in line)
    lora_line = next(line for line in table.splitlines() if "`test_lora_s*`" in line)
    assert "**0.830** (0.800 – 0.860)" in smf_line and "+1.30% (+1.00% – +1.60%)" in smf_line
    assert "of 3 seeds" not in smf_line and "(2 of 3 seeds) | 2 |" in lora_line
    assert "dev_recipe" not in table and "test_full" not in table and "(no finished test row yet)" not in table
    assert "dev_recipe" in doc.split(rephrase.MARKERS[0], 1)[1]  # the per-row table keeps every row
    assert (results / "rephrase_test.csv").is_file() and (results / "test_smf_s0" / "summary.json").is_file()
    assert rephrase.methods_markdown([]) == "(no finished test row yet)"
