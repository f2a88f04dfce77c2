"""Hyperparameter search with Optuna (docs/usage.md "Hyperparameter search"): ``hparams_search=smf_lr | lora_lr |
full_ft_lr`` select hydra-optuna-sweeper and a search space, and the task function returns the
objective (eval/objective.py) that the sweeper maximises."""

from __future__ import annotations

import json
import re
from pathlib import Path

import optuna
import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from smf_lightning.errors import ConfigError
from smf_lightning.eval.objective import (SUMMARY_METRICS, check_objective_config, lookup, optimized_value,
                                          recall_at_retention, suite_retention)
from smf_lightning.train import conf_dir
from test_train import TINY, cli

TINY_TOP_T = "tag(log, int(interval(4, 64)))"  # the tiny model has 256 slots; the real space goes to 1000


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def _interval(spec: str) -> tuple[float, float]:
    low, high = re.search(r"interval\(([^,]+),([^)]+)\)", spec).groups()
    return float(low), float(high)


def _summary(before=1.0, after=1.0, recall=0.5, higher_is_better=True):
    return {"fact_recall": recall, "heldout": {"triviaqa_known": {
        "metric": "em", "before": before, "after": after, "higher_is_better": higher_is_better}}}


# --- the objective ---------------------------------------------------------------------------------

def test_objective_is_recall_above_the_retention_floor_and_penalised_below_it():
    assert recall_at_retention(0.7, 0.99, 0.98, 10.0) == 0.7
    assert recall_at_retention(0.7, 0.98, 0.98, 10.0) == 0.7  # the floor itself is allowed
    assert recall_at_retention(1.0, 0.93, 0.98, 10.0) == pytest.approx(0.5)
    # forgetting 5% of the known facts to learn everything ranks below learning 80% and keeping them
    assert recall_at_retention(1.0, 0.93, 0.98, 10.0) < recall_at_retention(0.8, 1.0, 0.98, 10.0)


def test_retention_is_after_over_before_of_the_suites_primary_metric():
    assert suite_retention(_summary(before=0.8, after=0.6), "triviaqa_known") == pytest.approx(0.75)
    # lower is better (a perplexity): rising from 10 to 20 keeps half
    assert suite_retention(_summary(before=10.0, after=20.0, higher_is_better=False), "triviaqa_known") == 0.5
    with pytest.raises(ConfigError, match="is 0"):
        suite_retention(_summary(before=0.0, after=0.0), "triviaqa_known")
    with pytest.raises(ConfigError, match="objective.retention_suite='lambada'.*triviaqa_known"):
        suite_retention(_summary(), "lambada")


def test_optimized_value_of_a_summary():
    cfg = _compose("hparams_search=smf_lr", "experiment=facts_seq_quick")
    assert optimized_value(_summary(before=1.0, after=0.9, recall=0.6), cfg) == pytest.approx(0.6 - 10 * 0.08)
    cfg.optimized_metric = "heldout.triviaqa_known.after"
    assert optimized_value(_summary(after=0.9), cfg) == 0.9


def test_a_metric_the_summary_lacks_says_what_is_there():
    with pytest.raises(ConfigError, match=r"optimized_metric='heldout.nope.after': no 'nope' in heldout; there: triviaqa_known"):
        lookup(_summary(), "heldout.nope.after")
    with pytest.raises(ConfigError, match="not a number"):
        lookup(_summary(), "heldout.triviaqa_known")


def test_bad_objective_settings_stop_before_the_model_loads():
    cfg = _compose("hparams_search=smf_lr", "experiment=tiny")  # tiny has no triviaqa_known suite
    with pytest.raises(ConfigError, match="retention_suite='triviaqa_known' is not a held-out suite.*hellaswag"):
        check_objective_config(cfg)
    cfg.objective.retention_suite = "hellaswag"
    check_objective_config(cfg)
    cfg.optimized_metric = "recal"
    with pytest.raises(ConfigError, match="optimized_metric='recal'; allowed: objective"):
        check_objective_config(cfg)
    cfg.optimized_metric, cfg.objective.min_retention = "objective", 1.5
    with pytest.raises(ConfigError, match="min_retention=1.5"):
        check_objective_config(cfg)


# --- the configs -----------------------------------------------------------------------------------

def test_smf_lr_selects_the_optuna_sweeper_and_searches_lr_and_top_t():
    cfg = _compose("hparams_search=smf_lr", "experiment=tiny")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper.direction == "maximize" and sweeper.n_trials >= 10
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed is not None
    assert set(sweeper.params) == {"method.lr", "method.top_t"}
    assert sweeper.params["method.lr"].startswith("tag(log,")
    assert _interval(sweeper.params["method.lr"]) == (0.03, 3.0)
    assert "int(interval(" in sweeper.params["method.top_t"]
    assert cfg.optimized_metric == "objective" and cfg.objective.min_retention == 0.98
    assert cfg.method.name == "smf" and cfg.task_name == "tiny"  # the experiment still applies
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"


@pytest.mark.parametrize("search, method, params", [("lora_lr", "lora", {"method.lr", "method.r"}),
                                                    ("full_ft_lr", "full_ft", {"method.lr"})])
def test_each_baseline_has_its_search(search, method, params):
    cfg = _compose(f"hparams_search={search}", "experiment=facts_seq_quick")
    assert cfg.method.name == method and set(cfg.hydra.sweeper.params) == params
    low, high = _interval(cfg.hydra.sweeper.params["method.lr"])
    assert low < cfg.method.lr < high  # the method's default lies inside the range searched
    check_objective_config(cfg)  # facts_seq_quick has the known-facts suite


# --- a real search ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_search(tmp_path_factory) -> tuple[Path, Path]:
    sweep, db = tmp_path_factory.mktemp("optuna_sweep"), tmp_path_factory.mktemp("optuna_db") / "study.db"
    res = cli(["hparams_search=smf_lr", *TINY, "objective.retention_suite=hellaswag", "hydra.sweeper.n_trials=2",
               f"method.top_t={TINY_TOP_T}", f"hydra.sweep.dir={sweep}", f"hydra.sweeper.storage=sqlite:///{db}"])
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    return sweep, db


def test_two_trial_search_returns_each_jobs_objective(tiny_search):
    sweep, db = tiny_search
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    lr_low, lr_high = _interval(_compose("hparams_search=smf_lr").hydra.sweeper.params["method.lr"])
    top_low, top_high = _interval(TINY_TOP_T)
    best = results["best_params"]
    assert lr_low <= best["method.lr"] <= lr_high
    assert isinstance(best["method.top_t"], int) and top_low <= best["method.top_t"] <= top_high

    trials = optuna.load_study(study_name="smf_lr", storage=f"sqlite:///{db}").trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    for trial in trials:  # trial n ran in job folder n
        job = sweep / str(trial.number)
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        assert (cfg.method.lr, cfg.method.top_t) == (trial.params["method.lr"], trial.params["method.top_t"])
        summary = json.loads((job / "summary.json").read_text())
        assert trial.value == optimized_value(summary, cfg)  # what the task function returned
        assert set(SUMMARY_METRICS) <= set(summary)  # every metric check_objective_config allows is written
    assert results["best_value"] == max(t.value for t in trials)
    assert (sweep / "sweep_summary.csv").is_file()  # the sweep callback still runs under the Optuna sweeper


def test_a_bad_optimized_metric_stops_the_search_with_a_clear_error(tmp_path):
    res = cli(["hparams_search=smf_lr", *TINY, "optimized_metric=fact_recal", "hydra.sweeper.n_trials=1",
               f"method.top_t={TINY_TOP_T}", f"hydra.sweep.dir={tmp_path}"])
    assert res.returncode == 2
    assert "optimized_metric='fact_recal'; allowed: objective" in res.stdout + res.stderr
    assert not list(tmp_path.glob("*/summary.json"))  # stopped before training
