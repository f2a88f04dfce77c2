"""Selectors and slot statistics against hand-computed small examples (docs/design.md §4, §7)."""

import math

import pytest
import torch

from smf_lightning.selection import (
    SELECTORS,
    BackgroundStats,
    SlotHistory,
    background_summary,
    hub_share,
    kl_batch_background,
    loss_position_mask,
    score_slots,
    select_slots,
    slot_counts,
    slot_step_stats,
)

# A 6-slot layer. The batch reads slots 1, 2, 3, 5; slot 1 was never read by the background.
COUNTS = torch.tensor([0, 3, 1, 1, 0, 5])
BG = BackgroundStats(
    bg_count=torch.tensor([10, 0, 4, 1, 2, 20]),
    df=torch.tensor([5, 0, 2, 1, 1, 5]),
    n_bg=5,
)


def _expected_kl():
    p = [c / 10 for c in COUNTS.tolist()]
    bg1 = [b + 1 for b in BG.bg_count.tolist()]  # add-one smoothing: sum = 43
    return [pi * math.log(pi / (b / sum(bg1))) if pi > 0 else 0.0 for pi, b in zip(p, bg1)]


def _expected_tfidf():
    p = [c / 10 for c in COUNTS.tolist()]
    return [pi * math.log((5 + 1) / (d + 1)) for pi, d in zip(p, BG.df.tolist())]


def test_slot_counts_is_bincount_with_multiplicity():
    assert torch.equal(slot_counts(torch.tensor([3, 1, 3, 3, 0]), 5), torch.tensor([1, 1, 0, 3, 0]))
    assert torch.equal(slot_counts(torch.zeros(0, dtype=torch.long), 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="n_slots=4"):
        slot_counts(torch.tensor([0, 4]), 4)


def test_loss_position_mask_shifts_labels_by_one():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, -100, -100]])
    # position i carries loss iff labels[i+1] is scored (HF shifts inside the loss)
    expected = torch.tensor([[False, True, True, False], [True, False, False, False]])
    assert torch.equal(loss_position_mask(labels), expected)


def test_kl_and_tfidf_scores_match_hand_computation():
    assert torch.allclose(score_slots(COUNTS, "kl", BG), torch.tensor(_expected_kl(), dtype=torch.float64), rtol=1e-12)
    assert torch.allclose(score_slots(COUNTS, "tfidf", BG), torch.tensor(_expected_tfidf(), dtype=torch.float64), rtol=1e-12)
    assert torch.equal(score_slots(COUNTS, "tf"), COUNTS.double() / 10)
    # The KL terms of accessed slots can be negative (slot 2: p=0.1 < p_bg=5/43).
    assert score_slots(COUNTS, "kl", BG)[2] < 0


def test_kl_and_tfidf_order_slots_differently():
    # kl:    1 (0.767) > 3 (0.077) > 5 (0.012) > 2 (-0.015)
    # tfidf: 1 (0.538) > 3 (0.110) > 2 (0.069) > 5 (0.000: every background batch read it)
    assert select_slots(COUNTS, "kl", 3, BG).tolist() == [1, 3, 5]
    assert select_slots(COUNTS, "tfidf", 3, BG).tolist() == [1, 2, 3]
    assert select_slots(COUNTS, "kl", 1, BG).tolist() == [1]  # never seen in background: top
    assert select_slots(COUNTS, "tfidf", 1, BG).tolist() == [1]
    assert select_slots(COUNTS, "tf", 2).tolist() == [1, 5]


def test_slot_never_seen_in_background_beats_a_frequent_common_slot():
    counts = torch.tensor([50, 1, 0, 0])
    bg = BackgroundStats(bg_count=torch.tensor([1000, 0, 5, 5]), df=torch.tensor([10, 0, 3, 3]), n_bg=10)
    assert select_slots(counts, "kl", 1, bg).tolist() == [1]
    # tfidf: slot 0 idf log(11/11)=0 ; slot 1 (1/51)·log(11) > 0
    assert select_slots(counts, "tfidf", 1, bg).tolist() == [1]
    assert select_slots(counts, "tf", 1).tolist() == [0]


def test_ties_go_to_the_lower_slot_id():
    counts = torch.tensor([0, 2, 2, 2, 1, 2])
    assert select_slots(counts, "tf", 2).tolist() == [1, 2]
    assert select_slots(counts, "tf", 3).tolist() == [1, 2, 3]
    bg = BackgroundStats(bg_count=torch.tensor([0, 7, 7, 3, 0, 7]), df=torch.tensor([0, 2, 2, 1, 0, 2]), n_bg=2)
    # kl: 4 (1/9·log(10/3)) > 3 (2/9·log(5/3)) > 1 = 2 = 5 (2/9·log(5/6), exact ties)
    # tfidf: 4 (1/9·log 3) > 3 (2/9·log 1.5) > 1 = 2 = 5 (idf log 1 = 0, exact ties)
    for selector in ("kl", "tfidf"):
        assert select_slots(counts, selector, 2, bg).tolist() == [3, 4]
        assert select_slots(counts, selector, 3, bg).tolist() == [1, 3, 4]
        assert select_slots(counts, selector, 4, bg).tolist() == [1, 2, 3, 4]
    assert select_slots(counts.flip(0), "tf", 2).tolist() == [0, 2]


@pytest.mark.parametrize("selector", SELECTORS)
def test_budget_larger_than_accessed_selects_every_accessed_slot(selector):
    gen = torch.Generator().manual_seed(0)
    assert select_slots(COUNTS, selector, 100, BG, generator=gen).tolist() == [1, 2, 3, 5]
    assert select_slots(COUNTS, selector, 4, BG, generator=gen).tolist() == [1, 2, 3, 5]


def test_all_ignores_the_budget_and_empty_batches_select_nothing():
    assert select_slots(COUNTS, "all", None).tolist() == [1, 2, 3, 5]
    assert select_slots(COUNTS, "all", 1).tolist() == [1, 2, 3, 5]
    for selector in SELECTORS:
        assert select_slots(torch.zeros(6, dtype=torch.long), selector, 2, BG).numel() == 0


def test_random_is_seeded_uniform_among_accessed_with_the_same_budget():
    counts = torch.zeros(100, dtype=torch.long)
    accessed = torch.tensor([3, 10, 11, 40, 41, 77, 90, 99])
    counts[accessed] = torch.arange(1, 9)
    a = select_slots(counts, "random", 3, generator=torch.Generator().manual_seed(1))
    b = select_slots(counts, "random", 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.numel() == 3
    assert torch.equal(a, a.sort().values) and set(a.tolist()) <= set(accessed.tolist())
    gen = torch.Generator().manual_seed(2)
    hits = torch.zeros(100)
    for _ in range(2000):
        hits[select_slots(counts, "random", 2, generator=gen)] += 1
    freq = hits[accessed] / 2000  # each accessed slot: 2/8 = 0.25, whatever its count
    assert torch.all((freq - 0.25).abs() < 0.04), freq
    assert hits.sum() == 4000 and hits[accessed].sum() == 4000


@pytest.mark.parametrize("bad", [0, -3, None, 2.5, True])
def test_invalid_budget_raises_with_allowed_values(bad):
    with pytest.raises(ValueError, match="integer >= 1"):
        select_slots(COUNTS, "tf", bad)


def test_unknown_selector_and_missing_background_raise():
    with pytest.raises(ValueError, match="allowed: kl, tfidf, tf, random, all"):
        select_slots(COUNTS, "bm25", 2)
    with pytest.raises(ValueError, match="needs background statistics"):
        select_slots(COUNTS, "kl", 2)
    small = BackgroundStats(bg_count=torch.zeros(3, dtype=torch.long), df=torch.zeros(3, dtype=torch.long), n_bg=1)
    with pytest.raises(ValueError, match="same memory layer"):
        select_slots(COUNTS, "tfidf", 2, small)
    with pytest.raises(ValueError, match="does not rank"):
        score_slots(COUNTS, "random")


def test_hub_share_and_kl_statistics():
    counts = torch.zeros(200, dtype=torch.long)
    counts[:10] = 1
    counts[7] = 91  # top 1% of 200 slots = 2 slots: 91 + 1 of 100 accesses
    assert hub_share(counts) == pytest.approx(0.92, abs=0)
    assert hub_share(torch.zeros(5, dtype=torch.long)) == 0.0
    assert kl_batch_background(COUNTS, BG) == pytest.approx(sum(_expected_kl()), rel=1e-12)
    # identical distributions up to the add-one smoothing -> KL 0
    same = BackgroundStats(bg_count=COUNTS - 1 + (COUNTS == 0).long(), df=COUNTS.clamp(max=1), n_bg=1)
    same.bg_count[COUNTS == 0] = -1
    assert kl_batch_background(COUNTS, same) == pytest.approx(0.0, abs=1e-15)


def test_slot_history_overlap_with_earlier_tasks():
    h = SlotHistory()
    h.record(0, torch.tensor([1, 2, 3]), n_slots=10)
    # nothing ended yet: no earlier tasks
    assert h.overlap(0, torch.tensor([1, 2])) == {"jaccard_earlier": 0.0, "overlap_earlier": 0.0}
    h.end_task()
    h.record(0, torch.tensor([7]), n_slots=10)
    h.record(0, torch.tensor([3, 8]), n_slots=10)
    h.end_task()
    assert h.earlier(0).tolist() == [1, 2, 3, 7, 8]
    # S = {2, 8, 9}: S∩E = {2, 8}, S∪E = {1, 2, 3, 7, 8, 9}
    assert h.overlap(0, torch.tensor([2, 8, 9])) == {"jaccard_earlier": 2 / 6, "overlap_earlier": 2 / 3}
    assert h.overlap(5, torch.tensor([2])) == {"jaccard_earlier": 0.0, "overlap_earlier": 0.0}
    assert h.tasks_ended == 2
    h.record(0, torch.tensor([4]), n_slots=10)  # current, unfinished task
    restored = SlotHistory()
    restored.load_state_dict(h.state_dict())
    assert restored.earlier(0).tolist() == [1, 2, 3, 7, 8] and restored.tasks_ended == 2
    restored.end_task()
    assert restored.earlier(0).tolist() == [1, 2, 3, 4, 7, 8]


def test_slot_step_stats_is_a_dict_of_floats():
    h = SlotHistory()
    h.record(12, torch.tensor([1, 4]), n_slots=6)
    h.end_task()
    selected = select_slots(COUNTS, "kl", 2, BG)
    stats = slot_step_stats(COUNTS, selected, bg=BG, history=h, layer=12)
    assert stats == {
        "accessed_slots": 4.0,
        "selected_slots": 2.0,
        "accesses": 10.0,
        "hub_share_batch": 0.5,  # ceil(1% of 6) = 1 slot: 5 of 10 accesses
        "kl_batch_bg": pytest.approx(sum(_expected_kl()), rel=1e-12),
        "hub_share_bg": 20 / 37,
        "jaccard_earlier": 1 / 3,  # S={1,3}, E={1,4}
        "overlap_earlier": 0.5,
    }
    assert all(type(v) is float for v in stats.values())
    with pytest.raises(ValueError, match="layer="):
        slot_step_stats(COUNTS, selected, history=h)
    summary = background_summary(BG)
    assert summary == {"n_bg": 5.0, "accesses": 37.0, "touched_share": 5 / 6, "hub_share_bg": 20 / 37}
