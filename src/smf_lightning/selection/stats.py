"""Slot statistics per optimizer step and memory layer, as plain floats for loggers.

docs/design.md §7 ("slot statistics per step and layer"): accessed slots, selected slots,
KL(p_batch ‖ p_bg), overlap of this step's selection with the slots selected for earlier
tasks, and hub concentration (share of accesses taken by the top 1% of slots). The
design's probe found ~10% of background accesses on the top 1% of slots (§9): hub slots
are where updates for unrelated facts collide.

:func:`slot_usage_stats` describes how evenly a model's slots are read on some text (the
effect of k-means keys, memory/key_init.py, and of healing, stages/heal.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .background import BackgroundStats, compute_background_stats
from .selectors import KLSelector, _check_background


def hub_share(counts: torch.Tensor, top_frac: float = 0.01) -> float:
    """Share of all accesses taken by the ``ceil(top_frac·N)`` most-accessed slots (0 if none)."""
    if not 0 < top_frac <= 1:
        raise ValueError(f"top_frac={top_frac} must be in (0, 1], e.g. 0.01 for the top 1% of slots.")
    total = int(counts.sum())
    if total == 0:
        return 0.0
    k = max(1, math.ceil(top_frac * counts.numel()))
    return float(torch.topk(counts, k).values.sum()) / total


def kl_batch_background(counts: torch.Tensor, bg: BackgroundStats) -> float:
    """KL(p_batch ‖ p_bg) in nats, with the add-one smoothed background of the ``kl`` selector."""
    _check_background(KLSelector, counts, bg)
    candidates = torch.nonzero(counts > 0).squeeze(1)
    if candidates.numel() == 0:
        return 0.0
    return float(KLSelector().score(counts, candidates, bg).sum())


class SlotHistory:
    """Slots selected per memory layer, split into the current task and all earlier tasks.

    Call :meth:`record` with each step's selection and :meth:`end_task` when a task ends;
    :meth:`overlap` then compares a step's selection with the union over earlier tasks.
    """

    def __init__(self) -> None:
        self._earlier: dict[int, torch.Tensor] = {}  # layer -> bool[N]
        self._current: dict[int, torch.Tensor] = {}
        self.tasks_ended = 0

    @staticmethod
    def _mark(store: dict[int, torch.Tensor], layer: int, ids: torch.Tensor, n_slots: int) -> None:
        if layer not in store:
            store[layer] = torch.zeros(n_slots, dtype=torch.bool)
        store[layer][ids.cpu()] = True

    def record(self, layer: int, selected: torch.Tensor, n_slots: int) -> None:
        """Add this step's selected slot ids of ``layer`` to the current task."""
        self._mark(self._current, layer, selected, n_slots)

    def end_task(self) -> None:
        """Fold the current task's selected slots into the earlier-tasks union."""
        for layer, mask in self._current.items():
            if layer in self._earlier:
                self._earlier[layer] |= mask
            else:
                self._earlier[layer] = mask.clone()
        self._current = {}
        self.tasks_ended += 1

    def state_dict(self) -> dict:
        """Plain, checkpointable state: selected slot ids (sorted LongTensors) per layer."""
        ids = lambda store: {layer: torch.nonzero(m).squeeze(1) for layer, m in store.items()}  # noqa: E731
        n_slots = {layer: m.numel() for store in (self._earlier, self._current) for layer, m in store.items()}
        return {"earlier": ids(self._earlier), "current": ids(self._current), "n_slots": n_slots,
                "tasks_ended": self.tasks_ended}

    def load_state_dict(self, state: dict) -> None:
        self._earlier, self._current = {}, {}
        for key, store in (("earlier", self._earlier), ("current", self._current)):
            for layer, ids in state[key].items():
                self._mark(store, int(layer), torch.as_tensor(ids, dtype=torch.long), int(state["n_slots"][layer]))
        self.tasks_ended = int(state["tasks_ended"])

    def earlier(self, layer: int) -> torch.Tensor:
        """Sorted slot ids selected for any earlier (ended) task of ``layer``."""
        mask = self._earlier.get(layer)
        return torch.zeros(0, dtype=torch.long) if mask is None else torch.nonzero(mask).squeeze(1)

    def overlap(self, layer: int, selected: torch.Tensor) -> dict[str, float]:
        """``jaccard_earlier`` = |S∩E|/|S∪E| and ``overlap_earlier`` = |S∩E|/|S| (share of this
        step's slots already trained for earlier tasks); both 0 when the denominator is 0."""
        ids = torch.unique(selected.cpu())
        mask = self._earlier.get(layer)
        n_earlier = 0 if mask is None else int(mask.sum())
        inter = 0 if mask is None or ids.numel() == 0 else int(mask[ids].sum())
        union = ids.numel() + n_earlier - inter
        return {
            "jaccard_earlier": inter / union if union else 0.0,
            "overlap_earlier": inter / ids.numel() if ids.numel() else 0.0,
        }


def slot_step_stats(
    counts: torch.Tensor,
    selected: torch.Tensor,
    *,
    bg: BackgroundStats | None = None,
    history: SlotHistory | None = None,
    layer: int | None = None,
    top_frac: float = 0.01,
) -> dict[str, float]:
    """One step's statistics for one memory layer (docs/design.md §7); plain floats.

    Keys: ``accessed_slots``, ``selected_slots``, ``accesses`` (token×head×knn reads),
    ``hub_share_batch``; with ``bg``: ``kl_batch_bg``, ``hub_share_bg``; with ``history``
    (and ``layer``): ``jaccard_earlier``, ``overlap_earlier``. Does not record ``selected``
    into the history — call ``history.record`` for that.
    """
    out = {
        "accessed_slots": float(int((counts > 0).sum())),
        "selected_slots": float(selected.numel()),
        "accesses": float(int(counts.sum())),
        "hub_share_batch": hub_share(counts, top_frac),
    }
    if bg is not None:
        out["kl_batch_bg"] = kl_batch_background(counts, bg)
        out["hub_share_bg"] = hub_share(bg.bg_count, top_frac)
    if history is not None:
        if layer is None:
            raise ValueError("slot_step_stats(history=...) needs layer=<decoder layer index> to look up earlier tasks.")
        out.update(history.overlap(layer, selected))
    return out


def background_summary(bg: BackgroundStats, top_frac: float = 0.01) -> dict[str, float]:
    """Once-per-run description of a layer's background: batches, accesses, share of slots
    ever touched, hub share of the top ``top_frac`` slots."""
    return {
        "n_bg": float(bg.n_bg),
        "accesses": float(int(bg.bg_count.sum())),
        "touched_share": float(int((bg.bg_count > 0).sum())) / bg.n_slots,
        "hub_share_bg": hub_share(bg.bg_count, top_frac),
    }


def slot_usage_stats(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    top_frac: float = 0.01,
    progress: bool = False,
) -> dict[int, dict[str, float]]:
    """How evenly each memory layer's slots are read over ``batches`` (padding excluded).

    Per layer: ``touched_share`` (share of the N slots read at least once),
    ``hub_share_top1pct`` (share of reads taken by the top ``top_frac`` slots; 1% by
    default — the design's hub measure), ``effective_slots_share`` (exp(entropy of the read
    distribution) / N: 1.0 = perfectly even use), ``accesses`` and ``n_batches``.
    (Formerly ``smf_lightning.memory.key_init.slot_usage_stats``: memory does not import selection.)
    """
    stats = compute_background_stats(model, batches, loss_tokens_only=False, progress=progress)
    out = {}
    for layer_idx, bg in stats.items():
        summary = background_summary(bg, top_frac)
        counts = bg.bg_count.double()
        p = counts[counts > 0] / counts.sum() if counts.sum() > 0 else counts[:0]
        entropy = float(-(p * p.log()).sum()) if p.numel() else 0.0
        out[layer_idx] = {
            "touched_share": summary["touched_share"],
            "hub_share_top1pct": summary["hub_share_bg"],
            "effective_slots_share": math.exp(entropy) / bg.n_slots if p.numel() else 0.0,
            "accesses": summary["accesses"],
            "n_batches": summary["n_bg"],
        }
    return out
