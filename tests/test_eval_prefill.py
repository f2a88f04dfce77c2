"""Greedy decoding prefills a prompt batch in groups of similar length (eval/scoring._prefill):
the same texts as one forward over the whole left-padded batch (logits equal up to float
rounding); with kept prefix states, the same logits to the last bit as without them."""

from __future__ import annotations

import contextlib

import pytest
import torch

from smf_lightning.eval import scoring
from smf_lightning.eval.prefix_states import EvalPrefixStates
from smf_lightning.memory import MemoryConfig, memory_layers, retrofit
from smf_lightning.memory.retrofit import freeze_all_but_values
from smf_lightning.models.tiny import tiny_qwen2

WORDS = "the a man dog sat on roof quickly house river city old new red blue green ran jumps over lazy fox".split()


def _prompts(n: int = 20) -> list[str]:
    """Prompts of 1 to 24 words: a batch of them is mostly padding when prefilled as one."""
    rng = torch.Generator().manual_seed(3)
    lengths = [1, 1, 2, 2, 2, 3, 3, 4, 4, 5, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24][:n]
    return [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (k,), generator=rng)) for k in lengths]


def _model(seed: int = 5):
    model = retrofit(tiny_qwen2(seed=1), MemoryConfig(layers=[2], n_slots=64, heads=2, knn=4, k_dim=16, read_gate=0.3))
    freeze_all_but_values(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for mem in memory_layers(model).values():
            mem.values.weight.normal_(0, 1.0)
            mem.add_writes(torch.arange(0, 64, 3), torch.randn(22, 2, 16), torch.rand(22, 2) + 0.1)
    return model


def _one_group(lengths):
    return [sorted(range(len(lengths)), key=lambda r: (-lengths[r], r))]


def _decode(model, tok, prompts, n, *, grouped: bool, states=None, monkeypatch=None, legacy=False):
    """(new tokens per prompt, every logits tensor the head produced, rows of every forward)."""
    ids, mask, positions = scoring._left_pad(tok(prompts)["input_ids"], scoring.pad_token_id(tok), "cpu")
    with monkeypatch.context() as m:
        if not grouped:
            m.setattr(scoring, "_prefill_groups", _one_group)
        logits, rows = [], []
        hooks = [model.lm_head.register_forward_hook(lambda mod, a, out: logits.append(out.detach().clone())),
                 model.register_forward_pre_hook(lambda mod, a, k: rows.append(k["input_ids"].shape), with_kwargs=True)]
        try:
            with torch.inference_mode(), (states.active(model) if states else contextlib.nullcontext()), \
                    (states.scope("greedy") if states else contextlib.nullcontext()):
                tokens = scoring._greedy_decode(model, tok, ids, mask, positions, n, set(), False, states,
                                                legacy=legacy)
        finally:
            for h in hooks:
                h.remove()
    return tokens, logits, rows


def test_groups_cover_the_rows_longest_first_with_a_minimum_size():
    lengths = [3, 30, 4, 29, 5, 28, 6, 27, 31, 2]
    groups = scoring._prefill_groups(lengths)
    assert sorted(r for g in groups for r in g) == list(range(len(lengths)))
    assert len(groups) == 2 and all(len(g) >= scoring.MIN_PREFILL_ROWS for g in groups)
    assert {lengths[r] for r in groups[0]} == {27, 28, 29, 30, 31}
    assert scoring._prefill_groups([5, 40, 3]) == [[1, 0, 2]]  # too few rows to split
    assert len(scoring._prefill_groups([10] * 64)) == 1  # nothing to save


def test_grouped_prefill_decodes_the_same_to_the_last_bit(tiny_tok, monkeypatch):
    monkeypatch.setattr(scoring, "MIN_DECODING_ROWS", 4)
    monkeypatch.setattr(scoring, "PREFILL_FORWARD_TOKENS", 4)  # the tiny tokenizer's prompts are short
    model, prompts = _model(), _prompts()
    lengths = [len(e) for e in tiny_tok(prompts)["input_ids"]]
    assert len(scoring._prefill_groups(lengths)) >= 3
    grouped, logits_g, rows_g = _decode(model, tiny_tok, prompts, 6, grouped=True, monkeypatch=monkeypatch)
    whole, logits_w, rows_w = _decode(model, tiny_tok, prompts, 6, grouped=False, monkeypatch=monkeypatch)
    assert grouped == whole
    assert len(rows_g) > len(rows_w) and rows_w[0] == (len(prompts), max(lengths))
    assert sum(r * w for r, w in rows_g[:-5]) < rows_w[0][0] * rows_w[0][1]  # fewer prompt tokens run
    # the prompts' logits (one tensor per group, stacked) and every step's: equal up to float rounding
    # (a group's GEMMs and attention have other shapes than the whole batch's; only argmax is used)
    n_groups = len(rows_g) - 5
    first = torch.cat(logits_g[:n_groups])
    order = [r for g in scoring._prefill_groups(lengths) for r in g]
    assert torch.allclose(first, logits_w[0][order], rtol=0, atol=1e-5)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-5) for a, b in zip(logits_g[n_groups:], logits_w[1:], strict=True))
    assert grouped == _decode(model, tiny_tok, prompts, 6, grouped=True, monkeypatch=monkeypatch, legacy=True)[0]


def test_grouped_prefill_with_kept_prefix_states_same_to_the_last_bit(tiny_tok, monkeypatch):
    """A later point reuses every group's kept states and keys/values: the same logits as
    decoding without kept states, and the same texts as one forward over the batch."""
    model, prompts, states = _model(), _prompts(), EvalPrefixStates()
    _decode(model, tiny_tok, prompts, 5, grouped=True, states=states, monkeypatch=monkeypatch)  # fills
    misses = states.misses
    with torch.no_grad():
        for mem in memory_layers(model).values():
            mem.values.weight.normal_(0, 1.0)
    cached, logits_c, _ = _decode(model, tiny_tok, prompts, 5, grouped=True, states=states, monkeypatch=monkeypatch)
    plain, logits_p, _ = _decode(model, tiny_tok, prompts, 5, grouped=True, monkeypatch=monkeypatch)
    assert states.misses == misses and states.hits == misses  # every group's forward came again
    assert cached == plain == _decode(model, tiny_tok, prompts, 5, grouped=False, monkeypatch=monkeypatch)[0]
    assert all(torch.equal(a, b) for a, b in zip(logits_c, logits_p, strict=True))


@pytest.mark.parametrize("batch_size", [20, 7])
def test_generate_greedy_texts_unchanged(tiny_tok, monkeypatch, batch_size):
    model, prompts = _model(), _prompts()
    grouped = scoring.generate_greedy(model, tiny_tok, prompts, 6, batch_size)
    monkeypatch.setattr(scoring, "_prefill_groups", _one_group)
    assert grouped == scoring.generate_greedy(model, tiny_tok, prompts, 6, batch_size)


def test_a_cache_that_cannot_be_stacked_is_prefilled_in_one_forward_once_found(tiny_tok, monkeypatch):
    """A model whose cache is not made of plain growing layers (scoring._mergeable) falls back to
    one forward over the batch; after its first batch it goes there directly, without first
    prefilling a group it cannot use. Same texts either way."""
    monkeypatch.setattr(scoring, "PREFILL_FORWARD_TOKENS", 4)
    model, prompts = _model(), _prompts()
    whole, _, _ = _decode(model, tiny_tok, prompts, 6, grouped=False, monkeypatch=monkeypatch)
    monkeypatch.setattr(scoring, "_mergeable", lambda cache: False)
    first, _, rows_1 = _decode(model, tiny_tok, prompts, 6, grouped=True, monkeypatch=monkeypatch)
    again, _, rows_2 = _decode(model, tiny_tok, prompts, 6, grouped=True, monkeypatch=monkeypatch)
    assert first == again == whole
    batch = (len(prompts), max(len(e) for e in tiny_tok(prompts)["input_ids"]))
    assert rows_1[0][0] < len(prompts) and rows_1[1] == batch  # a group's forward, then the whole batch's
    assert rows_2[0] == batch and len(rows_2) == len(rows_1) - 1  # straight to the whole batch
