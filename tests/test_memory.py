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


# ---- precision (docs/design.md §2): the addressing and the value table stay float32 ----------------

def test_addressing_under_bf16_autocast_is_the_fp32_addressing():
    """Sub-key scores, top-knn and softmax run with autocast off: under bf16 autocast a token reads
    exactly the slots and weights it reads in fp32 (CPU autocast would otherwise run the query and
    score matmuls in bf16, where neighbouring scores tie or swap)."""
    mem = ProductKeyMemory(64, MemoryConfig(n_slots=256, heads=2, knn=4, k_dim=16))
    x = torch.randn(3, 7, 64)
    idx, w = mem.lookup(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx_b, w_b = mem.lookup(x)
        out = mem(x)
    assert torch.equal(idx, idx_b) and torch.equal(w, w_b) and w_b.dtype == torch.float32
    assert out.dtype == torch.bfloat16  # the output projection follows the run's precision


def test_bf16_model_keeps_a_float32_value_table(tiny_tok):
    model = retrofit(tiny_qwen2().to(torch.bfloat16), MemoryConfig(layers=[1], n_slots=256, heads=2, knn=4, k_dim=16))
    mem = memory_layers(model)[1]
    assert mem.values.weight.dtype == torch.float32 and mem.query.weight.dtype == torch.bfloat16
    enc = tiny_tok(["Question: Who wrote Hamlet?"], return_tensors="pt")
    logits = model(**enc).logits
    assert torch.isfinite(logits).all()
    assert mem.last_access.weights.dtype == torch.float32


def _smf_fit(precision: str, steps: int = 3):
    import lightning as L

    from smf_lightning.methods import SparseMemoryFinetune

    model = retrofit(tiny_qwen2(), MemoryConfig(layers=[1], n_slots=256, heads=2, knn=4, k_dim=16))
    module = SparseMemoryFinetune(model, {"selector": "tf", "top_t": 8, "optimizer": "adam", "lr": 0.1, "prefix_cache": 0})
    ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    trainer = L.Trainer(accelerator="cpu", precision=precision, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch] * steps, batch_size=None))
    return module


def test_smf_trains_under_bf16_mixed_with_fp32_values_and_state():
    module = _smf_fit("bf16-mixed")
    mem = module.memories[1]
    opt = module.trainer.optimizers[0]
    assert mem.values.weight.dtype == torch.float32 and opt.state[mem.values.weight]["exp_avg"].dtype == torch.float32
    moved = torch.nonzero(mem.values.weight.detach().any(1)).squeeze(1)
    assert 0 < moved.numel() <= 3 * 8  # at most top_t new rows per step


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_smf_rejects_precisions_that_cast_the_value_table(precision):
    with pytest.raises(ValueError, match="trainer.precision=bf16-mixed"):
        _smf_fit(precision, steps=1)
