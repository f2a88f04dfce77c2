"""Sparse Memory Finetuning (Lin et al. 2025; KL selector: "Improving Sparse Memory Finetuning").

Each optimizer step: count the slots every memory layer read for the batch (padding
excluded; by default only loss-carrying tokens), score them against the background
statistics with the configured selector, keep the top-t per layer, and let the sparse
optimizer move exactly those value rows. Every other weight is frozen, so the model's
non-memory parameters stay bit-identical (tested).
"""

from __future__ import annotations

import torch

from ..memory import freeze_all_but_values, memory_layers
from ..optim import SlotAdam, SlotSGD
from ..selection.selectors import loss_position_mask, select_slots, slot_counts
from .base import ContinualLM
from .prefix_cache import FrozenPrefixCache


class SparseMemoryFinetune(ContinualLM):
    method_name = "smf"

    def __init__(self, model, method_cfg: dict, background: dict | None = None, seed: int = 0):
        freeze_all_but_values(model)
        super().__init__(model, method_cfg)
        self.memories = memory_layers(model)
        if not self.memories:
            raise ValueError("SMF needs a retrofitted model (memory layers); set method.retrofit=true.")
        self.background = background or {}
        self.selector = self.mcfg["selector"]
        self.top_t = None if self.selector == "all" else int(self.mcfg["top_t"])
        self.loss_tokens_only = bool(self.mcfg.get("loss_tokens_only", True))
        self._generator = torch.Generator().manual_seed(seed)  # random selector only
        self._counts: dict[int, torch.Tensor] = {}
        self.last_selection: dict[int, torch.Tensor] = {}
        self.last_counts: dict[int, torch.Tensor] = {}
        self.prefix_cache = FrozenPrefixCache(model, capacity=int(self.mcfg.get("prefix_cache", 0) or 0))

    def lm_loss(self, batch: dict) -> torch.Tensor:
        with self.prefix_cache.reuse(batch):
            return super().lm_loss(batch)

    def configure_optimizers(self):
        values = [m.values.weight for m in self.memories.values()]
        clip = self.mcfg.get("grad_clip")
        clip = float(clip) if clip else None
        if self.mcfg["optimizer"] == "sgd":
            return SlotSGD(values, lr=float(self.mcfg["lr"]), weight_decay=float(self.mcfg.get("weight_decay", 0.0)), max_grad_norm=clip)
        return SlotAdam(
            values,
            lr=float(self.mcfg["lr"]),
            betas=tuple(self.mcfg.get("betas", (0.9, 0.999))),
            eps=float(self.mcfg.get("eps", 1e-8)),
            weight_decay=float(self.mcfg.get("weight_decay", 0.0)),
            max_grad_norm=clip,
        )

    def on_accumulation_start(self) -> None:
        self._counts = {i: torch.zeros(m.n_slots, dtype=torch.long) for i, m in self.memories.items()}

    def after_backward(self, batch: dict) -> None:
        # Selection for the step uses the slot counts summed over its micro-batches.
        mask = loss_position_mask(batch["labels"]) if self.loss_tokens_only else None
        for i, mem in self.memories.items():
            ids = mem.last_access.slot_ids(mask).cpu()
            self._counts[i] += slot_counts(ids, mem.n_slots)

    def take_optimizer_step(self, opt) -> int:
        selection = {}
        for i, mem in self.memories.items():
            sel = select_slots(self._counts[i], self.selector, self.top_t, bg=self.background.get(i), generator=self._generator)
            self.last_selection[i] = sel
            selection[mem.values.weight] = sel.to(mem.values.weight.device)
        self.last_counts = self._counts
        opt.optimizer.set_selection(selection)
        opt.step()
        return sum(int(s.numel()) * m.v_dim for s, m in zip(self.last_selection.values(), self.memories.values()))
