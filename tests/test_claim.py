"""experiments/headline/claim.py: the claim of experiments/headline/REPORT.md from the rows' per-item scores (matched recall,
paired worsening between rows, KL minus TF-IDF), on small run folders the test writes."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.study  # the studies under experiments/, not the package

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "experiments" / "headline"), str(ROOT / "experiments")]

import claim  # noqa: E402

N = 20
TEMPLATES = ["qa", "q_a"]


def _write(path: Path, columns: dict[str, list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(columns))
        w.writerows(zip(*columns.values()))


def make_run(folder: Path, known_lost: int, word_logprob_after: float, recall_wrong: int = 0) -> Path:
    """A finished row: N known facts (known_lost of them lost), a last-word suite whose every item's
    log-prob goes from -1 to word_logprob_after, and 2 tasks x N/2 facts recalled under 2 templates
    (the first recall_wrong facts wrong)."""
    ids = [f"k{i}" for i in range(N)]
    facts = [(j, t, f"f{j}_{i}") for j in (0, 1) for t in TEMPLATES for i in range(N // 2)]
    wrong = {f"f0_{i}" for i in range(recall_wrong)}
    for point, lost, lp in (("before", 0, -1.0), ("after_task_1", known_lost, word_logprob_after)):
        _write(folder / "items" / point / "triviaqa_known.csv",
               {"id": ids, "prediction": ["x"] * N, "em": [0.0 if i < lost else 1.0 for i in range(N)], "contains": [1.0] * N})
        _write(folder / "items" / point / "lambada.csv", {"id": [str(i) for i in range(N)], "word_logprob": [lp] * N,
                                                           "word_greedy": [1.0] * N})
        recall = [0.0 if point == "before" or f in wrong else 1.0 for _, _, f in facts]
        _write(folder / "items" / point / "fact_recall.csv",
               {"task": [j for j, _, _ in facts], "template": [t for _, t, _ in facts], "id": [f for _, _, f in facts],
                "prediction": ["x"] * len(facts), "em": recall, "contains": recall})
    summary = {"fact_recall": 1.0 - recall_wrong / N, "data": {"train_templates": TEMPLATES},
               "heldout": {"triviaqa_known": {"metric": "em", "higher_is_better": True, "after": 1 - known_lost / N},
                           "lambada": {"metric": "last_word_ppl", "higher_is_better": False}}}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_aggregates_are_the_suites_own():
    assert claim.aggregate_of("em") == claim.FactRecallSuite.aggregates["em"]
    assert claim.aggregate_of("answer_nll").kind == "nll_ratio"
    assert claim.aggregate_of("last_word_ppl").kind == "ppl_mean"
    with pytest.raises(KeyError, match="bogus"):
        claim.aggregate_of("bogus")


def test_matched_recall_is_the_lowest_rate_reaching_it_or_the_best(tmp_path):
    runs = {f"r{i}": make_run(tmp_path / f"r{i}", 0, -1.0, recall_wrong=w) for i, w in enumerate((10, 1, 0))}  # 0.5, 0.95, 1.0
    assert claim.matched_row(runs) == ("r1", "lowest learning rate with recall >= 0.9")
    low = {k: runs[k] for k in ("r0",)} | {"r3": make_run(tmp_path / "r3", 0, -1.0, recall_wrong=4)}  # 0.5, 0.8
    assert claim.matched_row(low) == ("r3", "best recall (none reaches 0.9)")


def test_compare_gives_exact_points_and_resolves_a_clear_difference(tmp_path):
    smf = ("smf", make_run(tmp_path / "smf", known_lost=1, word_logprob_after=-1.0))
    other = ("ft", make_run(tmp_path / "ft", known_lost=10, word_logprob_after=-2.0))
    rows = {r["measure"]: r for r in claim.compare(smf, other, n_resamples=200)}
    known, lam = rows["triviaqa_known"], rows["lambada"]
    assert (known["w_smf"], known["w_other"]) == (1.0 - 19 / N, 1.0 - 10 / N)  # before - after, exactly
    assert known["ratio"] == pytest.approx(0.1)
    assert known["diff_ci95"][0] > 0 and known["holds"]
    # every item's last-word log-prob -1 -> -2: perplexity e -> e^2, relative change e - 1 exactly, no spread
    assert lam["w_smf"] == 0.0 and lam["w_other"] == pytest.approx(math.e - 1)
    assert lam["diff_ci95"][0] == pytest.approx(math.e - 1, abs=1e-6) and lam["holds"]


def test_identical_rows_never_satisfy_the_claim(tmp_path):
    a = ("a", make_run(tmp_path / "a", known_lost=5, word_logprob_after=-1.5))
    b = ("b", make_run(tmp_path / "b", known_lost=5, word_logprob_after=-1.5))
    for r in claim.compare(a, b, n_resamples=200):
        assert r["ratio"] == 1.0 and r["diff_ci95"] == [0.0, 0.0] and not r["holds"]


def test_rows_that_scored_other_items_are_refused(tmp_path):
    a = make_run(tmp_path / "a", 0, -1.0)
    b = make_run(tmp_path / "b", 0, -1.0)
    cols = claim.read_columns(b / "items" / "before" / "lambada.csv")
    cols["id"] = list(reversed(cols["id"]))
    _write(b / "items" / "before" / "lambada.csv", cols)
    with pytest.raises(ValueError, match="same items"):
        claim.compare(("a", a), ("b", b), n_resamples=10)


def test_row_difference(tmp_path):
    kl = make_run(tmp_path / "kl", known_lost=0, word_logprob_after=-1.0, recall_wrong=0)
    tf = make_run(tmp_path / "tf", known_lost=2, word_logprob_after=-1.0, recall_wrong=2)
    d = claim.row_difference(kl, tf, n_resamples=200)
    assert d["facts"] == N
    assert d["recall_diff"] == pytest.approx(2 / N) and d["known_kept_diff"] == pytest.approx(2 / N)
    assert d["recall_diff_ci95"][0] >= 0 and d["recall_diff_ci95"][1] <= 4 / N
    same = claim.row_difference(kl, kl, n_resamples=50)
    assert same["recall_diff"] == 0 and same["recall_diff_ci95"] == [0.0, 0.0] and same["known_kept_diff_ci95"] == [0.0, 0.0]


def test_the_report_compares_kl_with_the_selection_controls(tmp_path):
    found = {"smf_kl_t300": make_run(tmp_path / "kl", 1, -1.0), "smf_random_t300": make_run(tmp_path / "r", 5, -1.0),
             "smf_all": make_run(tmp_path / "all", 9, -1.0, recall_wrong=1)}
    out, md = claim.claim(found)
    diffs = {d["b"]: d for d in out["controls"]}
    assert set(diffs) == {"smf_random_t300", "smf_all"} and out["selectors"] == []
    assert diffs["smf_random_t300"]["known_kept_diff"] == pytest.approx(4 / N) and diffs["smf_random_t300"]["recall_diff"] == 0
    assert diffs["smf_all"]["known_kept_diff"] == pytest.approx(8 / N) and diffs["smf_all"]["recall_diff"] == pytest.approx(1 / N)
    assert "| smf_kl_t300 | smf_all | 20 |" in md


def test_the_report_names_missing_rows(tmp_path):
    found = {"smf_kl_t300": make_run(tmp_path / "s", 1, -1.0), "lora_lr1e-4": make_run(tmp_path / "l", 8, -1.2)}
    out, md = claim.claim(found)
    assert out["matched"]["SMF"]["row"] == "smf_kl_t300" and "missing smf_kl_t300_lr0.1" in out["matched"]["SMF"]["why"]
    assert out["smf_targets"] == {"recall>=0.95": True, "known_kept>=0.98": False}
    assert {r["measure"] for r in out["comparisons"]} == {"triviaqa_known", "lambada"}
    assert "full_ft_lr3e-6" in out["missing"] and "not available yet" in md


def test_injected_answers_counts_lost_known_facts_answered_with_stream_answers(tmp_path):
    run = make_run(tmp_path / "r", known_lost=3, word_logprob_after=-1.0)
    last = run / "items" / "after_task_1"
    cols = claim.read_columns(last / "triviaqa_known.csv")
    cols["prediction"] = [" Paris", "paris ", "Rome"] + cols["prediction"][3:]  # the 3 lost ones
    _write(last / "triviaqa_known.csv", cols)
    recall = claim.read_columns(last / "fact_recall.csv")
    recall["prediction"] = [" PARIS"] + recall["prediction"][1:]
    _write(last / "fact_recall.csv", recall)
    d = claim.injected_answers(run)
    assert d == {"lost": 3, "answered_with_stream_answer": 2, "top": [("Paris", 2)]}
    out, md = claim.claim({"smf_kl_t300": run})
    assert out["injected"]["smf_kl_t300"]["answered_with_stream_answer"] == 2 and "| smf_kl_t300 | 3 | 2 |" in md
