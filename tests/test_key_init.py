"""Data-driven key initialisation (memory/key_init.py) on the tiny Qwen2 (seconds)."""

import pytest
import torch
import torch.nn.functional as F

from smf_lightning.data.facts import synthetic_facts
from smf_lightning.memory import MemoryConfig, memory_layers, retrofit
from smf_lightning.memory.key_init import (
    collect_query_halves,
    init_keys_kmeans,
    spherical_kmeans,
)
from smf_lightning.models.tiny import tiny_qwen2
from smf_lightning.selection.stats import slot_usage_stats  # selection measures; memory/key_init.py fits

MEM = dict(n_slots=256, heads=2, knn=4, k_dim=16)  # 16 sub-keys per half and head


def _texts(start, n):
    return [f"Question: {f.question}\nAnswer: {f.answer}" for f in synthetic_facts(start + n, 0)[start:]]


def _batches(tok, texts, bs=16):
    out = []
    for i in range(0, len(texts), bs):
        enc = tok(texts[i:i + bs], return_tensors="pt", padding=True)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


@pytest.fixture(scope="module")
def fit_and_heldout(tiny_tok):
    return _batches(tiny_tok, _texts(0, 128)), _batches(tiny_tok, _texts(128, 128))


def _model(mode="additive", layers=(1, 2), seed=0):
    return retrofit(tiny_qwen2(seed=seed), MemoryConfig(layers=list(layers), mode=mode, **MEM))


def test_spherical_kmeans_recovers_separated_directions():
    g = torch.Generator().manual_seed(0)
    truth = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    points = truth.repeat_interleave(40, 0) * 3.0 + 0.05 * torch.randn(320, 16, generator=g)  # norms do not matter
    centroids = spherical_kmeans(points, 8, seed=0, iters=20)
    assert centroids.shape == (8, 16)
    torch.testing.assert_close(centroids.norm(dim=-1), torch.ones(8))
    cos = centroids @ truth.T
    # one centroid per true direction, each within a few degrees of it
    assert sorted(cos.argmax(1).tolist()) == list(range(8))
    assert float(cos.max(1).values.min()) > 0.99


def test_spherical_kmeans_needs_k_points():
    with pytest.raises(ValueError, match="at least k=5 points"):
        spherical_kmeans(torch.randn(4, 3), 5, seed=0)


def test_collected_queries_exclude_padding(tiny_tok):
    model = _model()
    batches = _batches(tiny_tok, ["a b", "The quick brown fox jumps over the lazy dog."], bs=2)
    assert int(batches[0]["attention_mask"].sum()) < batches[0]["attention_mask"].numel()  # there is padding
    q = collect_query_halves(model, 1, batches, max_tokens=10_000)
    assert q.shape == (int(batches[0]["attention_mask"].sum()), 2, 2, 8)


def test_kmeans_is_deterministic_and_changes_only_keys(fit_and_heldout):
    fit, _ = fit_and_heldout
    a, b, c = _model(mode="replace"), _model(mode="replace"), _model(mode="replace")
    before = {n: p.detach().clone() for n, p in a.named_parameters()}
    report = init_keys_kmeans(a, fit, seed=0)
    init_keys_kmeans(b, fit, seed=0)
    init_keys_kmeans(c, fit, seed=1)
    for name, p in a.named_parameters():
        if name.endswith(".keys"):
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), f"{name} changed"
    for (na, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(pa, pb), f"{na} differs between two runs with the same seed"
        if na.endswith(".keys"):
            assert not torch.equal(pa, pc), "a different seed should give different keys"
    for i, mem in memory_layers(a).items():
        old_mean_norm = before[f"model.layers.{i}.mlp.memory.keys"].norm(dim=-1).mean(-1)  # [heads, 2]
        torch.testing.assert_close(mem.keys.norm(dim=-1), old_mean_norm.unsqueeze(-1).expand(2, 2, 16))
        assert report[i]["mean_best_cos_after"] > report[i]["mean_best_cos_before"]
        assert report[i]["tokens"] == sum(int(x["attention_mask"].sum()) for x in fit)


def test_kmeans_spreads_slot_usage_on_unseen_text(fit_and_heldout):
    fit, heldout = fit_and_heldout
    model = _model()
    before = slot_usage_stats(model, heldout)
    init_keys_kmeans(model, fit, seed=0)
    after = slot_usage_stats(model, heldout)
    for i in before:
        # random keys: ~7-9% of reads on the top 1% of slots, ~half the slots effectively used
        assert after[i]["hub_share_top1pct"] < 0.75 * before[i]["hub_share_top1pct"], (before[i], after[i])
        assert after[i]["effective_slots_share"] > before[i]["effective_slots_share"] + 0.1, (before[i], after[i])
        assert after[i]["touched_share"] >= before[i]["touched_share"]
        assert after[i]["accesses"] == before[i]["accesses"]
        for stats in (before[i], after[i]):  # exp(entropy) never exceeds the number of slots read
            assert stats["effective_slots_share"] <= stats["touched_share"] + 1e-12


def test_kmeans_needs_enough_tokens(tiny_tok):
    model = _model()
    with pytest.raises(ValueError, match="at least sqrt\\(N\\)=16 real tokens"):
        init_keys_kmeans(model, _batches(tiny_tok, ["a b c"]), seed=0)

