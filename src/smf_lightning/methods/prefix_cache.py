"""Frozen-prefix cache: skip the decoder layers below the lowest memory layer when a batch repeats.

SMF trains memory values only, so the decoder layers below the lowest memory layer compute
the same function at every step, and a training batch is repeated over consecutive steps
(``data.repeats_per_batch``). The hidden states entering the lowest memory layer are kept
for the last few batches; when one of them comes again, the layers below are skipped and
the kept states are fed in (design.md §9). With the memory at layer 12 of 24 this removes
half of the transformer's forward; backward never reached those layers (nothing there
requires grad).

The skip works on any HF decoder whose model loops over ``decoder_layers(model)`` and passes
each layer's output (one tensor) to the next: the prefix layers' ``forward`` is swapped, for
the one call, for a pass-through, and the last one returns the kept states. Embedding,
attention mask and rotary embeddings are still computed (they are cheap).
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
        mems = memory_layers(model)
        self.first = min(mems) if mems else 0
        layers = decoder_layers(model) if mems else nn.ModuleList()
        self.prefix = list(layers[: self.first])
        self.enabled = bool(self.prefix) and self.capacity > 0
        if self.enabled and any(p.requires_grad for layer in self.prefix for p in layer.parameters()):
            self.enabled = False
            log.info("frozen-prefix cache off: parameters below memory layer %d are trainable", self.first)
        if self.enabled and _has_active_dropout(model, layers[: self.first]):
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
        last = self.prefix[-1]
        if hidden is None:
            self.misses += 1

            def keep(module, args, output):
                self.entries = [(ids.detach().clone(), mask.detach().clone(), output.detach()), *self.entries][: self.capacity]

            handle = last.register_forward_hook(keep)
            try:
                yield
            finally:
                handle.remove()
            return
        self.hits += 1
        for layer in self.prefix[:-1]:
            layer.forward = _pass_through
        last.forward = lambda hidden_states, *args, **kwargs: hidden
        try:
            yield
        finally:
            for layer in self.prefix:
                del layer.forward  # back to the class's forward
