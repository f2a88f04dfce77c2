"""Frozen-prefix cache: skip the decoder layers below the lowest memory layer when a batch repeats.

SMF trains memory values only, so the decoder layers below the lowest memory layer compute
the same function at every step, and a training batch is repeated over consecutive steps
(``data.repeats_per_batch``). The hidden states entering the lowest memory layer are kept
for the last few batches; when one of them comes again, the layers below are skipped and
the kept states are fed in (docs/design.md §9). With the memory at layer 12 of 24 this removes
half of the transformer's forward; backward never reached those layers (nothing there
requires grad).

The skip works on any HF decoder whose model loops over ``decoder_layers(model)`` and passes
each layer's output (one tensor) to the next: the prefix layers' ``forward`` is swapped, for
the one call, for a pass-through, and the last one returns the kept states. Embedding,
attention mask and rotary embeddings are still computed (they are cheap). ``frozen_prefix``,
``keep_prefix_output`` and ``skip_prefix`` are that mechanism on its own; evaluation uses it
too (eval/prefix_states.py: every evaluation item's states, kept for the whole run).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from ..memory import memory_layers
from ..memory.retrofit import decoder_layers

log = logging.getLogger(__name__)


def _has_active_dropout(model: nn.Module, prefix: nn.ModuleList) -> bool:
    cfg = getattr(model, "config", None)
    if any(float(getattr(cfg, k, 0.0) or 0.0) > 0 for k in ("attention_dropout", "hidden_dropout", "dropout")):
        return True
    return any(isinstance(m, nn.Dropout) and m.p > 0 for layer in prefix for m in layer.modules())


def _pass_through(hidden_states, *args, **kwargs):
    return hidden_states


def frozen_prefix(model: nn.Module, *, with_embeddings: bool = False) -> tuple[int, list[nn.Module], str | None]:
    """(lowest memory layer L, decoder layers 0..L-1, why their output is not a fixed function
    of the input, or None). ``with_embeddings`` also requires the input embedding frozen (a
    cache kept across optimizer steps; within a step it cannot change)."""
    mems = memory_layers(model)
    first = min(mems) if mems else 0
    prefix = list(decoder_layers(model)[:first]) if mems else []
    if not prefix:
        return first, prefix, "no decoder layers below the lowest memory layer" if mems else "no memory layers"
    params = [p for layer in prefix for p in layer.parameters()]
    embed = model.get_input_embeddings() if with_embeddings and hasattr(model, "get_input_embeddings") else None
    if embed is not None:
        params += list(embed.parameters())
    if any(p.requires_grad for p in params):
        return first, prefix, f"parameters below memory layer {first} are trainable"
    return first, prefix, None


def layer_cache(kwargs: dict):
    """The KV cache a decoder layer was called with (transformers >= 5 calls it `cache`)."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


def attention_layer_idx(layer: nn.Module, default: int) -> int:
    """The index under which a decoder layer's attention stores its keys and values."""
    return int(getattr(getattr(layer, "self_attn", None), "layer_idx", default))


@contextlib.contextmanager
def keep_prefix_output(prefix: list[nn.Module], sink):
    """Within the block, every forward through the prefix calls ``sink(output, kwargs)`` with
    the states leaving its last layer (the input of the lowest memory layer) and the keyword
    arguments that layer got (its KV cache, filled by the prefix so far, among them)."""
    handle = prefix[-1].register_forward_hook(lambda module, args, kwargs, output: sink(output.detach(), kwargs),
                                              with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def skip_prefix(prefix: list[nn.Module], hidden: torch.Tensor, kv=None):
    """Within the block, a forward skips the prefix layers and feeds ``hidden`` to the layers
    above. With ``kv`` (``kv(i, hidden_states) -> (keys, values)`` for prefix layer i), each
    skipped layer still puts those into the forward's KV cache as its attention would have,
    so later forwards on that cache see the prefix's keys and values (greedy decoding) and
    the cache's length is right (masks are sized from layer 0's entry)."""
    def stand_in(i: int, last: bool):
        def forward(hidden_states, *args, **kwargs):
            cache = layer_cache(kwargs)
            if kv is not None and cache is not None:
                cache.update(*kv(i, hidden_states), attention_layer_idx(prefix[i], i))
            return hidden if last else hidden_states
        return forward

    for i, layer in enumerate(prefix):
        layer.forward = stand_in(i, i == len(prefix) - 1) if kv is not None or i == len(prefix) - 1 else _pass_through
    try:
        yield
    finally:
        for layer in prefix:
            del layer.forward  # back to the class's forward


class FrozenPrefixCache:
    """Hidden states entering the lowest memory layer, for the last ``capacity`` batches.

    ``enabled`` is False (and ``reuse`` does nothing) when there is no prefix (memory at
    layer 0), when a prefix parameter requires grad, or when the prefix has active dropout:
    in each case its output is not a fixed function of the batch.
    """

    def __init__(self, model: nn.Module, capacity: int = 4):
        self.capacity = int(capacity)
        self.entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.hits = self.misses = 0
        self.first, self.prefix, why_not = frozen_prefix(model)
        self.enabled = bool(self.prefix) and self.capacity > 0
        if self.enabled and why_not:
            self.enabled = False
            log.info("frozen-prefix cache off: %s", why_not)
        if self.enabled and _has_active_dropout(model, self.prefix):
            self.enabled = False
            log.info("frozen-prefix cache off: the layers below memory layer %d have active dropout", self.first)

    def _lookup(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        for k_ids, k_mask, hidden in self.entries:
            if k_ids.shape == ids.shape and torch.equal(k_ids, ids) and torch.equal(k_mask, mask):
                return hidden
        return None

    @contextlib.contextmanager
    def reuse(self, batch: dict):
        """Within the block, a forward on ``batch`` skips the prefix if its states are kept,
        and keeps them otherwise."""
        if not self.enabled:
            yield
            return
        ids, mask = batch["input_ids"], batch["attention_mask"]
        hidden = self._lookup(ids, mask)
        if hidden is None:
            self.misses += 1

            def keep(output, kwargs):
                self.entries = [(ids.detach().clone(), mask.detach().clone(), output), *self.entries][: self.capacity]

            with keep_prefix_output(self.prefix, keep):
                yield
            return
        self.hits += 1
        with skip_prefix(self.prefix, hidden):
            yield
