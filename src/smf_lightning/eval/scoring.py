"""Batched model scoring: continuation log-probabilities and greedy generation.

Both work on any HF causal LM whose forward takes `input_ids`, `attention_mask`,
`position_ids` (and, when supported, `logits_to_keep`) and returns `.logits` — base,
retrofitted, LoRA-wrapped. Batches are LEFT-padded: every sequence then ends at the last
column, so the scored continuation tokens sit in the last K columns and only those
logits need to be materialised (`logits_to_keep`), which keeps the 151,936-way vocabulary
of Qwen2.5 affordable on a CPU. Position ids are computed from the attention mask, so
left padding does not shift positions. Items are sorted by length inside the call to
keep padding small; results come back in input order.

Inside ``EvalPrefixStates.active`` (eval/prefix_states.py; SMF runs) every forward here keeps
the states entering the lowest memory layer, keyed by its exact inputs, and skips the layers
below when the same forward comes again at a later evaluation point: same numbers to the
last bit. Batches depend on the items only, never on the model, so they do come again.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .prefix_states import EvalPrefixStates, active_states, prefix_key


class _ChoiceForward(NamedTuple):
    """One forward of score_choices over choice rows that continue a context batch's cache."""

    rows: list  # (row in the context batch, context, choice)
    conts: list  # their token ids
    row_ctx: torch.Tensor  # context row of each
    width: int  # longest choice
    cont: torch.Tensor  # right-padded choice ids [R, width]
    rest_mask: torch.Tensor  # attention mask of the forward over choice tokens 0..width-2
    positions: torch.Tensor  # their positions


@dataclass(frozen=True)
class ScoredContinuation:
    """Per-token log-probabilities of a scored continuation and whether each token was the
    argmax (all(greedy) = "the greedy continuation reproduces it", e.g. LAMBADA accuracy)."""

    logprobs: torch.Tensor  # [n_scored] float32
    greedy: torch.Tensor  # [n_scored] bool

    @property
    def sum_logprob(self) -> float:
        return float(self.logprobs.sum())

    @property
    def n_tokens(self) -> int:
        return int(self.logprobs.numel())

    @property
    def is_greedy(self) -> bool:
        return bool(self.greedy.all())


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its eos id (padding is masked out either way)."""
    for tok_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tok_id is not None:
            return int(tok_id)
    return 0


def encode_context_continuation(
    tokenizer, contexts: Sequence[str], continuations: Sequence[str], max_length: int = 1024
) -> list[tuple[list[int], int]]:
    """Token ids of context+continuation and the number of continuation tokens to score.

    The two parts are tokenised separately and concatenated (as lm-evaluation-harness does),
    so the boundary is exact; the continuation should carry its own leading space. Special
    tokens (e.g. a BOS) are added to the context only. Over-long inputs lose context tokens
    from the left; the continuation is always kept whole.
    """
    ctx_ids = tokenizer(list(contexts), add_special_tokens=True)["input_ids"]
    cont_ids = tokenizer(list(continuations), add_special_tokens=False)["input_ids"]
    encoded = []
    for ctx, cont in zip(ctx_ids, cont_ids, strict=True):
        if not cont:
            raise ValueError("cannot score an empty continuation")
        keep_ctx = max(1, max_length - len(cont))
        encoded.append((list(ctx[-keep_ctx:]) + list(cont), len(cont)))
    return encoded


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _forward_last_logits(model, ids, mask, positions, keep: int) -> torch.Tensor:
    """Logits of the last `keep` columns ([B, keep, V]); falls back to full logits for models
    whose forward does not accept `logits_to_keep`."""
    try:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
    except TypeError:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    return logits[:, -keep:]


# Upper bound on the logits materialised per forward (elements; 2**28 fp32 = 1 GiB): with a
# 151,936-word vocabulary, 16 rows x 150 scored tokens would otherwise need 1.5 GiB (plus as
# much again for the log-softmax), so long continuations get fewer rows per forward.
MAX_LOGIT_ELEMENTS = 2**28


def _vocab_size(model) -> int:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and hasattr(out, "weight"):
        return int(out.weight.shape[0])
    return int(getattr(getattr(model, "config", None), "vocab_size", 0) or 1)


def _split_by_logit_budget(rows: list, widths: Sequence[int], batch_size: int, vocab: int) -> list[list]:
    """Consecutive chunks of `rows` (sorted widest first) with at most batch_size rows and at
    most MAX_LOGIT_ELEMENTS logits (rows x widest x vocab); a single row always fits."""
    chunks: list[list] = []
    for row, width in zip(rows, widths):
        if chunks and len(chunks[-1][0]) < batch_size and (len(chunks[-1][0]) + 1) * chunks[-1][1] * vocab <= MAX_LOGIT_ELEMENTS:
            chunks[-1][0].append(row)
        else:
            chunks.append(([row], width))
    return [c for c, _ in chunks]


def _key(states: EvalPrefixStates | None, *parts) -> tuple | None:
    return prefix_key(*parts) if states is not None else None


def _reuse(states: EvalPrefixStates | None, key: tuple | None, **kw):
    """The forward in the block reuses (or keeps) its prefix states; outside an active
    EvalPrefixStates, today's path."""
    return contextlib.nullcontext() if states is None else states.forward(key, **kw)


def _length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def score_sequences(
    model, sequences: Sequence[Sequence[int]], n_scored: Sequence[int], batch_size: int, pad_id: int
) -> list[ScoredContinuation]:
    """Log-probabilities of the last `n_scored[i]` tokens of each `sequences[i]`, one forward
    per batch. `n_scored[i]` may be at most len(sequences[i]) - 1 (the first token has no
    prediction)."""
    for seq, n in zip(sequences, n_scored, strict=True):
        if not 1 <= n < len(seq):
            raise ValueError(f"n_scored must be in [1, len(sequence)-1]; got {n} for a sequence of {len(seq)} tokens")
    results: list[ScoredContinuation | None] = [None] * len(sequences)
    device = _device(model)
    vocab = _vocab_size(model)
    batches = []
    for batch in _length_sorted_batches([len(s) for s in sequences], batch_size):
        batch = sorted(batch, key=lambda i: -n_scored[i])
        batches += _split_by_logit_budget(batch, [n_scored[i] + 1 for i in batch], batch_size, vocab)
    states = active_states(model)
    with _eval_mode(model):
        for batch in batches:
            ids, mask, positions = _left_pad([sequences[i] for i in batch], pad_id, device)
            n = torch.tensor([n_scored[i] for i in batch], device=device)
            keep = int(n.max()) + 1
            with _reuse(states, _key(states, ids, mask, positions)):
                logits = _forward_last_logits(model, ids, mask, positions, keep)[:, :-1].float()  # predicts last keep-1 tokens
            targets = ids[:, -(keep - 1):]
            token_logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
            greedy = logits.argmax(-1) == targets
            for row, i in enumerate(batch):
                k = n_scored[i]
                results[i] = ScoredContinuation(token_logprobs[row, -k:].cpu(), greedy[row, -k:].cpu())
    return results  # type: ignore[return-value]


def score_continuations(
    model, tokenizer, contexts: Sequence[str], continuations: Sequence[str], batch_size: int, max_length: int = 1024
) -> list[ScoredContinuation]:
    """log p(continuation | context) per token, batched; see encode_context_continuation."""
    encoded = encode_context_continuation(tokenizer, contexts, continuations, max_length)
    return score_sequences(model, [e[0] for e in encoded], [e[1] for e in encoded], batch_size, pad_token_id(tokenizer))


@torch.inference_mode()
def score_choices(
    model, tokenizer, contexts: Sequence[str], choices: Sequence[Sequence[str]], batch_size: int, max_length: int = 1024
) -> list[list[ScoredContinuation]]:
    """log p(choice | context) per token for every choice of every context (multiple choice).

    Each context is run once; its KV cache is then copied to one row per choice and only
    the choice tokens are run (HellaSwag: a ~60-token context and four ~25-token endings,
    so about half the tokens of scoring four full sequences). Choice rows are regrouped by
    length before they run, so padding stays small. `batch_size` counts contexts per
    context forward and choice rows per choice forward. Tokenisation as in
    encode_context_continuation; the result equals score_continuations on the repeated
    contexts up to float rounding.
    """
    import copy

    flat = [c for group in choices for c in group]
    choice_ids = tokenizer(flat, add_special_tokens=False)["input_ids"]
    grouped, pos = [], 0
    for group in choices:
        grouped.append(choice_ids[pos:pos + len(group)])
        pos += len(group)
    if any(not ids for group in grouped for ids in group) or any(not group for group in grouped):
        raise ValueError("score_choices needs at least one non-empty choice per context")
    ctx_ids = []
    for ctx, group in zip(tokenizer(list(contexts), add_special_tokens=True)["input_ids"], grouped, strict=True):
        keep = max(1, max_length - max(len(c) for c in group))
        ctx_ids.append(list(ctx[-keep:]))
    results: list[list[ScoredContinuation | None]] = [[None] * len(g) for g in grouped]
    device = _device(model)
    pad_id = pad_token_id(tokenizer)
    cache_kwarg = _cache_kwarg_name(model)
    vocab = _vocab_size(model)
    states = active_states(model)
    with _eval_mode(model):
        for batch in _length_sorted_batches([len(c) for c in ctx_ids], batch_size):
            ids, mask, positions = _left_pad([ctx_ids[i] for i in batch], pad_id, device)
            rows = [(b, i, j) for b, i in enumerate(batch) for j in range(len(grouped[i]))]
            rows.sort(key=lambda r: -len(grouped[r[1]][r[2]]))
            chunks = []  # the choice forwards, planned before the context runs (they depend on the items only)
            for chunk in _split_by_logit_budget(rows, [len(grouped[i][j]) for _, i, j in rows], batch_size, vocab):
                conts = [grouped[i][j] for _, i, j in chunk]
                row_ctx = torch.tensor([b for b, _, _ in chunk], device=device)
                width = max(len(c) for c in conts)
                cont = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                cont_mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, c in enumerate(conts):
                    cont[r, : len(c)] = torch.as_tensor(c)
                    cont_mask[r, : len(c)] = 1
                cont, cont_mask = cont.to(device), cont_mask.to(device)
                rest_mask = torch.cat([mask[row_ctx], cont_mask[:, :-1]], dim=-1)
                cont_positions = positions[row_ctx, -1:] + 1 + torch.arange(width - 1, device=device)
                chunks.append(_ChoiceForward(chunk, conts, row_ctx, width, cont, rest_mask, cont_positions))
            ctx_key = _key(states, ids, mask, positions)
            rest_keys = [_key(states, "continues", ctx_key, c.row_ctx, c.cont[:, :-1], c.rest_mask, c.positions)
                         for c in chunks]
            # Every choice forward kept: none of them runs the prefix layers, so the context's
            # cache needs no real prefix keys/values, only their length (placeholders).
            lean = states is not None and states.has(ctx_key) and all(
                states.has(k) for k, c in zip(rest_keys, chunks) if c.width > 1)
            with _reuse(states, ctx_key, kv="placeholder" if lean else None, reuse=lean):
                try:
                    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
                except TypeError:
                    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
            cache = _returned_cache(out)
            if not hasattr(cache, "batch_select_indices"):  # no shareable cache: score full sequences
                for i in batch:
                    results[i] = score_sequences(
                        model, [ctx_ids[i] + c for c in grouped[i]], [len(c) for c in grouped[i]], batch_size, pad_id
                    )
                continue
            first_logits = out.logits[:, -1].float()  # [B, V]: predicts every choice's first token
            for n_chunk, ((chunk, conts, row_ctx, width, cont, rest_mask, cont_positions), rest_key) in enumerate(
                    zip(chunks, rest_keys)):
                first = first_logits[row_ctx]
                token_logprobs = (first.gather(-1, cont[:, :1]) - torch.logsumexp(first, dim=-1, keepdim=True))
                greedy = first.argmax(-1, keepdim=True) == cont[:, :1]
                if width > 1:
                    # the last chunk may consume the context cache; earlier ones work on copies
                    rows_cache = cache if n_chunk == len(chunks) - 1 else copy.deepcopy(cache)
                    rows_cache.batch_select_indices(row_ctx)
                    with _reuse(states, rest_key):
                        rest = model(
                            input_ids=cont[:, :-1], attention_mask=rest_mask,
                            position_ids=cont_positions, use_cache=True, **{cache_kwarg: rows_cache},
                        ).logits.float()  # [R, width - 1, V]: predicts choice tokens 1..
                    rest_targets = cont[:, 1:]
                    token_logprobs = torch.cat([token_logprobs, rest.gather(-1, rest_targets.unsqueeze(-1)).squeeze(-1)
                                                - torch.logsumexp(rest, dim=-1)], dim=1)
                    greedy = torch.cat([greedy, rest.argmax(-1) == rest_targets], dim=1)
                    del rest
                for r, ((_, i, j), c) in enumerate(zip(chunk, conts)):
                    results[i][j] = ScoredContinuation(token_logprobs[r, : len(c)].cpu(), greedy[r, : len(c)].cpu())
    return results  # type: ignore[return-value]


@torch.inference_mode()
def generate_greedy(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    stop_at_newline: bool = True,
) -> list[str]:
    """Greedy continuations of `prompts` (decoded text, special tokens dropped).

    Left-padded batches with a KV cache; a row stops at eos, and — with `stop_at_newline` —
    at its first newline (answers are one line; the text after it is cut off), and then leaves
    the batch (see _greedy_decode). The
    decoding loop is our own rather than `model.generate` so that a checkpoint's sampling
    defaults (temperature, repetition penalty in e.g. Qwen2.5-Instruct's
    generation_config) can never leak into "greedy" evaluation.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    pad_id = pad_token_id(tokenizer)
    eos_ids = _eos_ids(model, tokenizer)
    encoded = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    outputs: list[str | None] = [None] * len(prompts)
    device = _device(model)
    states = active_states(model)
    with _eval_mode(model):
        for batch in _length_sorted_batches([len(e) for e in encoded], batch_size):
            ids, mask, positions = _left_pad([encoded[i] for i in batch], pad_id, device)
            new_tokens = _greedy_decode(model, tokenizer, ids, mask, positions, max_new_tokens, eos_ids, stop_at_newline,
                                        states)
            for row, i in enumerate(batch):
                text = tokenizer.decode(new_tokens[row], skip_special_tokens=True)
                outputs[i] = text.split("\n", 1)[0] if stop_at_newline else text
    return outputs  # type: ignore[return-value]


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _cache_kwarg_name(model) -> str:
    """transformers >= 5.x calls the KV cache argument `cache`, older versions `past_key_values`."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrappers
    params = inspect.signature(type(inner).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


# Rows a decoding step keeps at least when finished rows leave the batch. A step is bound by
# reading the weights: on the 2-core CPU (MKL, one thread, Qwen2.5-0.5B) it costs 0.72 s for 64
# rows, 0.53 s for 32, 0.45 s for 16, but 0.63 s for 13-15 (MKL's kernels for fewer than 16
# rows) and 0.43 s for 8; on a GPU a step of a few rows costs the same as one of 16.
MIN_DECODING_ROWS = 16


def _greedy_decode(model, tokenizer, ids, mask, positions, max_new_tokens, eos_ids, stop_at_newline,
                   states: EvalPrefixStates | None = None, *, legacy: bool = False) -> list[list[int]]:
    """The new tokens of each row of a left-padded prompt batch (eos not included; a newline
    is, and ends the row).

    A row that has finished leaves the batch, its rows of the KV cache with it, while more than
    MIN_DECODING_ROWS rows remain (finished rows ride along to fill it up), and the loop ends
    when none is left (fact recall at 40 facts x 5 templates: a third of the row-steps of 64-row
    batches went to finished rows). The prompt's next-token logits come from its last column
    gathered into a contiguous tensor: an int ``logits_to_keep`` hands the head a strided slice,
    which torch multiplies row by row (a matrix-vector product per prompt through Qwen2.5's 151,936-word
    head: 0.75 s vs 0.11 s for 20 prompts, one thread). Both change only which rows a matrix
    product sees, so a row's logits can move by float rounding (GEMM kernels depend on the row
    count); only their argmax is used, never a score, so a text changes only where two logits tie
    within rounding (none did on experiments/tools/bench_eval.py's items; the tests compare texts).
    Cached and uncached evaluation run this same loop, so they agree to the last bit. With kept
    prefix states, a step whose batch produced the same tokens so far at an earlier point skips
    the layers below the memory as the prompt does (eval/prefix_states.py, kv="append").

    ``legacy=True`` is the loop before those two changes (every row decoded until all are done,
    ``logits_to_keep=1``): bench_eval.py's "today" baseline, and the tests' reference.
    """
    batch = ids.shape[0]
    generated: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    is_newline: dict[int, bool] = {}  # token id -> its text has a newline (decoded once per call)
    step_states = None if legacy else states  # the steps too, keyed by the history (prefix_states.py)
    history = _key(states, ids, mask, positions)  # the batch's prompts name the groups they prefill in, too
    logits, past = _prefill(model, ids, mask, positions, states, legacy)
    cache_kwarg = _cache_kwarg_name(model)
    can_drop = not legacy and hasattr(past, "batch_select_indices")
    rows = list(range(batch))  # the prompt row of each row of the decoding batch
    next_positions = positions[:, -1:] + 1
    for step in range(max_new_tokens):
        next_ids = logits.argmax(-1)
        decoding = []  # rows of the decoding batch that go on
        for r, tok in enumerate(next_ids.tolist()):
            row = rows[r]
            if done[row]:  # a finished row riding along (always with legacy)
                continue
            if tok in eos_ids:
                done[row] = True
                continue
            generated[row].append(tok)
            if stop_at_newline:
                if tok not in is_newline:
                    is_newline[tok] = "\n" in tokenizer.decode([tok])
                if is_newline[tok]:
                    done[row] = True
                    continue
            decoding.append(r)
        if not decoding or step == max_new_tokens - 1:
            break
        if can_drop and len(decoding) < len(rows) and len(rows) > MIN_DECODING_ROWS:
            going_on = set(decoding)
            riding = [r for r in range(len(rows)) if r not in going_on][: max(0, MIN_DECODING_ROWS - len(decoding))]
            index = torch.tensor(sorted(decoding + riding), device=ids.device)
            past.batch_select_indices(index)
            mask, next_positions, next_ids = mask[index], next_positions[index], next_ids[index]
            rows = [rows[r] for r in index.tolist()]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        # the step's inputs and the batch's history so far name the prefix's work exactly
        history = _key(step_states, "step", history, torch.tensor(rows), next_ids, mask, next_positions)
        with _reuse(step_states, history, kv="append"):
            out = model(
                input_ids=next_ids.unsqueeze(-1), attention_mask=mask, position_ids=next_positions,
                use_cache=True, **{cache_kwarg: past},
            )
        past = _returned_cache(out)
        logits = out.logits[:, -1]
        next_positions = next_positions + 1
    return generated


# Prefill groups (_prefill_groups): a forward costs about this many prompt tokens on top of its
# tokens (reading the weights once more); and a group has at least this many rows: with 1-3 rows
# the CPU's GEMM takes a matrix-vector path (other rounding than the batch's, and slower per row).
PREFILL_FORWARD_TOKENS = 64
MIN_PREFILL_ROWS = 4


def _prefill_groups(lengths: Sequence[int]) -> list[list[int]]:
    """Rows of a left-padded prompt batch in groups of similar length, each prefilled by a forward
    of its own padded to its own longest prompt: the fewest padded tokens plus
    PREFILL_FORWARD_TOKENS per forward (exact, by dynamic programming over the rows sorted by
    length), groups of at least MIN_PREFILL_ROWS rows. Fact recall's batches of 64 prompts of 11 to
    44 tokens were half padding when prefilled as one."""
    order = sorted(range(len(lengths)), key=lambda r: (-lengths[r], r))
    n, big = len(order), float("inf")
    best, cut = [0.0] + [big] * n, [0] * (n + 1)  # best[j]: cost of the first j rows (longest first)
    for j in range(1, n + 1):
        for i in range(0, j - MIN_PREFILL_ROWS + 1) if j >= MIN_PREFILL_ROWS else ():
            cost = best[i] + (j - i) * lengths[order[i]] + PREFILL_FORWARD_TOKENS
            if cost < best[j]:
                best[j], cut[j] = cost, i
    if best[n] == big:  # fewer than MIN_PREFILL_ROWS rows
        return [order]
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


# models whose prefill cache cannot be stacked by rows (_mergeable): found on their first grouped
# prefill, then prefilled in one forward from the start instead of one group's forward and a redo
_UNSTACKABLE: weakref.WeakSet = weakref.WeakSet()


def _mergeable(cache) -> bool:
    """A cache of plain growing layers, whose keys/values can be padded and stacked by rows."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def _prefill(model, ids, mask, positions, states: EvalPrefixStates | None, legacy: bool, split: bool = True):
    """The prompt batch's next-token logits [B, V] and its KV cache, as one forward over the whole
    left-padded batch would give them.

    Rows are prefilled in groups of similar length (_prefill_groups), each padded only to its own
    longest prompt, and the groups' caches are then padded on the left with zeros to the batch's
    width and stacked in the batch's row order: the decoding steps see the batch's attention mask,
    which masks those columns (a masked column's weight is exactly 0, whatever its key and value),
    so they compute what they computed after one forward. A real token's states are a function of
    its own row's real tokens; a group's matrix products and attention have other shapes than the
    batch's, so its numbers can differ by float rounding: only the argmax is used, so a text changes
    only where two logits tie within rounding, as for rows leaving the decoding batch (the tests
    compare texts; fact recall on the quickstart run gave the same texts). Only the last column's logits
    are computed, gathered contiguously (see _greedy_decode). With kept prefix states each group's
    forward is kept and reused on its own (kv="keep"). One forward as before for ``legacy``, a
    batch that forms one group, and a model whose cache is not made of plain growing layers (found on
    its first grouped prefill and remembered).
    """
    split = split and not legacy and model not in _UNSTACKABLE
    groups = _prefill_groups(mask.sum(-1).tolist()) if split else [list(range(ids.shape[0]))]
    parts = []
    for group in groups:
        if len(groups) == 1:
            g_ids, g_mask, g_positions = ids, mask, positions
        else:
            index = torch.tensor(group, device=ids.device)
            width = int(mask[index].sum(-1).max())
            g_ids, g_mask, g_positions = ids[index, -width:], mask[index, -width:], positions[index, -width:]
        keep = 1 if legacy else torch.tensor([g_ids.shape[1] - 1], device=ids.device)
        # only the last column's logits are needed; the prompt's prefix states (and the prefix's
        # keys/values, which the decoding steps attend to) can be kept across points
        with _reuse(states, _key(states, g_ids, g_mask, g_positions), kv="keep"):
            try:
                out = model(input_ids=g_ids, attention_mask=g_mask, position_ids=g_positions, use_cache=True,
                            logits_to_keep=keep)
            except TypeError:
                out = model(input_ids=g_ids, attention_mask=g_mask, position_ids=g_positions, use_cache=True)
        cache = _returned_cache(out)
        if len(groups) > 1 and not _mergeable(cache):  # one forward over the whole batch instead, from now on
            _UNSTACKABLE.add(model)
            return _prefill(model, ids, mask, positions, states, legacy, split=False)
        parts.append((out.logits[:, -1], cache))
    if len(parts) == 1:
        return parts[0]
    inverse = torch.empty(ids.shape[0], dtype=torch.long)
    inverse[torch.tensor([r for g in groups for r in g])] = torch.arange(ids.shape[0])
    inverse = inverse.to(ids.device)
    logits = torch.cat([lg for lg, _ in parts])[inverse]
    width = ids.shape[1]
    past = parts[0][1]
    for i, layer in enumerate(past.layers):
        for name in ("keys", "values"):
            stacked = torch.cat([torch.nn.functional.pad(getattr(c.layers[i], name),
                                                         (0, 0, width - getattr(c.layers[i], name).shape[-2], 0))
                                 for _, c in parts])
            setattr(layer, name, stacked[inverse])
    return logits, past
