"""Healing stage (stages/heal.py) on the tiny Qwen2 with invented QA text (seconds)."""

import dataclasses
import json
import math

import pytest
import torch

from smf_lightning.stages.heal import (
    build_healing_corpus,
    heal_memory,
    make_batches,
    memory_parameters,
    perplexity,
    training_batches,
)
from smf_lightning.memory import MemoryConfig, load_retrofitted, memory_layers, retrofit, save_retrofitted
from smf_lightning.models.tiny import tiny_qwen2

MEM = dict(layers=[1, 2], n_slots=64, heads=2, knn=4, k_dim=16, mode="replace")
HEAL = dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0, grad_clip=1.0, eval_every=5, progress=False)


@pytest.fixture(scope="module")
def corpus(tiny_tok):
    return build_healing_corpus(tiny_tok, {"synthetic": 64}, n_heldout=16, max_len=32, seed=0, reserved=8)


def _heal(model, corpus, tok, steps, **overrides):
    pad = tok.pad_token_id
    kw = dict(HEAL, max_steps=steps, target_ppl=None) | overrides
    return heal_memory(model, training_batches(corpus.train, 8, pad, seed=0), make_batches(corpus.heldout, 16, pad), **kw)


def test_corpus_splits_are_disjoint_and_skip_reserved_items(tiny_tok, corpus):
    from smf_lightning.data.facts import synthetic_facts

    train = {e.input_ids for e in corpus.train}
    heldout = {e.input_ids for e in corpus.heldout}
    assert len(corpus.train) == 64 and len(corpus.heldout) == 16
    assert not train & heldout
    # the stream takes the generator's first facts: none of the reserved 8 may be used
    reserved = {tuple(tiny_tok(f"Question: {f.question}\nAnswer: {f.answer}")["input_ids"][:32]) for f in synthetic_facts(8, 0)}
    assert not reserved & (train | heldout)
    assert corpus.info["sources"]["synthetic"]["train_docs"] == 64
    assert all(len(e.input_ids) <= 32 and e.loss_mask[0] is False and all(e.loss_mask[1:]) for e in corpus.train)


def test_corpus_errors_say_what_to_change(tiny_tok):
    with pytest.raises(ValueError, match="unknown healing source 'wikipedia'"):
        build_healing_corpus(tiny_tok, {"wikipedia": 5}, n_heldout=2, max_len=8, seed=0, reserved=0)
    with pytest.raises(ValueError, match="heal.corpus is empty"):
        build_healing_corpus(tiny_tok, {"lambada": 0}, n_heldout=2, max_len=8, seed=0, reserved=0)


def test_healing_touches_only_memory_parameters(corpus, tiny_tok):
    model = retrofit(tiny_qwen2(seed=1), MemoryConfig(**MEM))
    memory_ids = {id(p) for p in memory_parameters(model)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    _heal(model, corpus, tiny_tok, steps=3)
    trained = set()
    for name, p in model.named_parameters():
        if id(p) in memory_ids:
            if not torch.equal(p, before[name]):
                trained.add(name.rsplit(".", 2)[-2] if name.endswith(".weight") else name.rsplit(".", 1)[-1])
        else:
            assert torch.equal(p, before[name]), f"healing changed non-memory parameter {name}"
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name
    assert trained == {"query", "keys", "values", "gate", "out"}  # every kind of memory parameter healed
    for mem in memory_layers(model).values():
        assert mem.values.sparse is True  # sparse value grads restored for SMF afterwards


def test_healing_reduces_heldout_perplexity_and_stops_at_target(corpus, tiny_tok):
    model = retrofit(tiny_qwen2(seed=1), MemoryConfig(**MEM))
    result = _heal(model, corpus, tiny_tok, steps=20)
    assert result.steps == 20 and not result.reached_target
    assert result.final_ppl < 0.8 * result.before_ppl, (result.before_ppl, result.final_ppl)
    evaluated = [r["step"] for r in result.history if r["heldout_ppl"] is not None]
    assert evaluated == [0, 5, 10, 15, 20]

    # a target the first evaluation after step 0 reaches: healing stops there
    model = retrofit(tiny_qwen2(seed=1), MemoryConfig(**MEM))
    first = result.history[5]["heldout_ppl"]
    stopped = _heal(model, corpus, tiny_tok, steps=20, target_ppl=first * 1.0001)
    assert stopped.reached_target and stopped.steps == 5
    assert stopped.final_ppl == pytest.approx(first, rel=1e-5)


def test_healed_checkpoint_round_trips(corpus, tiny_tok, tmp_path):
    model = retrofit(tiny_qwen2(seed=1), MemoryConfig(**MEM))
    _heal(model, corpus, tiny_tok, steps=3)
    save_retrofitted(model, tmp_path / "healed", tiny_tok, base_info={"name": "tiny"})
    loaded = load_retrofitted(tmp_path / "healed")
    batch = make_batches(corpus.heldout[:4], 4, tiny_tok.pad_token_id)[0]
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(out, ref)
    assert loaded.model.layers[1].mlp.mlp is None  # still replace mode


def _compose(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    from smf_lightning.train import conf_dir

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose("train", overrides=["experiment=heal_tiny", f"paths.output_dir={tmp_path}", *overrides])


def test_run_healing_end_to_end_and_continual_stage_loads_it(tmp_path, tiny_tok):
    from smf_lightning.models.build import load_model
    from smf_lightning.train import run

    cfg = _compose(tmp_path, "heal.max_steps=10", "heal.eval_every=5")
    summary = run(cfg)  # train.run dispatches stage=heal to stages/heal.py
    assert json.loads((tmp_path / "heal_summary.json").read_text())["after_ppl"] == summary["after_ppl"]
    assert (tmp_path / "heal_ppl.png").stat().st_size > 0
    assert (tmp_path / "heal_metrics.csv").read_text().splitlines()[0] == "step,train_loss,heldout_ppl"
    assert summary["steps"] == 10 and summary["after_ppl"] < summary["before_ppl"]
    assert summary["trainable_params"] == summary["param_counts"]["memory"]
    assert set(summary["slot_usage"]["after"]) == {1, 2}

    # the continual stage's loader (model.init_checkpoint) gets the very same healed model
    cont = _compose(tmp_path, f"model.init_checkpoint={summary['checkpoint']}")
    model, tok, info = load_model(cont)
    assert info["healing"]["after_ppl"] == summary["after_ppl"]
    assert model.memory_config.mode == "replace"
    corpus = build_healing_corpus(tok, {"synthetic": 96}, n_heldout=32, max_len=32, seed=0, reserved=8)
    assert perplexity(model, make_batches(corpus.heldout, 16, tok.pad_token_id)) == pytest.approx(summary["after_ppl"], rel=1e-6)


def test_heal_config_errors(tmp_path):
    from smf_lightning.config import ConfigError
    from smf_lightning.stages.heal import run as run_healing

    with pytest.raises(ConfigError, match="heal.target_ppl_ratio=0.9"):
        run_healing(_compose(tmp_path, "heal.target_ppl_ratio=0.9"))
    with pytest.raises(ConfigError, match="model.init_checkpoint"):
        run_healing(_compose(tmp_path, "model.init_checkpoint=/some/dir"))


@pytest.mark.skipif(
    "key_init" not in {f.name for f in dataclasses.fields(MemoryConfig)},
    reason="MemoryConfig has no key_init field yet (model.memory.key_init is wired by the lead)",
)
def test_run_healing_with_kmeans_keys(tmp_path):
    from smf_lightning.stages.heal import run as run_healing

    summary = run_healing(_compose(tmp_path, "heal.max_steps=2", "model.memory.key_init=kmeans"))
    assert summary["key_init"] == "kmeans"
    for layer in summary["key_init_report"].values():
        assert layer["mean_best_cos_after"] > layer["mean_best_cos_before"]
    assert math.isfinite(summary["after_ppl"])


@pytest.mark.real
def test_lambada_healing_text_avoids_the_suite_items():
    """Real offline LAMBADA: healing text never contains a passage the lambada suite scores."""
    from smf_lightning.eval.suites import build_suite
    from smf_lightning.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()  # any tokenizer: the check is on the documents
    corpus = build_healing_corpus(tok, {"lambada": 300}, n_heldout=50, max_len=10_000, seed=0, reserved=200, source="offline")
    suite = build_suite("lambada", 200, seed=0, source="offline")
    suite_ids = {tuple(tok(item.text)["input_ids"]) for item in suite.items}
    used = {e.input_ids for e in corpus.train + corpus.heldout}
    assert len(used) == 350 and not suite_ids & used


def test_fixed_routing_ablation_trains_only_the_chosen_kinds(corpus, tiny_tok):
    model = retrofit(tiny_qwen2(seed=1), MemoryConfig(**MEM))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _heal(model, corpus, tiny_tok, steps=2, trainable=("values", "gate", "out"))
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == any(f"memory.{k}" in name for k in ("values", "gate", "out")), name
    with pytest.raises(ValueError, match="non-empty subset"):
        memory_parameters(model, ("keys", "mlp"))
