"""Background statistics on a tiny retrofitted Qwen2 (docs/design.md §3): counts, padding, cache."""


import pytest
import torch

from smf_lightning.memory import MemoryConfig, memory_layers, retrofit
from smf_lightning.models.tiny import tiny_qwen2
from smf_lightning.selection import (
    BackgroundStats,
    compute_background_stats,
    fingerprint_model,
    load_or_compute_background_stats,
    loss_position_mask,
    slot_counts,
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: What is the capital of France? Answer: Paris.",
    "A memory layer stores facts in slots.",
    "Natalia sold clips to 48 of her friends in April.",
    "Sparse memory finetuning updates only a few value rows.",
    "Q: Who wrote Hamlet? A: William Shakespeare.",
]


def _model(seed=0, layers=(1, 2)):
    cfg = MemoryConfig(layers=list(layers), n_slots=64, heads=2, knn=4, k_dim=16, seed=seed)
    return retrofit(tiny_qwen2(), cfg)


def _batches(tok, batch_size=2, labels=False):
    out = []
    for i in range(0, len(TEXTS), batch_size):
        enc = tok(TEXTS[i : i + batch_size], return_tensors="pt", padding=True)
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if labels:  # loss on the second half of each sequence only
            lab = enc["input_ids"].clone()
            lab[:, : lab.shape[1] // 2] = -100
            lab[enc["attention_mask"] == 0] = -100
            batch["labels"] = lab
        out.append(batch)
    return out


def _reference_stats(model, batches, loss_tokens_only=False):
    """Straightforward recomputation: full forward, read every layer's last_access."""
    mems = memory_layers(model)
    ref = {i: BackgroundStats.empty(m.n_slots) for i, m in mems.items()}
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            extra = loss_position_mask(b["labels"]) if loss_tokens_only else None
            for i, m in mems.items():
                ref[i].add_batch(slot_counts(m.last_access.slot_ids(extra), m.n_slots))
    return ref


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for i in a:
        assert torch.equal(a[i].bg_count, b[i].bg_count) and torch.equal(a[i].df, b[i].df) and a[i].n_bg == b[i].n_bg


def test_counts_exclude_padding_and_df_counts_batches(tiny_tok):
    model = _model()
    batches = _batches(tiny_tok)
    assert any((b["attention_mask"] == 0).any() for b in batches)  # padding present
    stats = compute_background_stats(model, batches, progress=False)
    assert sorted(stats) == [1, 2]
    n_real = sum(int(b["attention_mask"].sum()) for b in batches)
    for s in stats.values():
        assert s.n_bg == 3 and s.bg_count.dtype == torch.long and s.df.dtype == torch.long
        assert int(s.bg_count.sum()) == n_real * 2 * 4  # tokens x heads x knn, padding excluded
        assert int(s.df.max()) <= 3 and torch.equal(s.df > 0, s.bg_count > 0)
    _assert_same(stats, _reference_stats(model, batches))


def test_skipping_layers_above_the_last_memory_changes_nothing(tiny_tok):
    model = _model(layers=(1,))
    batches = _batches(tiny_tok)
    head_calls = []
    model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    fast = compute_background_stats(model, batches, progress=False)
    assert head_calls == []  # layers above the memory and the LM head never ran
    full = compute_background_stats(model, batches, progress=False, stop_after_last_memory=False)
    _assert_same(fast, full)
    assert model.training is False  # mode restored (tiny_qwen2 is in eval mode)
    model.train()
    compute_background_stats(model, batches, progress=False)
    assert model.training is True
    assert not memory_layers(model)[1]._forward_hooks  # the early-stop hook is removed


def test_loss_tokens_only_counts_loss_positions(tiny_tok):
    model = _model()
    batches = _batches(tiny_tok, labels=True)
    stats = compute_background_stats(model, batches, loss_tokens_only=True, progress=False)
    n_loss = sum(int(loss_position_mask(b["labels"]).sum()) for b in batches)
    assert int(stats[1].bg_count.sum()) == n_loss * 2 * 4
    _assert_same(stats, _reference_stats(model, batches, loss_tokens_only=True))
    with pytest.raises(ValueError, match="needs 'labels'"):
        compute_background_stats(model, _batches(tiny_tok), loss_tokens_only=True, progress=False)


def test_base_model_without_memory_raises():
    with pytest.raises(ValueError, match="retrofit it first"):
        compute_background_stats(tiny_qwen2(), [], progress=False)


def test_fingerprint_sees_one_value_row_and_the_memory_seed():
    model = _model()
    fp = fingerprint_model(model)
    assert fp == fingerprint_model(model) == fingerprint_model(_model())
    assert fingerprint_model(_model(seed=1)) != fp
    assert fingerprint_model(_model(layers=(2,))) != fp
    with torch.no_grad():
        memory_layers(model)[1].values.weight[17, 3] += 1e-3  # one trained value entry
    assert fingerprint_model(model) != fp


def test_cache_loads_unchanged_key_and_recomputes_changed_ones(tiny_tok, tmp_path):
    model = _model()
    calls = []

    def batches_fn(bs=2):
        calls.append(bs)
        return _batches(tiny_tok, bs)

    key = {"corpus": "texts-v1", "batch_size": 2}
    first = load_or_compute_background_stats(model, batches_fn, tmp_path, key, progress=False)
    assert calls == [2]
    files = sorted(p.suffix for p in tmp_path.iterdir())
    assert files == [".json", ".safetensors"]  # no pickle
    again = load_or_compute_background_stats(model, batches_fn, tmp_path, key, progress=False)
    assert calls == [2]  # loaded, corpus not even built
    _assert_same(first, again)

    # a different batch size changes df: the caller's key says so, and it recomputes
    other = load_or_compute_background_stats(model, lambda: batches_fn(3), tmp_path, {**key, "batch_size": 3}, progress=False)
    assert calls == [2, 3]
    assert other[1].n_bg == 2 and not torch.equal(other[1].df, first[1].df)
    # changed weights (a memory seed) or counting mode: recompute without the caller saying so
    load_or_compute_background_stats(_model(seed=1), batches_fn, tmp_path, key, progress=False)
    assert calls == [2, 3, 2]
    load_or_compute_background_stats(model, lambda: batches_fn(2) and _batches(tiny_tok, labels=True), tmp_path, key, loss_tokens_only=True, progress=False)
    assert calls == [2, 3, 2, 2]
    assert len(list(tmp_path.glob("*.safetensors"))) == 4
    with pytest.raises(ValueError, match="JSON-serialisable"):
        load_or_compute_background_stats(model, batches_fn, tmp_path, {"bad": object()}, progress=False)
