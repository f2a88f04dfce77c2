"""Evaluation with kept frozen-prefix states (eval/prefix_states.py): every suite kind and fact
recall give the same numbers to the last bit as without, at a later evaluation point with
different memory values; the prefix layers really are skipped; the cache is off or cleared
wherever the layers below the memory can change; a whole tiny run writes the same files."""

from __future__ import annotations

import contextlib
import csv
import filecmp
from pathlib import Path

import pytest
import torch

from smf_lightning.data.facts import Fact, FactTemplate
from smf_lightning.data.sources import ChoiceItem, MathItem, PassageItem, QAItem
from smf_lightning.eval.prefix_states import EvalPrefixStates
from smf_lightning.eval.suites import FactRecallSuite, GSM8KSuite, HellaSwagSuite, LambadaSuite, NQOpenSuite
from smf_lightning.memory import MemoryConfig, memory_layers, retrofit
from smf_lightning.memory.retrofit import decoder_layers, freeze_all_but_values
from smf_lightning.models.tiny import tiny_qwen2

WORDS = "the a man dog sat on roof quickly house river city old new red blue green ran jumps over lazy fox".split()


def _text(rng: torch.Generator, n: int) -> str:
    return " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (n,), generator=rng))


def _suites() -> list:
    """One suite of every kind, items of varied lengths (so batches are padded differently)."""
    rng = torch.Generator().manual_seed(0)
    n = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=rng))  # noqa: E731
    qa = [QAItem(f"q{i}", _text(rng, n(2, 9)), (_text(rng, n(1, 3)),)) for i in range(7)]
    choice = [ChoiceItem(f"c{i}", _text(rng, n(3, 12)), tuple(_text(rng, n(1, 6)) for _ in range(4)), i % 4)
              for i in range(6)]
    math = [MathItem(f"m{i}", _text(rng, n(3, 10)), _text(rng, n(4, 12)), str(i)) for i in range(5)]
    passages = [PassageItem(f"p{i}", _text(rng, n(4, 14)), WORDS[i]) for i in range(7)]
    facts = [Fact(f"f{i}", _text(rng, n(2, 8)) + "?", w, (w,)) for i, w in enumerate(WORDS[:9])]
    return [
        NQOpenSuite(qa, max_new_tokens=5, generation_batch_size=3),
        HellaSwagSuite(choice),
        GSM8KSuite(math),
        LambadaSuite(passages, score_passage=True),
        FactRecallSuite(facts, FactTemplate("qa", "Question: {question}\nAnswer: {answer}"), max_new_tokens=5,
                        generation_batch_size=4),
    ]


def _smf_model(layers=(2, 3)):
    model = retrofit(tiny_qwen2(seed=1), MemoryConfig(layers=list(layers), n_slots=64, heads=2, knn=4, k_dim=16))
    freeze_all_but_values(model)
    return model


def _train_memory(model, seed: int) -> None:
    """A stand-in for an SMF task: new, non-zero memory values (nothing else moves)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for mem in memory_layers(model).values():
            mem.values.weight.normal_(0, 1.0)


def _evaluate(model, tok, suites, states=None) -> tuple[list, list]:
    """(per-item columns of every suite, every logits tensor the LM head produced)."""
    logits = []
    hook = model.lm_head.register_forward_hook(lambda m, a, out: logits.append(out.detach().clone()))
    items = []
    try:
        for suite in suites:
            if states is None:
                suite.evaluate(model, tok, 2)
            else:
                with states.active(model), states.scope(suite.name):
                    suite.evaluate(model, tok, 2)
            items.append(dict(suite.last_items))
    finally:
        hook.remove()
    return items, logits


def _assert_same(a, b) -> None:
    (items_a, logits_a), (items_b, logits_b) = a, b
    assert items_a == items_b
    assert len(logits_a) == len(logits_b)
    assert all(torch.equal(x, y) for x, y in zip(logits_a, logits_b))


def test_every_suite_and_recall_same_to_the_last_bit(tiny_tok):
    """Point 1 fills the cache, point 2 (other memory values) reuses it: each equals the
    uncached evaluation in every logit, score and prediction."""
    model, suites, states = _smf_model(), _suites(), EvalPrefixStates()
    _train_memory(model, seed=1)
    _assert_same(_evaluate(model, tok=tiny_tok, suites=suites, states=states), _evaluate(model, tiny_tok, suites))
    fill_misses = states.misses
    assert states.hits == 0 and fill_misses > 0 and states.entries
    _train_memory(model, seed=2)
    uncached = _evaluate(model, tiny_tok, suites)
    _assert_same(_evaluate(model, tiny_tok, suites, states), uncached)
    assert states.misses == fill_misses  # every forward of point 2 was kept from point 1
    assert states.hits == fill_misses
    # the greedy prompts kept their lower layers' keys and values, the scoring forwards did not need them
    assert any(e.kv is not None for e in states.entries.values())
    assert any(e.kv is None for e in states.entries.values())
    _assert_same(_evaluate(model, tiny_tok, suites, states), uncached)  # the kept states are left intact


def test_a_hit_skips_the_layers_below_the_memory(tiny_tok):
    model, states = _smf_model(), EvalPrefixStates()
    suites = _suites()
    _evaluate(model, tiny_tok, suites, states)
    calls = {i: 0 for i in range(4)}
    hooks = [layer.self_attn.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(decoder_layers(model))]
    try:
        _evaluate(model, tiny_tok, [s for s in suites if s.name in ("gsm8k", "lambada", "hellaswag")], states)
    finally:
        for h in hooks:
            h.remove()
    assert calls[0] == calls[1] == 0 and calls[2] == calls[3] > 0  # memory at 2: layers 0, 1 skipped
    assert all("forward" not in vars(layer) for layer in decoder_layers(model))  # own forwards back


def test_greedy_decoding_reuses_the_prompts_kv_cache(tiny_tok):
    """Generation only: a hit puts the lower layers' prompt keys/values back, and the decoding
    steps (which do run every layer) attend to them exactly."""
    model, states = _smf_model(layers=(3,)), EvalPrefixStates()
    nq = _suites()[0]
    _evaluate(model, tiny_tok, [nq], states)
    _train_memory(model, seed=3)
    hits = states.hits
    _assert_same(_evaluate(model, tiny_tok, [nq], states), _evaluate(model, tiny_tok, [nq]))
    assert states.hits > hits


@pytest.mark.parametrize("min_rows", [1, 16])
def test_decoding_steps_with_the_same_history_skip_the_layers_below(tiny_tok, monkeypatch, min_rows):
    """A later point whose batch generates the tokens of the point before skips the layers below
    the memory in every decoding step as in the prompt (finished rows leaving the batch or not),
    with every logit equal to the uncached decoding; a point whose tokens differ from some step
    on runs those steps in full, equal to the uncached decoding too, and keeps them."""
    from smf_lightning.eval import scoring

    monkeypatch.setattr(scoring, "MIN_DECODING_ROWS", min_rows)
    model, states = _smf_model(layers=(2,)), EvalPrefixStates()
    _train_memory(model, seed=8)
    eos, newline = _ending_tokens(model, tiny_tok, 7)
    first = _decode(model, tiny_tok, 7, eos, newline, states=states)
    steps = states.step_misses
    assert states.step_hits == 0 and steps > 0
    calls = {i: 0 for i in range(4)}
    hooks = [layer.self_attn.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(decoder_layers(model))]
    try:
        again = _decode(model, tiny_tok, 7, eos, newline, states=states)  # same memory: same tokens
    finally:
        for h in hooks:
            h.remove()
    assert states.step_hits == steps and states.step_misses == steps
    assert calls[0] == calls[1] == 0 and calls[2] == calls[3] == steps + 1  # the prompt and every step
    plain = _decode(model, tiny_tok, 7, eos, newline)
    for a, b in ((first, plain), (again, plain)):
        assert a[0] == b[0] and a[1] == b[1] and all(torch.equal(x, y) for x, y in zip(a[2], b[2]))
    _train_memory(model, seed=9)  # other tokens from some step on
    cached, plain = _decode(model, tiny_tok, 7, eos, newline, states=states), _decode(model, tiny_tok, 7, eos, newline)
    assert cached[0] != first[0] and states.step_misses > steps
    assert cached[0] == plain[0] and cached[1] == plain[1] and all(torch.equal(x, y) for x, y in zip(cached[2], plain[2]))


def test_off_where_the_prefix_can_change(tiny_tok):
    suite = _suites()[2]
    trainable = retrofit(tiny_qwen2(seed=1), MemoryConfig(layers=[2], n_slots=64, heads=2, knn=4, k_dim=16))
    states = EvalPrefixStates()
    _evaluate(trainable, tiny_tok, [suite], states)  # every base parameter trainable (full finetuning)
    assert not states.entries and states.misses == 0
    at_zero = _smf_model(layers=(0, 2))  # no layers below the lowest memory layer
    _evaluate(at_zero, tiny_tok, [suite], states)
    assert not states.entries
    embed_trained = _smf_model()
    embed_trained.get_input_embeddings().weight.requires_grad_(True)
    _evaluate(embed_trained, tiny_tok, [suite], states)
    assert not states.entries


def test_cleared_when_a_frozen_weight_changes(tiny_tok):
    model, states, suite = _smf_model(), EvalPrefixStates(), _suites()[2]
    _evaluate(model, tiny_tok, [suite], states)
    assert states.entries
    with torch.no_grad():
        decoder_layers(model)[0].mlp.down_proj.weight.mul_(1.5)  # e.g. a checkpoint loaded into the base
    uncached = _evaluate(model, tiny_tok, [suite])
    misses = states.misses
    _assert_same(_evaluate(model, tiny_tok, [suite], states), uncached)
    assert states.misses == misses + len(states.entries) and states.hits == 0


def test_a_scope_drops_batches_that_did_not_come_again(tiny_tok):
    """Recall over a grown set of tasks forms other batches: the old ones are dropped."""
    model, states = _smf_model(), EvalPrefixStates()
    recall = _suites()[4]
    facts = list(recall.facts)
    recall.facts = facts[:4]
    _evaluate(model, tiny_tok, [recall], states)
    first = set(states.entries)
    recall.facts = facts
    _evaluate(model, tiny_tok, [recall], states)
    assert first - set(states.entries)  # some batches of 4 facts are gone
    prompts = [k for k in states.entries if k[0] != "step"]  # (decoding steps: keys ("step", history, ...))
    assert len(prompts) == 3  # 9 facts in batches of 4
    steps = [k for k in states.entries if k[0] == "step"]
    assert steps and all(states.entries[k].session == states.entries[prompts[0]].session for k in steps)


# ----------------------------------------------------------------------------- a whole run

RUN = ["experiment=tiny", "logger.wandb.mode=offline", "callbacks.checkpoint.enabled=false", "callbacks.plots=false",
       "callbacks.cache_before_eval=false"]


def test_tiny_run_writes_the_same_files_with_and_without(tmp_path):
    """SMF on the tiny model, every suite at every point: every per-item file (scores,
    predictions, recall) and the summary's numbers are identical; the log shows hits."""
    from tests.test_train import cli

    runs = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        res = cli([*RUN, f"callbacks.eval_prefix_cache={flag}", f"hydra.run.dir={out}"])
        assert res.returncode == 0, res.stderr[-3000:]
        runs[flag] = (out, res.stdout + res.stderr)
    (plain, _), (cached, log) = runs["false"], runs["true"]
    assert "prefix cache" in log and "prefix cache 0 hits" not in log.split("after task 1")[-1]
    files = sorted(p.relative_to(plain) for p in (plain / "items").rglob("*.csv"))
    assert len(files) >= 3 * 5  # 3 points x (4 suites + recall)
    for rel in files:
        assert filecmp.cmp(plain / rel, cached / rel, shallow=False), rel
    for name in ("heldout.csv", "accuracy_matrix.csv", "accuracy_matrix_heldout_template.csv"):
        assert (plain / name).read_text() == (cached / name).read_text(), name
    rows = list(csv.DictReader((cached / "items" / "after_task_1" / "nq_open.csv").open()))
    assert rows and "prediction" in rows[0]


def test_bad_switch_value_is_rejected(tmp_path):
    from tests.test_train import cli

    res = cli([*RUN, "callbacks.eval_prefix_cache=maybe", f"hydra.run.dir={tmp_path}"])
    assert res.returncode == 2 and "callbacks.eval_prefix_cache" in res.stdout + res.stderr  # config check, before loading


def test_choice_scoring_recomputes_the_context_when_a_choice_forward_is_missing(tiny_tok):
    """The context's prefix is skipped only when every choice forward of its batch is kept
    (their cache then needs no real prefix keys/values); otherwise it runs in full."""
    model, states, hellaswag = _smf_model(), EvalPrefixStates(), _suites()[1]
    _evaluate(model, tiny_tok, [hellaswag], states)
    choice_keys = [k for k in states.entries if k[0] == "continues"]
    assert choice_keys
    del states.entries[choice_keys[0]]
    _train_memory(model, seed=4)
    _assert_same(_evaluate(model, tiny_tok, [hellaswag], states), _evaluate(model, tiny_tok, [hellaswag]))


def test_recall_over_a_growing_set_of_tasks_hits_at_every_point(tiny_tok):
    """Recall batches within each task (evaluate_task_recall), so the 'before' point (all tasks)
    keeps every batch and each later point (tasks 0..i) reuses them: no miss after the first
    point, every logit and prediction equal to the uncached evaluation."""
    from smf_lightning.eval.suites import evaluate_task_recall

    model, states = _smf_model(), EvalPrefixStates()
    facts = list(_suites()[4].facts)  # 9 facts: 3 tasks of 3
    templates = [FactTemplate("qa", "Question: {question}\nAnswer: {answer}"), FactTemplate("s", "{question} It is {answer}.")]

    def point(tasks, with_states):
        suites = {j: {t.name: FactRecallSuite(facts[3 * j:3 * j + 3], t, max_new_tokens=4, name=f"task{j}/{t.name}")
                      for t in templates} for j in tasks}
        items, logits = {}, []
        hook = model.lm_head.register_forward_hook(lambda m, a, out: logits.append(out.detach().clone()))
        try:
            if with_states:
                with states.active(model), states.scope("fact_recall"):
                    evaluate_task_recall(model, tiny_tok, suites, 4, items)
            else:
                evaluate_task_recall(model, tiny_tok, suites, 4, items)
        finally:
            hook.remove()
        return items, logits

    _train_memory(model, seed=1)
    _assert_same(point(range(3), True), point(range(3), False))
    fill = states.misses
    assert states.hits == 0 and fill == 3 * 2  # 6 prompts per task, batches of 4
    for seen in (1, 2, 3):
        _train_memory(model, seed=1 + seen)
        _assert_same(point(range(seen), True), point(range(seen), False))
        assert states.misses == fill  # every batch of tasks 0..seen-1 was kept at the first point
    assert states.hits == 2 * (1 + 2 + 3)


# ----------------------------------------------------------------------------- greedy decoding

class _NewlineAs:
    """The tiny tokenizer, except that the given token ids decode to a newline (the random tiny
    model hardly ever emits one), so stop-at-newline is exercised."""

    def __init__(self, tok, ids):
        self.tok, self.ids = tok, set(ids)

    def decode(self, ids, **kwargs):
        return "\n" if len(ids) == 1 and ids[0] in self.ids else self.tok.decode(ids, **kwargs)


PROMPTS = ["the dog sat on the roof", "a", "old red fox jumps", "the man ran quickly over the lazy house river",
           "blue", "new city"]


def _decode(model, tok, n, eos=(), newline=(), legacy=False, stop_at_newline=True, states=None):
    """(new tokens per prompt, rows of every forward, every logits tensor) of one left-padded batch."""
    from smf_lightning.eval.scoring import _greedy_decode, _left_pad, pad_token_id

    ids, mask, positions = _left_pad(tok(PROMPTS)["input_ids"], pad_token_id(tok), "cpu")
    rows, logits = [], []
    hooks = [model.register_forward_pre_hook(lambda m, a, k: rows.append(k["input_ids"].shape[0]), with_kwargs=True),
             model.lm_head.register_forward_hook(lambda m, a, out: logits.append(out.detach().clone()))]
    try:
        with torch.inference_mode(), (states.active(model) if states else contextlib.nullcontext()), \
                (states.scope("greedy") if states else contextlib.nullcontext()):
            tokens = _greedy_decode(model, _NewlineAs(tok, newline), ids, mask, positions, n, set(eos),
                                    stop_at_newline, states, legacy=legacy)
    finally:
        for h in hooks:
            h.remove()
    return tokens, rows, logits


def _ending_tokens(model, tok, n):
    """Eos ids and a newline id under which the prompts finish at different steps: the tokens rows
    0 and 5 emit at steps 1 and 4, the one row 2 emits at step 3 (with none, every row runs to n)."""
    free, _, _ = _decode(model, tok, n, stop_at_newline=False)
    assert all(len(t) == n for t in free)
    return {free[0][1], free[5][4]}, {free[2][3]}


@pytest.mark.parametrize("stop_at_newline,min_rows", [(True, 1), (False, 1), (True, 4)])
def test_dropping_finished_rows_gives_the_same_texts(tiny_tok, monkeypatch, stop_at_newline, min_rows):
    """Rows leave the decoding batch at eos / their newline (down to MIN_DECODING_ROWS, finished
    rows riding along to fill it) and the loop stops when none is left: the same tokens as
    decoding every row to the end (the loop before, legacy=True), with left padding (prompts of
    1 to 9 words) and rows finishing at different steps."""
    from smf_lightning.eval import scoring

    monkeypatch.setattr(scoring, "MIN_DECODING_ROWS", min_rows)
    model = _smf_model()
    _train_memory(model, seed=5)
    eos, newline = _ending_tokens(model, tiny_tok, 8)
    legacy, legacy_rows, _ = _decode(model, tiny_tok, 8, eos, newline, legacy=True, stop_at_newline=stop_at_newline)
    new, rows, _ = _decode(model, tiny_tok, 8, eos, newline, stop_at_newline=stop_at_newline)
    assert new == legacy
    assert len({len(t) for t in new}) >= 3  # rows did finish at different steps (or run to the end)
    assert any(t and t[-1] in newline for t in new) == stop_at_newline  # a newline ends its row, and is kept
    assert not any(tok in eos for t in new for tok in t)  # eos is not
    assert set(legacy_rows) == {len(PROMPTS)}
    assert rows[0] == len(PROMPTS) and rows == sorted(rows, reverse=True) and rows[-1] < len(PROMPTS)
    assert min(rows) >= min_rows and len(rows) <= len(legacy_rows)


def test_a_batch_of_at_most_min_decoding_rows_is_not_shrunk(tiny_tok):
    from smf_lightning.eval import scoring

    model = _smf_model()
    eos, newline = _ending_tokens(model, tiny_tok, 8)
    assert len(PROMPTS) <= scoring.MIN_DECODING_ROWS
    tokens, rows, _ = _decode(model, tiny_tok, 8, eos, newline)
    assert set(rows) == {len(PROMPTS)} and tokens == _decode(model, tiny_tok, 8, eos, newline, legacy=True)[0]


def test_dropping_finished_rows_with_kept_prefix_same_to_the_last_bit(tiny_tok, monkeypatch):
    """With rows leaving the batch, a later point that reuses the prompt's prefix states and
    keys/values decodes exactly as without them: every logit of every step."""
    from smf_lightning.eval import scoring

    monkeypatch.setattr(scoring, "MIN_DECODING_ROWS", 2)
    model, states = _smf_model(layers=(3,)), EvalPrefixStates()
    _train_memory(model, seed=6)
    eos, newline = _ending_tokens(model, tiny_tok, 7)
    _decode(model, tiny_tok, 7, eos, newline, states=states)  # fills
    _train_memory(model, seed=7)
    eos, newline = _ending_tokens(model, tiny_tok, 7)
    hits = states.hits
    cached, rows, logits_cached = _decode(model, tiny_tok, 7, eos, newline, states=states)
    plain, rows_plain, logits_plain = _decode(model, tiny_tok, 7, eos, newline)
    assert states.hits == hits + 1
    assert cached == plain and rows == rows_plain and rows[-1] < len(PROMPTS)
    assert len(logits_cached) == len(logits_plain)
    assert all(torch.equal(a, b) for a, b in zip(logits_cached, logits_plain))
    assert cached == _decode(model, tiny_tok, 7, eos, newline, legacy=True)[0]


def test_the_prompts_logits_are_taken_contiguously(tiny_tok):
    """The head sees the prompt's last column as a contiguous [rows, 1, hidden] tensor (an int
    logits_to_keep hands it a strided slice: a matrix-vector product per row on a CPU)."""
    model = _smf_model()
    seen = []
    hook = model.lm_head.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        _decode(model, tiny_tok, 1)
        _decode(model, tiny_tok, 1, legacy=True)
    finally:
        hook.remove()
    assert seen[0].shape == (len(PROMPTS), 1, 64) and seen[0].is_contiguous()
    assert not seen[1].is_contiguous()
