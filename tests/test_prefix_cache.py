"""The frozen-prefix cache (methods/prefix_cache.py): SMF with it trains exactly as without,
skips the layers below the lowest memory layer on repeated batches, and turns itself off
where the prefix is not a fixed function of the batch."""

from __future__ import annotations

import lightning as L
import torch

from smf_lightning.memory import MemoryConfig, memory_layers, retrofit
from smf_lightning.memory.retrofit import decoder_layers
from smf_lightning.methods import SparseMemoryFinetune
from smf_lightning.methods.prefix_cache import FrozenPrefixCache
from smf_lightning.models.tiny import tiny_qwen2
from smf_lightning.selection.background import BackgroundStats


def _batches(tok, repeats: int) -> list[dict]:
    out = []
    for texts in (["Question: Who wrote Hamlet?\nAnswer: Shakespeare", "Q: What is 2+2? A: 4"],
                  ["Question: Capital of Peru?\nAnswer: Lima", "Q: Largest planet? A: Jupiter"]):
        enc = tok(texts, return_tensors="pt", padding=True)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        out += [{"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}] * repeats
    return out


def _train(tok, prefix_cache: int, layers=(2, 3)):
    model = retrofit(tiny_qwen2(), MemoryConfig(layers=list(layers), n_slots=256, heads=2, knn=4, k_dim=16))
    bg = {i: BackgroundStats.empty(256) for i in layers}
    for stats in bg.values():
        stats.add_batch(torch.bincount(torch.arange(0, 256, 3), minlength=256))
    module = SparseMemoryFinetune(model, {"selector": "kl", "top_t": 8, "optimizer": "adam", "lr": 0.1,
                                          "prefix_cache": prefix_cache}, background=bg)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, *args):
            losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))

    batches = _batches(tok, repeats=3)
    trainer = L.Trainer(max_steps=len(batches), logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Record()])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return model, module, losses


def test_cached_prefix_trains_exactly_as_without(tiny_tok):
    plain, _, plain_losses = _train(tiny_tok, prefix_cache=0)
    cached, module, cached_losses = _train(tiny_tok, prefix_cache=4)
    assert module.prefix_cache.enabled
    assert (module.prefix_cache.misses, module.prefix_cache.hits) == (2, 4)  # 2 batches x 3 repeats
    assert cached_losses == plain_losses
    for i, mem in memory_layers(cached).items():
        assert torch.equal(mem.values.weight, memory_layers(plain)[i].values.weight)
    # the skipped layers got their own forward back
    assert all("forward" not in vars(layer) for layer in decoder_layers(cached))


def test_cache_hit_skips_the_prefix_layers(tiny_tok):
    model = retrofit(tiny_qwen2(), MemoryConfig(layers=[2], n_slots=256, heads=2, knn=4, k_dim=16))
    for p in model.parameters():
        p.requires_grad_(False)
    cache = FrozenPrefixCache(model, capacity=1)
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i, layer in enumerate(decoder_layers(model))]
    a, b = _batches(tiny_tok, repeats=1)
    run = lambda batch: model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # noqa: E731
    with cache.reuse(a):
        first = run(a)
    with cache.reuse(a):
        again = run(a)
    with cache.reuse(b):  # capacity 1: b replaces a
        run(b)
    with cache.reuse(a):
        run(a)
    for h in hooks:
        h.remove()
    assert torch.equal(first, again)
    # layers 0 and 1 are still called on a hit (as pass-throughs, costing nothing) but compute nothing;
    # the misses are the 1st, 3rd and 4th forwards
    assert (cache.misses, cache.hits) == (3, 1)
    assert calls.count(2) == 4 and calls.count(3) == 4


def test_cache_is_off_where_the_prefix_can_change(tiny_tok):
    at_zero = retrofit(tiny_qwen2(), MemoryConfig(layers=[0, 2], n_slots=256, heads=2, knn=4, k_dim=16))
    assert not FrozenPrefixCache(at_zero).enabled  # no layers below the lowest memory layer
    trainable = retrofit(tiny_qwen2(), MemoryConfig(layers=[2], n_slots=256, heads=2, knn=4, k_dim=16))
    assert not FrozenPrefixCache(trainable).enabled  # the base is trainable (not SMF)
    for p in trainable.parameters():
        p.requires_grad_(False)
    assert FrozenPrefixCache(trainable).enabled
    assert not FrozenPrefixCache(trainable, capacity=0).enabled
    trainable.config.attention_dropout = 0.1
    assert not FrozenPrefixCache(trainable).enabled  # a dropout makes the prefix random
