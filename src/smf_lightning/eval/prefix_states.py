"""Frozen-prefix states of the evaluation items, kept for the whole run (docs/design.md §9).

SMF trains memory values only, so the embedding and the decoder layers below the lowest
memory layer L compute the same function at every evaluation point, and every point scores
the same items in the same batches (eval/scoring.py forms its batches from the items alone).
The states entering layer L are therefore kept, per forward, from the first point on and fed
in at later points, skipping layers 0..L-1 with the training cache's mechanism
(methods/prefix_cache.py). The layers above receive the same tensors as without the cache,
so every number is the same to the last bit (tests/test_eval_prefix.py).

What is kept, keyed by a forward's exact inputs (token ids, attention mask, position ids; for
a forward that continues a KV cache, also the key of the forward that made it and the rows
taken from it):
- the states leaving layer L-1, [rows, columns, hidden];
- for a prompt that greedy decoding continues, also the keys and values the layers below L
  put into the KV cache: the decoding steps attend to them;
- for a greedy decoding step, the states of its new tokens and the keys and values the layers
  below L append for them, keyed by the step's inputs and the key of the step (or prompt)
  before it, so by the whole history of the batch: a later point whose batch generated the same
  tokens so far (SMF leaves most answers as they were) skips the layers below L for that step
  too. Where a row's token differs, that step and the ones after it run in full, and their new
  states are kept for the point after.

About (hidden + 2 * kv_heads * head_dim * L) * 4 bytes per greedy prompt token (18.5 KB on
Qwen2.5-0.5B with the memory at layer 15) and hidden * 4 bytes per scored token (3.5 KB):
118 MB for the four suites at 24 items (GSM8K 12) plus 24 facts under 5 templates
(experiments/tools/bench_eval.py), so about 1 GB at 200 items and 200 facts, half of it recall's
prompts; a decoding step keeps as much per row as a greedy prompt token. A forward whose batch does not come again is dropped at the end of the next run of its
scope (fact recall over a grown set of tasks forms new batches).

Only where nothing below L can change: ``active`` checks that no parameter of the prefix or of
the input embedding requires grad (SMF; LoRA and full finetuning train them and keep today's
path), and clears what it kept if any of those parameters was replaced or modified in place
since (tensor version counters), so a cache can never serve stale states.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..methods.prefix_cache import attention_layer_idx, frozen_prefix, keep_prefix_output, layer_cache, skip_prefix

log = logging.getLogger(__name__)

_ACTIVE: dict[int, EvalPrefixStates] = {}  # id(model) -> the states serving its forwards now


def active_states(model) -> EvalPrefixStates | None:
    """The prefix states serving `model`'s evaluation forwards (inside EvalPrefixStates.active)."""
    return _ACTIVE.get(id(model)) if _ACTIVE else None


def prefix_key(*parts) -> tuple:
    """An exact, hashable key of a forward's inputs (tensors by shape, dtype and bytes)."""
    out = []
    for p in parts:
        if isinstance(p, torch.Tensor):
            t = p.detach().cpu().contiguous()
            out.append((tuple(t.shape), str(t.dtype), t.numpy().tobytes()))
        else:
            out.append(p)
    return tuple(out)


@dataclass
class _Entry:
    hidden: torch.Tensor  # states leaving layer L-1
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None  # per prefix layer: cached (keys, values), if kept
    scope: str | None  # the scope that last used it
    session: int  # the scope run that last used it

    @property
    def nbytes(self) -> int:
        tensors = [self.hidden, *(t for pair in self.kv or () for t in pair)]
        return sum(t.numel() * t.element_size() for t in tensors)


def _supports_kv(cache, layer_ids: list[int]) -> bool:
    """Whether the prefix's cache entries are plain growing ones (a sliding-window or static
    layer keeps a transformed view, which could not be put back as it was)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return layers is not None and all(
        i < len(layers) and type(layers[i]) is DynamicLayer and layers[i].is_initialized for i in layer_ids)


class EvalPrefixStates:
    """Prefix states of evaluation forwards, kept across evaluation points; see the module doc."""

    def __init__(self):
        self.entries: dict[tuple, _Entry] = {}
        self.hits = self.misses = 0  # forwards over prompts and scored sequences
        self.step_hits = self.step_misses = 0  # greedy decoding steps (kv="append")
        self._signature: tuple | None = None
        self._prefix: list[nn.Module] = []
        self._layer_ids: list[int] = []
        self._kv_shape: tuple[int, int] = (0, 0)  # (kv heads, head dim)
        self._scope: str | None = None
        self._session = 0
        self._why_not_logged: str | None = None

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    @contextlib.contextmanager
    def active(self, model: nn.Module):
        """Within the block, eval/scoring.py's forwards on `model` reuse and keep prefix states;
        where the prefix is not frozen it does nothing (and says why, once)."""
        first, prefix, why_not = frozen_prefix(model, with_embeddings=True)
        if why_not:
            if why_not != self._why_not_logged:
                log.info("evaluation prefix cache off: %s", why_not)
                self._why_not_logged = why_not
            yield
            return
        signature = self._fingerprint(model, prefix)
        if signature != self._signature:
            if self.entries:
                log.warning("evaluation prefix cache cleared: the model or its layers below memory layer %d changed", first)
            self.entries.clear()
            self._signature = signature
        self._prefix = prefix
        self._layer_ids = [attention_layer_idx(layer, i) for i, layer in enumerate(prefix)]
        cfg = model.config
        heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        self._kv_shape = (heads, int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads))
        _ACTIVE[id(model)] = self
        try:
            yield
        finally:
            _ACTIVE.pop(id(model), None)

    @staticmethod
    def _fingerprint(model: nn.Module, prefix: list[nn.Module]) -> tuple:
        # A parameter replaced (new tensor), moved (new storage) or written in place (version
        # counter) changes this; reading it costs nothing, unlike hashing 360M weights.
        params = [p for layer in prefix for p in layer.parameters()]
        params += list(model.get_input_embeddings().parameters())
        params += [b for layer in prefix for b in layer.buffers()]
        return (id(model), len(prefix), *((id(p), p.data_ptr(), p._version, p.dtype, p.device) for p in params))

    @contextlib.contextmanager
    def scope(self, name: str):
        """Forwards within the block belong to `name`; at its end, the kept forwards of `name`
        that did not come again in it are dropped (their batches are gone for good)."""
        self._session += 1
        session, outer = self._session, self._scope
        self._scope = name
        try:
            yield
        finally:
            self._scope = outer
        for key in [k for k, e in self.entries.items() if e.scope == name and e.session != session]:
            del self.entries[key]

    def has(self, key: tuple, kv: bool = False) -> bool:
        entry = self.entries.get(key)
        return entry is not None and (entry.kv is not None or not kv)

    @contextlib.contextmanager
    def forward(self, key: tuple, *, kv: str | None = None, reuse: bool = True):
        """Within the block, the model's forward on the inputs `key` names skips the prefix if
        its states are kept, and keeps them otherwise (with `reuse=False`: recomputes them).

        kv: None   - the forward's KV cache (if any) is not used for the prefix layers later;
            "keep" - it is (greedy decoding): the prefix's keys and values are kept with the
                     states and put back into the cache on a hit;
            "append" - a decoding step on a KV cache the key's history has filled: the keys and
                     values the prefix appends for the step's new tokens are kept and appended
                     again on a hit (counted in step_hits / step_misses);
            "placeholder" - on a hit the prefix's cache entries are zeros of the right size:
                     only for a cache whose later forwards all skip the prefix (score_choices
                     checks that every one of them is kept), so the entries only set its length.
        """
        entry = self.entries.get(key) if reuse else None
        step = kv == "append"
        if entry is not None and (kv not in ("keep", "append") or entry.kv is not None):
            if step:
                self.step_hits += 1
            else:
                self.hits += 1
            entry.scope, entry.session = self._scope, self._session
            with skip_prefix(self._prefix, entry.hidden, self._kv_source(entry, kv)):
                yield
            return
        if step:
            self.step_misses += 1
        else:
            self.misses += 1
        kept: list[_Entry] = []

        def keep(output, kwargs):
            pairs = None
            if kv in ("keep", "append"):
                cache = layer_cache(kwargs)
                if not _supports_kv(cache, self._layer_ids):
                    return  # not kept: a later forward recomputes it
                new = output.shape[1]
                pairs = [(cache.layers[i].keys, cache.layers[i].values) for i in self._layer_ids]
                if kv == "keep" and any(k.shape[-2] != new for k, _ in pairs):
                    return  # the cache held earlier tokens: not a fresh prompt
                if step:  # only the columns this step appended (copies: the cache's tensors are replaced as it grows)
                    pairs = [(k[..., -new:, :].clone(), v[..., -new:, :].clone()) for k, v in pairs]
            kept.append(_Entry(output, pairs, self._scope, self._session))

        with keep_prefix_output(self._prefix, keep):
            yield
        if len(kept) == 1:  # exactly one forward ran in the block
            self.entries[key] = kept[0]

    def _kv_source(self, entry: _Entry, kv: str | None):
        if kv in ("keep", "append"):  # a hit puts them into the forward's cache as the layer would have
            return lambda i, hidden_states: entry.kv[i]
        if kv == "placeholder":
            heads, dim = self._kv_shape

            def zeros(i, hidden_states):
                z = hidden_states.new_zeros(()).expand(hidden_states.shape[0], heads, hidden_states.shape[1], dim)
                return z, z
            return zeros
        return None
