"""95% intervals: the seeded bootstrap against hand-computed cases and exact invariants, the
suites' numbers unchanged by per-item scoring and recomputed exactly from their items files,
torchmetrics as an oracle for F1/EM and perplexity, and the new fields of a tiny CLI run."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from smf_lightning.data.facts import Fact, FactTemplate
from smf_lightning.data.sources import ChoiceItem, MathItem, PassageItem, QAItem
from smf_lightning.eval import intervals as ci
from smf_lightning.eval.metrics import Aggregate, aggregate, exact_match, token_f1
from smf_lightning.eval.scoring import encode_context_continuation, score_choices, score_continuations, score_sequences
from smf_lightning.eval.suites import FactRecallSuite, GSM8KSuite, HellaSwagSuite, LambadaSuite, NQOpenSuite

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- bootstrap


def test_seeded_bootstrap_is_reproducible():
    assert np.array_equal(ci.resample_indices(7, 50, 3), ci.resample_indices(7, 50, 3))
    assert not np.array_equal(ci.resample_indices(7, 50, 3), ci.resample_indices(7, 50, 4))
    cols = {"x": [0.1, 0.7, 0.2, 0.9, 0.4]}
    agg = Aggregate("mean", "x")
    assert ci.point_interval(agg, cols, 200, 0) == ci.point_interval(agg, cols, 200, 0)


def test_bootstrap_leaves_global_rngs_alone():
    torch.manual_seed(0)
    np.random.seed(0)
    expected_t, expected_np = torch.rand(3), np.random.rand(3)
    torch.manual_seed(0)
    np.random.seed(0)
    ci.point_interval(Aggregate("mean", "x"), {"x": [0.0, 1.0, 1.0]}, 100, 5)
    assert torch.equal(torch.rand(3), expected_t) and np.array_equal(np.random.rand(3), expected_np)


@pytest.mark.parametrize("seed", range(5))
def test_interval_contains_point_estimate_of_a_mean(seed):
    rng = np.random.default_rng(100 + seed)
    for values in (rng.integers(0, 2, 40).astype(float), rng.random(25)):
        cols = {"x": list(values)}
        low, high = ci.point_interval(Aggregate("mean", "x"), cols, 1000, seed)
        assert low <= aggregate(Aggregate("mean", "x"), cols) <= high
        assert low < high


def test_hand_computed_small_case():
    # items [0, 1]; the four resamples {00, 01, 11, 10} have means 0, .5, 1, .5; the 2.5% / 97.5%
    # quantiles by linear interpolation sit at positions 0.075 and 2.925 of the sorted [0, .5, .5, 1].
    idx = np.array([[0, 0], [0, 1], [1, 1], [1, 0]])
    stats = ci.resampled(Aggregate("mean", "x"), {"x": [0.0, 1.0]}, idx)
    assert stats.tolist() == [0.0, 0.5, 1.0, 0.5]
    low, high = ci.percentile_interval(stats)
    assert low == pytest.approx(0.075 * 0.5) and high == pytest.approx(0.5 + 0.925 * 0.5)
    # token-weighted: a resample's NLL is its summed NLL over its summed tokens
    cols = {"lp": [-2.0, -9.0], "n": [1.0, 3.0]}
    assert ci.resampled(Aggregate("nll_ratio", "lp", "n"), cols, idx).tolist() == [2.0, 11 / 4, 3.0, 11 / 4]


def test_perplexity_resamples_summed_log_probs_not_item_perplexities():
    cols = {"lp": [-1.0, -4.0, -2.5], "n": [1.0, 4.0, 2.0]}
    agg = Aggregate("ppl_ratio", "lp", "n")
    assert aggregate(agg, cols) == math.exp(7.5 / 7)
    assert aggregate(agg, cols) != pytest.approx(np.mean(np.exp(np.array([1.0, 1.0, 1.25]))))
    idx = np.array([[0, 1, 2], [2, 2, 0]])
    assert ci.resampled(agg, cols, idx) == pytest.approx([math.exp(7.5 / 7), math.exp(6.0 / 5)])
    last_word = Aggregate("ppl_mean", "lp")  # exp of the mean NLL over items
    assert ci.resampled(last_word, cols, idx) == pytest.approx([math.exp(7.5 / 3), math.exp(6.0 / 3)])


@pytest.mark.parametrize("agg", [Aggregate("mean", "x"), Aggregate("nll_ratio", "x", "n"), Aggregate("ppl_ratio", "x", "n")])
def test_paired_interval_of_identical_points_is_exactly_zero(agg):
    cols = {"id": ["a", "b", "c", "d"], "x": [-0.3, -1.7, -0.2, -2.9], "n": [1, 3, 2, 5]}
    paired = ci.paired_intervals(agg, cols, dict(cols), 500, 0)
    assert paired == {"change": (0.0, 0.0), "rel_change": (0.0, 0.0)}


def test_paired_interval_is_narrower_than_the_unpaired_difference():
    rng = np.random.default_rng(0)
    before = rng.random(60)
    after = before + 0.05 + 0.01 * rng.standard_normal(60)  # each item moves by about the same amount
    agg = Aggregate("mean", "x")
    paired = ci.paired_intervals(agg, {"x": list(before)}, {"x": list(after)}, 1000, 0)["change"]
    b = ci.resampled(agg, {"x": list(before)}, ci.resample_indices(60, 1000, 1))
    a = ci.resampled(agg, {"x": list(after)}, ci.resample_indices(60, 1000, 2))
    unpaired = ci.percentile_interval(a - b)
    assert paired[1] - paired[0] < (unpaired[1] - unpaired[0]) / 3
    assert paired[0] < 0.05 < paired[1]


def test_paired_bootstrap_refuses_different_items():
    with pytest.raises(ValueError, match="same items"):
        ci.paired_intervals(Aggregate("mean", "x"), {"id": ["a", "b"], "x": [0, 1]}, {"id": ["b", "a"], "x": [1, 0]}, 10, 0)


def test_recall_resamples_facts_within_tasks():
    records = {"task": [0, 0, 0, 0, 1, 1], "template": ["q", "q", "s", "s", "q", "s"],
               "em": [1.0, 0.0, 1.0, 1.0, 1.0, 0.0]}
    means = ci.recall_task_means(records, [0, 1], ["q", "s"], "em")
    assert means == {0: 0.75, 1: 0.5}
    stats = ci.recall_resampled(records, [0, 1], ["q", "s"], "em", 300, 0)
    # task 1 has one fact: every resample is that fact; task 0's per-fact scores are 1 and .5
    assert np.all(stats[1] == 0.5)
    assert set(np.round(stats[0], 6)) <= {0.5, 0.75, 1.0}
    again = ci.recall_resampled(records, [0, 1], ["q", "s"], "em", 300, 0)
    assert all(np.array_equal(stats[j], again[j]) for j in (0, 1))


# ----------------------------------------------------------------------------- suites: same numbers


@pytest.fixture(scope="module")
def tiny_model():
    from smf_lightning.models.tiny import tiny_qwen2

    return tiny_qwen2(seed=0)


QA = [QAItem("a", "who wrote hamlet", ("William Shakespeare",)), QAItem("b", "capital of france", ("Paris",)),
      QAItem("c", "largest ocean", ("the Pacific Ocean", "Pacific"))]
CHOICES = [ChoiceItem("c1", "A man is sitting on a roof. He", ("starts pulling up roofing.", "eats a cube."), 0),
           ChoiceItem("c2", "The chef cracks an egg. She", ("whisks it in a bowl.", "drives a truck.", "sleeps."), 1)]
MATH = [MathItem("m1", "What is 2 + 3?", "2 + 3 = 5.", "5"), MathItem("m2", "What is 4 * 6?", "4 * 6 = 24.", "24")]
PASSAGES = [PassageItem("p1", "The quick brown fox jumps over the lazy dog", "dog"),
            PassageItem("p2", "She opened the door and saw the garden", "garden")]


def _suites():
    return [NQOpenSuite(QA, max_new_tokens=4), HellaSwagSuite(CHOICES), GSM8KSuite(MATH), LambadaSuite(PASSAGES, score_passage=True)]


def test_suite_numbers_identical_to_before(tiny_model, tiny_tok, monkeypatch):
    """The metrics computed from per-item columns equal, to the last bit, the formulas the suites
    used before they kept per-item scores (written out here)."""
    import smf_lightning.eval.suites as suites_mod

    predictions = [" William Shakespeare wrote", " Paris", " Pacific ocean, the largest"]  # fractional F1
    monkeypatch.setattr(suites_mod, "generate_greedy", lambda *a, **k: list(predictions))
    nq, hs, gsm, lam = _suites()
    prompts = [nq._prompt(it) for it in QA]
    scored = score_continuations(tiny_model, tiny_tok, prompts, [" " + it.answers[0] for it in QA], 2, nq.max_length)
    f1s = [token_f1(p, it.answers) for p, it in zip(predictions, QA)]
    assert 0 < f1s[2] < 1
    assert nq.evaluate(tiny_model, tiny_tok, 2) == {
        "f1": sum(f1s) / 3, "em": sum(exact_match(p, it.answers) for p, it in zip(predictions, QA)) / 3,
        "answer_nll": -sum(s.sum_logprob for s in scored) / sum(s.n_tokens for s in scored)}

    from smf_lightning.eval.metrics import normalized_choice
    endings = [[" " + e for e in it.endings] for it in CHOICES]
    sc = score_choices(tiny_model, tiny_tok, [it.ctx for it in CHOICES], endings, 2, hs.max_length)
    norm = [normalized_choice([s.sum_logprob for s in c], [len(e) for e in ends]) == it.label for it, ends, c in zip(CHOICES, endings, sc)]
    raw = [normalized_choice([s.sum_logprob for s in c], [1] * len(ends)) == it.label for it, ends, c in zip(CHOICES, endings, sc)]
    assert hs.evaluate(tiny_model, tiny_tok, 2) == {"acc_norm": sum(norm) / len(norm), "acc": sum(raw) / len(raw)}

    conts = [gsm.continuation(it) for it in MATH]
    sg = score_continuations(tiny_model, tiny_tok, [gsm.prompt.replace("{question}", it.question) for it in MATH], conts, 2, gsm.max_length)
    total = -sum(s.sum_logprob for s in sg)
    assert gsm.evaluate(tiny_model, tiny_tok, 2) == {
        "nll": total / sum(s.n_tokens for s in sg),
        "bits_per_byte": total / math.log(2) / sum(len(c.encode("utf-8")) for c in conts)}

    enc = encode_context_continuation(tiny_tok, [it.context for it in PASSAGES], [" " + it.last_word for it in PASSAGES], lam.max_length)
    sl = score_sequences(tiny_model, [ids for ids, _ in enc], [len(ids) - 1 for ids, _ in enc], 2, 1)
    word = [float(s.logprobs[-n:].sum()) for s, (_, n) in zip(sl, enc)]
    greedy = [bool(s.greedy[-n:].all()) for s, (_, n) in zip(sl, enc)]
    assert lam.evaluate(tiny_model, tiny_tok, 2) == {
        "last_word_ppl": math.exp(-(sum(word) / len(word))), "last_word_acc": sum(greedy) / len(greedy),
        "passage_ppl": math.exp(-sum(s.sum_logprob for s in sl) / sum(s.n_tokens for s in sl))}


def _read_columns(path: Path) -> dict[str, list]:
    rows = list(csv.reader(path.open()))
    return {name: [row[i] for row in rows[1:]] for i, name in enumerate(rows[0])}


def _recompute(suite_aggregates: dict[str, Aggregate], columns: dict[str, list]) -> dict[str, float]:
    numeric = {k: [float(v) for v in vs] for k, vs in columns.items() if k not in ("id", "prediction", "template")}
    return {m: aggregate(a, numeric) for m, a in suite_aggregates.items()}


def test_items_file_recomputes_each_suite_exactly(tiny_model, tiny_tok, tmp_path):
    from smf_lightning.callbacks.evaluation import _write_columns

    facts = [Fact("1", "Capital of France?", "Paris", ("Paris",)), Fact("2", "Longest river?", "Nile", ("Nile",))]
    for suite in [*_suites(), FactRecallSuite(facts, FactTemplate("qa", "Question: {question}\nAnswer: {answer}"), 4)]:
        result = suite.evaluate(tiny_model, tiny_tok, 2)
        _write_columns(tmp_path / f"{suite.name}.csv", suite.last_items)
        columns = _read_columns(tmp_path / f"{suite.name}.csv")
        assert columns["id"] == [str(it.id) for it in suite.items]
        assert _recompute(suite.aggregates, columns) == result, suite.name


# ----------------------------------------------------------------------------- torchmetrics as the oracle


ANSWER_CASES = [("William Shakespeare wrote it", ["William Shakespeare"]), ("the Pacific", ["Pacific Ocean", "Pacific"]),
                ("Paris, France", ["paris"]), ("Niger Niger Niger", ["Niger"]), ("", ["Rome"]), ("an apple a day", ["apple day"])]


@pytest.mark.parametrize("prediction,golds", ANSWER_CASES)
def test_f1_and_em_agree_with_torchmetrics_squad(prediction, golds):
    """Same normalisation and conventions as torchmetrics' SQuAD; it computes in float32 and in
    percent, which is why the suites keep metrics.token_f1 (exact float64)."""
    from torchmetrics.functional.text import squad

    out = squad([{"prediction_text": prediction, "id": "q"}], [{"answers": {"answer_start": [0] * len(golds), "text": golds}, "id": "q"}])
    assert float(out["exact_match"]) / 100 == exact_match(prediction, golds)
    assert float(out["f1"]) / 100 == pytest.approx(token_f1(prediction, golds), abs=1e-6)


def test_token_perplexity_agrees_with_torchmetrics(tiny_model):
    """exp(summed NLL / tokens) from the scorer's gathered log-probs is torchmetrics' Perplexity
    of the full logits (which the scorer never materialises: it keeps one log-prob per token)."""
    from torchmetrics.functional.text import perplexity

    seqs = [[5, 17, 33, 2, 9, 41], [7, 7, 12, 60, 3, 3]]
    scored = score_sequences(tiny_model, seqs, [5, 5], 2, 1)
    ours = aggregate(Aggregate("ppl_ratio", "lp", "n"), {"lp": [s.sum_logprob for s in scored], "n": [s.n_tokens for s in scored]})
    with torch.no_grad():
        logits = tiny_model(torch.tensor(seqs)).logits[:, :-1].float()
    assert ours == pytest.approx(float(perplexity(logits, torch.tensor(seqs)[:, 1:])), rel=1e-5)


# ----------------------------------------------------------------------------- a tiny CLI run


def _cli(args: list[str]) -> None:
    import os

    env = dict(os.environ, WANDB_SILENT="true", HYDRA_FULL_ERROR="0")
    res = subprocess.run([sys.executable, "-m", "smf_lightning.train", "experiment=tiny", "logger.wandb.mode=offline",
                          "callbacks.checkpoint.enabled=false", "callbacks.slot_stats.enabled=false", *args],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One run that computes its 'before' point, and two with the shared cache: the second
    surely loads it."""
    dirs = {name: tmp_path_factory.mktemp(name) for name in ("computed", "cached_1", "cached_2")}
    _cli(["callbacks.cache_before_eval=false", f"hydra.run.dir={dirs['computed']}"])
    _cli([f"hydra.run.dir={dirs['cached_1']}"])
    _cli([f"hydra.run.dir={dirs['cached_2']}"])
    return dirs


def test_summary_and_heldout_csv_carry_intervals(runs):
    s = json.loads((runs["computed"] / "summary.json").read_text())
    for name, h in s["heldout"].items():
        assert {"ci95", "before_ci95", "change", "change_ci95", "rel_change_ci95", "all_after_ci95"} <= set(h), name
        low, high = h["ci95"]
        assert low <= h["after"] <= high
        assert set(h["all_after_ci95"]) == set(h["all_after"])
        if h["rel_change"] is not None:
            assert h["rel_change_ci95"] is not None
    for figure in ("fact_recall", "fact_recall_heldout_template", "fact_recall_contains"):
        assert s[f"{figure}_ci95"] == s["recall"][figure]["ci95"]
        assert s["recall"][figure]["after"] == s[figure]
        assert {"before", "change", "change_ci95", "rel_change", "rel_change_ci95"} <= set(s["recall"][figure])
    assert "heldout_degradation_pct_ci95" in s
    rows = list(csv.DictReader((runs["computed"] / "heldout.csv").open()))
    assert {"ci95_low", "ci95_high", "change", "change_ci95_low", "change_ci95_high", "rel_change",
            "rel_change_ci95_low", "rel_change_ci95_high"} <= set(rows[0])
    for r in rows:
        assert float(r["ci95_low"]) <= float(r["value"]) <= float(r["ci95_high"])
        assert (r["change"] == "") == (r["eval_point"] == "0")  # changes only after training started


def test_summary_numbers_recompute_exactly_from_items(runs):
    run = runs["computed"]
    s = json.loads((run / "summary.json").read_text())
    aggregates = {"nq_open": NQOpenSuite.aggregates, "hellaswag": HellaSwagSuite.aggregates, "gsm8k": GSM8KSuite.aggregates,
                  "lambada": LambadaSuite([]).aggregates}
    for point, key in (("before", "all_before"), ("after_task_1", "all_after")):
        for name, aggs in aggregates.items():
            assert _recompute(aggs, _read_columns(run / "items" / point / f"{name}.csv")) == s["heldout"][name][key], (point, name)
    records = _read_columns(run / "items" / "after_task_1" / "fact_recall.csv")
    records["task"] = [int(t) for t in records["task"]]
    for column in ("em", "contains"):
        records[column] = [float(v) for v in records[column]]
    train, held = s["data"]["train_templates"], s["data"]["heldout_templates"]
    for figure, templates, column, row in (("fact_recall", train, "em", "accuracy_matrix"),
                                           ("fact_recall_heldout_template", held, "em", "accuracy_matrix_heldout_template"),
                                           ("fact_recall_contains", train, "contains", None)):
        means = ci.recall_task_means(records, [0, 1], templates, column)
        assert sum(means[j] for j in (0, 1)) / 2 == s[figure], figure
        if row:
            assert [means[0], means[1]] == s[row][-1]


def test_cached_before_point_carries_its_items(runs):
    cached = json.loads((runs["cached_2"] / "summary.json").read_text())
    computed = json.loads((runs["computed"] / "summary.json").read_text())
    assert cached["before_eval_from_cache"] and not computed["before_eval_from_cache"]
    for f in sorted((runs["computed"] / "items" / "before").iterdir()):
        assert (runs["cached_2"] / "items" / "before" / f.name).read_text() == f.read_text(), f.name
    for name, h in computed["heldout"].items():
        assert cached["heldout"][name]["before_ci95"] == h["before_ci95"], name


def test_sweep_summary_carries_intervals_and_lm_eval_tasks(tmp_path):
    from smf_lightning.callbacks.sweep import summarize_sweep

    for job, (recall, rc) in enumerate([(0.5, -0.1), (0.8, -0.3)]):
        (tmp_path / str(job)).mkdir()
        summary = {"method": "smf", "selector": "kl", "top_t": 16, "lr": 1.0, "fact_recall": recall, "fact_recall_ci95": [recall - 0.1, recall + 0.1],
                   "heldout_degradation_pct_ci95": [5.0, 20.0],
                   "heldout": {"nq_open": {"rel_change": rc, "rel_change_ci95": [rc - 0.05, rc + 0.02], "higher_is_better": True}},
                   **({"lm_eval": {"arc_easy": {"acc,none": {"before": 0.5, "after": recall, "rel_change": recall / 0.5 - 1}}}}
                      if job else {})}
        (tmp_path / str(job) / "summary.json").write_text(json.dumps(summary))
    rows = list(csv.DictReader((summarize_sweep(tmp_path) and tmp_path / "sweep_summary.csv").open()))
    assert [float(r["fact_recall_ci95_low"]) for r in rows] == [0.4, 0.8 - 0.1]
    assert [float(r["nq_open_rel_change_ci95_high"]) for r in rows] == [-0.1 + 0.02, -0.3 + 0.02]
    assert [float(r["heldout_degradation_pct_ci95_high"]) for r in rows] == [20.0, 20.0]
    assert rows[0]["fact_recall_heldout_template_ci95_low"] == ""  # absent in the summary: empty, not an error
    # lm-eval tasks of the runs that had them (callbacks.lm_eval), empty for the others
    assert [r["lm_eval/arc_easy/acc,none"] for r in rows] == ["", "0.8"]
    assert [r["lm_eval/arc_easy/acc,none_rel_change"] for r in rows] == ["", str(0.8 / 0.5 - 1)]
    assert (tmp_path / "learning_vs_forgetting.png").stat().st_size > 1000
