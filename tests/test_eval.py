"""Metrics against hand-computed cases; batched scoring equals unbatched, unpadded scoring."""

import math

import pytest
import torch

from smf_lightning.data.facts import FactTemplate
from smf_lightning.data.sources import ChoiceItem, MathItem, PassageItem, QAItem
from smf_lightning.eval.metrics import (
    contains_answer,
    continual_learning_metrics,
    exact_match,
    extract_answer,
    item_points,
    items_folder,
    last_task_point,
    normalize_answer,
    normalized_choice,
    normalized_choice_accuracy,
    recall_scores,
    relative_change,
    token_f1,
)
from smf_lightning.eval.scoring import generate_greedy, score_choices, score_continuations
from smf_lightning.eval.suites import (
    FactRecallSuite,
    GSM8KSuite,
    HellaSwagSuite,
    LambadaSuite,
    NQOpenSuite,
    build_suite,
)


# ----------------------------------------------------------------------------- answer matching


def test_normalize_answer_squad_rules():
    assert normalize_answer("The  Quick, Brown fox!") == "quick brown fox"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("  Théâtre\tthe Globe. ") == "théâtre globe"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_exact_match_and_degenerate_repeats():
    assert exact_match("the Eiffel Tower.", ["Eiffel Tower"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower", "La Tour Eiffel"]) == 0.0
    assert exact_match("la tour eiffel", ["Eiffel Tower", "La Tour Eiffel"]) == 1.0
    # docs/design.md §9: a repeated answer is not an exact match, though containment counts it.
    assert exact_match("Niger Niger Niger", ["Niger"]) == 0.0
    assert contains_answer("Niger Niger Niger", ["Niger"]) == 1.0


def test_contains_answer_whole_words_only():
    assert contains_answer("It is in Nigeria", ["Niger"]) == 0.0
    assert contains_answer("It is the river Niger, I think", ["Niger"]) == 1.0
    assert contains_answer("anything", [""]) == 0.0


def test_token_f1_hand_computed():
    # pred tokens {quick, brown, fox}, gold {quick, fox, jumps}: 2 common -> P = R = 2/3.
    assert token_f1("the quick brown fox", ["quick fox jumps"]) == pytest.approx(2 / 3)
    # best over golds: second gold "brown fox" -> P = 2/3, R = 1 -> F1 = 0.8
    assert token_f1("the quick brown fox", ["quick fox jumps", "brown fox"]) == pytest.approx(0.8)
    # repeated tokens count with multiplicity: pred [a1 a1], gold [a1] -> P = 1/2, R = 1 -> 2/3
    assert token_f1("paris paris", ["Paris"]) == pytest.approx(2 / 3)
    assert token_f1("", ["Paris"]) == 0.0
    assert token_f1("the", ["a"]) == 1.0  # both normalise to empty
    assert token_f1("London", ["Paris"]) == 0.0


def test_length_normalised_choice():
    # raw: -10 > -12 -> choice 0; per length: -10/5 = -2 < -12/8 = -1.5 -> choice 1
    assert normalized_choice([-10.0, -12.0], [5, 8]) == 1
    assert normalized_choice([-10.0, -12.0], [1, 1]) == 0
    assert normalized_choice([-4.0, -4.0], [2, 2]) == 0  # ties -> lowest index
    with pytest.raises(ValueError, match="one length per choice"):
        normalized_choice([-1.0], [1, 2])


def test_length_normalised_choice_accuracy_counts():
    # picks: item 0 -> 1 (-2 vs -1.5), item 1 -> 0 (-1 vs -3), item 2 -> 0 (-2 vs -3)
    acc = normalized_choice_accuracy([[-10.0, -12.0], [-3.0, -9.0], [-6.0, -6.0]], [[5, 8], [3, 3], [3, 2]], [1, 0, 1])
    assert acc == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- continual metrics


def test_acc_bwt_forgetting_hand_computed():
    nan = math.nan
    R = [
        [0.8, nan, nan],
        [0.95, 0.9, nan],  # task 0 improved after task 1
        [0.5, 0.7, 1.0],
    ]
    m = continual_learning_metrics(R)
    assert m["acc"] == pytest.approx((0.5 + 0.7 + 1.0) / 3)
    assert m["bwt"] == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)  # -0.25
    assert m["forgetting"] == pytest.approx(((0.95 - 0.5) + (0.9 - 0.7)) / 2)  # 0.325, not -BWT


def test_continual_metrics_single_task_and_bad_shape():
    m = continual_learning_metrics([[0.4]])
    assert m["acc"] == 0.4 and math.isnan(m["bwt"]) and math.isnan(m["forgetting"])
    with pytest.raises(ValueError, match="square"):
        continual_learning_metrics([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    assert relative_change(2.0, 1.5) == pytest.approx(-0.25)
    assert math.isnan(relative_change(0.0, 1.0))


def test_item_points_in_task_order(tmp_path):
    """The per-item folders a run writes, read back in evaluation order: after_task_10 comes
    after after_task_9 (not between 1 and 2), a stray folder is ignored."""
    assert item_points(tmp_path) == [] and last_task_point(tmp_path) is None
    assert items_folder(tmp_path, "after task 10") == tmp_path / "items" / "after_task_10"
    for label in ("after task 10", "before", "after task 9", "after task 1"):
        items_folder(tmp_path, label).mkdir(parents=True)
    (tmp_path / "items" / "after_task_x").mkdir()
    assert item_points(tmp_path) == ["before", "after_task_1", "after_task_9", "after_task_10"]
    assert last_task_point(tmp_path) == "after_task_10"


# ----------------------------------------------------------------------------- recall extraction


def test_extract_answer_and_recall_scores():
    assert extract_answer(" Paris. The capital of France\nQuestion:", ".") == "Paris"
    assert extract_answer(" Paris\nQ: next", "") == "Paris"
    assert recall_scores(" Paris. It is", ".", ["Paris"]) == (1.0, 1.0)
    assert recall_scores(" St. Louis", ".", ["St. Louis"]) == (1.0, 1.0)  # whole first line matches
    assert recall_scores(" Niger Niger Niger", "", ["Niger"]) == (0.0, 1.0)
    assert recall_scores(" Lagos", "", ["Niger"]) == (0.0, 0.0)


# ----------------------------------------------------------------------------- batched scoring

CONTEXTS = ["Question: What is the capital of France? Answer:", "Q: Who", "The quick brown fox jumps over the lazy dog and"]
CONTINUATIONS = [" Paris", " wrote Hamlet? A: William", " sleeps"]


def _reference_logprobs(model, tok, context, continuation):
    ctx = tok(context)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(ids).logits.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
    return logp[-len(cont):]


@pytest.fixture(scope="module")
def tiny_model():
    from smf_lightning.models.tiny import tiny_qwen2

    return tiny_qwen2(seed=0)


def test_batched_scoring_equals_unpadded_reference(tiny_model, tiny_tok):
    batched = score_continuations(tiny_model, tiny_tok, CONTEXTS, CONTINUATIONS, batch_size=3)
    single = [score_continuations(tiny_model, tiny_tok, [c], [d], batch_size=1)[0] for c, d in zip(CONTEXTS, CONTINUATIONS)]
    for b, s, c, d in zip(batched, single, CONTEXTS, CONTINUATIONS):
        ref = _reference_logprobs(tiny_model, tiny_tok, c, d)
        assert b.n_tokens == ref.numel()
        torch.testing.assert_close(b.logprobs, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(s.logprobs, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_shared_context_choice_scoring_equals_full_sequences(tiny_model, tiny_tok, batch_size):
    choices = [[" Paris", " London town"], [" wrote Hamlet? A: William", " x", " is it"], [" sleeps"]]
    shared = score_choices(tiny_model, tiny_tok, CONTEXTS, choices, batch_size=batch_size)
    for ctx, group, scored in zip(CONTEXTS, choices, shared):
        assert len(scored) == len(group)
        for cont, sc in zip(group, scored):
            torch.testing.assert_close(sc.logprobs, _reference_logprobs(tiny_model, tiny_tok, ctx, cont), atol=1e-5, rtol=0)


def test_logit_budget_splits_batches_without_changing_results(tiny_model, tiny_tok, monkeypatch):
    import smf_lightning.eval.scoring as scoring

    choices = [[" Paris", " London town"], [" wrote Hamlet? A: William", " x", " is it"], [" sleeps"]]
    wide = score_continuations(tiny_model, tiny_tok, CONTEXTS, CONTINUATIONS, batch_size=3)
    wide_choices = score_choices(tiny_model, tiny_tok, CONTEXTS, choices, batch_size=6)
    monkeypatch.setattr(scoring, "MAX_LOGIT_ELEMENTS", 2 * 4 * 512)  # ~ two rows of 4 tokens
    calls = []
    original = scoring._split_by_logit_budget
    monkeypatch.setattr(scoring, "_split_by_logit_budget", lambda *a: calls.append(original(*a)) or calls[-1])
    narrow = score_continuations(tiny_model, tiny_tok, CONTEXTS, CONTINUATIONS, batch_size=3)
    assert max(len(chunk) for chunk in calls[0]) < 3
    for a, b in zip(wide, narrow):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    for ga, gb in zip(wide_choices, score_choices(tiny_model, tiny_tok, CONTEXTS, choices, batch_size=6)):
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


def _naive_greedy(model, tok, prompt, n):
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tok.decode(ids[0, start:], skip_special_tokens=True).split("\n", 1)[0]


def test_batched_greedy_equals_naive_loop(tiny_model, tiny_tok):
    batched = generate_greedy(tiny_model, tiny_tok, CONTEXTS, max_new_tokens=6, batch_size=3)
    assert batched == [_naive_greedy(tiny_model, tiny_tok, p, 6) for p in CONTEXTS]
    assert batched == [generate_greedy(tiny_model, tiny_tok, [p], 6, 1)[0] for p in CONTEXTS]


def test_scoring_on_retrofitted_model_is_batch_invariant(tiny_tok):
    from smf_lightning.memory.layer import MemoryConfig
    from smf_lightning.memory.retrofit import memory_layers, retrofit
    from smf_lightning.models.tiny import tiny_qwen2

    model = retrofit(tiny_qwen2(seed=1), MemoryConfig(layers=[1], n_slots=64, heads=2, knn=4, k_dim=16))
    with torch.no_grad():
        for mem in memory_layers(model).values():
            mem.values.weight.normal_(0, 1.0)  # non-zero values, so the memory changes outputs
    batched = score_continuations(model, tiny_tok, CONTEXTS, CONTINUATIONS, batch_size=3)
    for b, c, d in zip(batched, CONTEXTS, CONTINUATIONS):
        torch.testing.assert_close(b.logprobs, _reference_logprobs(model, tiny_tok, c, d), atol=1e-4, rtol=0)
    assert generate_greedy(model, tiny_tok, CONTEXTS, 5, 3) == [_naive_greedy(model, tiny_tok, p, 5) for p in CONTEXTS]


def test_scoring_restores_training_mode(tiny_model, tiny_tok):
    tiny_model.train()
    score_continuations(tiny_model, tiny_tok, CONTEXTS[:1], CONTINUATIONS[:1], batch_size=1)
    assert tiny_model.training
    tiny_model.eval()


# ----------------------------------------------------------------------------- suites


def test_suites_share_one_interface(tiny_model, tiny_tok):
    suites = [
        NQOpenSuite([QAItem("a", "who wrote hamlet", ("William Shakespeare",)), QAItem("b", "capital of france", ("Paris",))]),
        HellaSwagSuite([ChoiceItem("c", "A man is sitting on a roof. He", ("starts pulling up roofing.", "eats a cube."), 0)]),
        GSM8KSuite([MathItem("d", "What is 2 + 3?", "2 + 3 = 5.", "5")]),
        LambadaSuite([PassageItem("e", "The quick brown fox jumps over the lazy dog", "dog")], score_passage=True),
        FactRecallSuite([], FactTemplate("qa", "Question: {question}\nAnswer: {answer}")),
    ]
    expected = {
        "nq_open": {"f1", "em", "answer_nll"},
        "hellaswag": {"acc_norm", "acc"},
        "gsm8k": {"nll", "bits_per_byte"},
        "lambada": {"last_word_ppl", "last_word_acc", "passage_ppl"},
    }
    for suite in suites[:4]:
        result = suite.evaluate(tiny_model, tiny_tok, batch_size=2)
        assert set(result) == expected[suite.name]
        assert suite.primary_metric in result
        assert all(math.isfinite(v) for v in result.values())
    assert [s.higher_is_better for s in suites] == [True, True, False, False, True]


def test_greedy_flags_mark_argmax_tokens(tiny_model, tiny_tok):
    # LAMBADA accuracy = every last-word token is the argmax: check the flag on a token that
    # is the argmax and on one that is not.
    from smf_lightning.eval.scoring import score_sequences

    ctx = tiny_tok("The quick brown fox jumps over the lazy")["input_ids"]
    with torch.no_grad():
        best = int(tiny_model(torch.tensor([ctx])).logits[0, -1].argmax())
    other = (best + 1) % tiny_model.config.vocab_size
    hit, miss = score_sequences(tiny_model, [ctx + [best], ctx + [other]], [1, 1], batch_size=2, pad_id=1)
    assert hit.is_greedy and not miss.is_greedy
    assert hit.sum_logprob > miss.sum_logprob


def test_fact_recall_counts_exact_answers(tiny_model, tiny_tok, monkeypatch):
    from smf_lightning.data.facts import Fact
    import smf_lightning.eval.suites as suites_mod

    facts = [Fact("1", "Capital of France?", "Paris", ("Paris",)), Fact("2", "Capital of Niger?", "Niamey", ("Niamey",)),
             Fact("3", "Longest river?", "Nile", ("Nile", "River Nile"))]
    monkeypatch.setattr(suites_mod, "generate_greedy", lambda *a, **k: [" Paris.", " Niamey Niamey", " the River Nile. Yes"])
    suite = FactRecallSuite(facts, FactTemplate("s", "{question} The answer is {answer}."))
    result = suite.evaluate(tiny_model, tiny_tok, 4)
    assert result == {"em": pytest.approx(2 / 3), "contains": 1.0}
    assert [em for _, _, em in suite.per_fact()] == [1.0, 0.0, 1.0]


def test_unknown_suite_name_lists_allowed():
    with pytest.raises(ValueError, match="Allowed suites: nq_open, hellaswag, gsm8k, lambada"):
        build_suite("mmlu", 10, 0)


@pytest.mark.real
def test_real_suites_on_offline_data(tiny_model, tiny_tok):
    """Every suite builds from the real offline data (fetched by the assets module) and runs."""
    for name in ("nq_open", "hellaswag", "gsm8k", "lambada"):
        suite = build_suite(name, 3, seed=0, source="offline")
        again = build_suite(name, 3, seed=0, source="offline")
        assert suite.items == again.items  # seeded subset
        assert build_suite(name, 6, seed=0, source="offline").items[:3] == suite.items  # prefix-stable
        result = suite.evaluate(tiny_model, tiny_tok, batch_size=4)
        assert suite.primary_metric in result and all(math.isfinite(v) for v in result.values())
