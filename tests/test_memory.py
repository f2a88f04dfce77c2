"""Memory layer and retrofit invariants on the tiny Qwen2 (seconds)."""


import pytest
import torch

from smf_lightning.memory import (
    MemoryConfig,
    ProductKeyMemory,
    freeze_all_but_values,
    load_retrofitted,
    memory_layers,
    param_counts,
    retrofit,
    save_retrofitted,
)
from smf_lightning.models.tiny import tiny_qwen2

SMALL = dict(n_slots=64, heads=2, knn=4, k_dim=16)


def batch(tok, texts=("Question: Who wrote Hamlet? Answer: Shakespeare", "The quick fox")):
    return tok(list(texts), return_tensors="pt", padding=True)


def logits(model, b):
    with torch.no_grad():
        return model(**b).logits


def test_shapes_and_access_record(tiny_tok):
    model = retrofit(tiny_qwen2(), MemoryConfig(layers=[0, 2], **SMALL))
    b = batch(tiny_tok)
    out = logits(model, b)
    assert out.shape == (2, b.input_ids.shape[1], 512)
    mems = memory_layers(model)
    assert sorted(mems) == [0, 2]
    for mem in mems.values():
        acc = mem.last_access
        assert acc.indices.shape == (2, b.input_ids.shape[1], 2, 4)
        assert acc.indices.dtype == torch.int64
        assert int(acc.indices.min()) >= 0 and int(acc.indices.max()) < 64
        torch.testing.assert_close(acc.weights.sum(-1), torch.ones(acc.weights.shape[:-1]))


def test_additive_is_base_model_at_init(tiny_tok):
    base = tiny_qwen2(seed=3)
    b = batch(tiny_tok)
    ref = logits(base, b)
    model = retrofit(base, MemoryConfig(layers=[1, 3], **SMALL))
    assert torch.equal(logits(model, b), ref)


def test_replace_mode_changes_output_and_drops_mlp(tiny_tok):
    b = batch(tiny_tok)
    ref = logits(tiny_qwen2(seed=3), b)
    model = retrofit(tiny_qwen2(seed=3), MemoryConfig(layers=[1], mode="replace", **SMALL))
    assert model.model.layers[1].mlp.mlp is None
    assert not torch.allclose(logits(model, b), ref)


def test_save_load_round_trip_bit_exact(tmp_path, tiny_tok):
    model = retrofit(tiny_qwen2(tie=True), MemoryConfig(layers=[2], **SMALL))
    with torch.no_grad():  # non-zero values so the memory path matters
        memory_layers(model)[2].values.weight.normal_()
    b = batch(tiny_tok)
    ref = logits(model, b)
    save_retrofitted(model, tmp_path / "ckpt", tokenizer=tiny_tok, base_info={"name": "tiny"})
    loaded = load_retrofitted(tmp_path / "ckpt")
    assert torch.equal(logits(loaded, b), ref)
    assert loaded.retrofit_meta["base"] == {"name": "tiny"}
    assert not list((tmp_path / "ckpt").glob("*.bin")) and not list((tmp_path / "ckpt").glob("*.pt"))


def brute_force_topk(mem: ProductKeyMemory, x: torch.Tensor):
    """Score all N slots explicitly: s(i*sqrt(N)+j) = q1·K1[i] + q2·K2[j]."""
    half = mem.k_dim // 2
    q = mem.query(x).view(-1, mem.heads, 2, half)
    q = torch.nn.functional.layer_norm(q, (half,))
    s1 = torch.einsum("bhd,hnd->bhn", q[:, :, 0], mem.keys[:, 0])
    s2 = torch.einsum("bhd,hnd->bhn", q[:, :, 1], mem.keys[:, 1])
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # [BT, H, N]
    scores, idx = full.topk(mem.knn, dim=-1)
    return idx, scores


@pytest.mark.parametrize("n_slots,knn", [(16, 2), (64, 4), (256, 16), (1024, 8)])
def test_product_key_topk_equals_brute_force(n_slots, knn):
    cfg = MemoryConfig(layers=[0], n_slots=n_slots, heads=3, knn=knn, k_dim=8, seed=1)
    mem = ProductKeyMemory(32, cfg)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        idx, w = mem.lookup(x)
        ref_idx, ref_scores = brute_force_topk(mem, x)
    got = idx.view(-1, 3, knn)
    assert torch.equal(got.sort(-1).values, ref_idx.sort(-1).values)
    torch.testing.assert_close(w.view(-1, 3, knn), torch.softmax(ref_scores, -1))


def test_padding_excluded_from_slot_ids(tiny_tok):
    model = retrofit(tiny_qwen2(), MemoryConfig(layers=[1], **SMALL))
    b = batch(tiny_tok)
    logits(model, b)
    acc = memory_layers(model)[1].last_access
    n_real = int(b.attention_mask.sum())
    assert acc.slot_ids().numel() == n_real * 2 * 4
    # the ids of the real tokens are exactly those of the unpadded sequence alone
    short = tiny_tok(["The quick fox"], return_tensors="pt")
    logits(model, short)
    alone = memory_layers(model)[1].last_access.slot_ids()
    n0 = int(b.attention_mask[0].sum())
    assert torch.equal(acc.slot_ids()[n0 * 8 :], alone)
    # an extra mask (e.g. loss-carrying tokens) narrows further
    extra = torch.zeros_like(b.attention_mask)
    extra[0, :3] = 1
    assert acc.slot_ids(extra).numel() == 3 * 8


def test_backward_reaches_only_values(tiny_tok):
    model = retrofit(tiny_qwen2(), MemoryConfig(layers=[1, 2], **SMALL))
    freeze_all_but_values(model)
    b = batch(tiny_tok)
    out = model(**b, labels=b.input_ids)
    out.loss.backward()
    for name, p in model.named_parameters():
        if name.endswith("values.weight"):
            assert p.grad is not None and p.grad.is_sparse
        else:
            assert p.grad is None, name


def test_param_counts(tiny_tok):
    base = tiny_qwen2()
    n_base = sum(p.numel() for p in base.parameters())
    model = retrofit(base, MemoryConfig(layers=[1], **SMALL))
    c = param_counts(model)
    assert c["base"] == n_base
    assert c["values"] == 64 * 64
    mem = memory_layers(model)[1]
    assert c["memory"] == sum(p.numel() for p in mem.parameters())
    assert c["total"] == c["base"] + c["memory"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(layers=[9]), "out of range"),
        (dict(layers=[-1]), "out of range"),
        (dict(n_slots=60), "perfect square"),
        (dict(n_slots=64, knn=9), "sqrt"),
        (dict(mode="sideways"), "allowed"),
        (dict(layers=[]), "empty"),
    ],
)
def test_bad_configs_fail_clearly(kwargs, match):
    cfg = dict(SMALL, layers=[1])
    cfg.update(kwargs)
    with pytest.raises(ValueError, match=match):
        retrofit(tiny_qwen2(), MemoryConfig(**cfg))


def test_model_without_mlp_fails_clearly():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="mlp"):
        retrofit(net, MemoryConfig(layers=[0], **SMALL))
