"""The real offline Qwen2.5-class model: load, retrofit, base-equivalence, and one backward
pass that reaches only the memory values (marked `real`: ~1 minute, run in CI)."""

import pytest
import torch

from smf_lightning.memory import MemoryConfig, freeze_all_but_values, memory_layers, param_counts, retrofit

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def qwen():
    from smf_lightning.models.loading import load_base_model

    return load_base_model("qwen2.5-0.5b-offline", source="offline")


def test_retrofit_real_qwen_is_base_equivalent_and_trains_only_values(qwen):
    model, tok = qwen.model, qwen.tokenizer
    assert qwen.info["source"] == "offline"
    assert model.config.num_hidden_layers == 24 and model.config.hidden_size == 896
    batch = tok(["The capital of France is", "Question: Who wrote Hamlet?\nAnswer:"], return_tensors="pt", padding=True)
    with torch.no_grad():
        base = model(**batch).logits
    n_base = sum(p.numel() for p in model.parameters())
    retrofit(model, MemoryConfig(layers=[6, 12, 18], n_slots=16384, heads=4, knn=16, k_dim=256))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base)
    counts = param_counts(model)
    assert counts["base"] == n_base
    assert counts["values"] == 3 * 16384 * 896

    freeze_all_but_values(model)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    model(**batch, labels=labels).loss.backward()
    for name, p in model.named_parameters():
        if name.endswith("values.weight"):
            assert p.grad is not None and p.grad.is_sparse, name
            # only slots the non-padding tokens read receive a non-zero gradient (padding rows
            # appear in the sparse gradient, with zeros: their outputs carry no loss)
            g = p.grad.coalesce()
            rows = g.indices()[0][g.values().abs().sum(1) > 0]
            assert rows.numel() > 0
            layer = int(name.split(".")[2])
            read = set(memory_layers(model)[layer].last_access.slot_ids().tolist())
            assert set(rows.tolist()) <= read
        else:
            assert p.grad is None, name
