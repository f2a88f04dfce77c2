"""Which memory slots a batch may update: slot counts, scores and top-t selection.

docs/design.md §4. For one memory layer and one optimizer step let ``c`` be the batch's slot
access counts (non-padding tokens, optionally only the tokens that carry loss). Only slots
with ``c > 0`` are candidates; the ``top_t`` best by score are selected:

- ``kl`` (the seed paper, "Improving Sparse Memory Finetuning"):
  ``p = c/Σc``, ``p_bg = (bg_count+1)/Σ(bg_count+1)``, score ``p·log(p/p_bg)`` — slot i's term
  of KL(p ‖ p_bg), so slots the batch uses far more than the background corpus win.
- ``tfidf`` (Lin et al. 2025, "Continual Learning via Sparse Memory Finetuning"):
  ``(c/Σc)·log((n_bg+1)/(df+1))`` — frequent in the batch, touched by few background batches.
- ``tf``: ``c/Σc`` (no background; ablation).
- ``random``: ``top_t`` slots uniformly among the accessed ones (same budget; ablation).
- ``all``: every accessed slot, no budget (ablation: dense-within-batch updates).

Ties are broken towards the **lower slot id** (a stable sort over candidates in ascending id
order), so a selection is a pure function of (counts, background, selector, top_t) and runs
are reproducible. Scores are computed in float64 so that equal inputs give exactly equal
scores (e.g. two slots with the same count and the same background statistics tie exactly).

Everything here is a pure function of tensors; nothing reads a model.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import torch

from ..memory.positions import loss_position_mask  # noqa: F401  (moved to memory/positions.py; re-exported)

if TYPE_CHECKING:  # imported only for annotations: background.py imports this module's names
    from .background import BackgroundStats

class Selector:
    """A slot selector (docs/extending.md "A selector"): given one step's slot counts, which of the
    accessed slots may be updated. Subclass it, set ``name`` and implement ``score`` (higher wins;
    the top ``top_t`` are kept, ties to the lower slot id) or override ``pick`` for a rule that is
    not a ranking; then ``register_selector`` it, or name its class by dotted path in
    ``method.selector``. What it declares:

    - ``needs_background``: it reads the background statistics (the run computes them first;
      ``method.exclude_hubs`` needs such a selector);
    - ``has_budget``: it keeps at most ``top_t`` slots (``method.top_t``); ``all`` has none.
    """

    name: ClassVar[str] = ""
    needs_background: ClassVar[bool] = False
    has_budget: ClassVar[bool] = True

    @classmethod
    def scored(cls) -> bool:
        """Whether it ranks slots by a per-slot score (``score`` implemented)."""
        return cls.score is not Selector.score

    def score(self, counts: torch.Tensor, candidates: torch.Tensor, bg: BackgroundStats | None) -> torch.Tensor:
        """float64 scores of ``candidates`` (ascending accessed slot ids) from ``counts`` [N]."""
        raise NotImplementedError

    def pick(self, counts: torch.Tensor, candidates: torch.Tensor, top_t: int, bg: BackgroundStats | None,
             generator: torch.Generator | None) -> torch.Tensor:
        """The kept slots (sorted ids) when there are more candidates than ``top_t``."""
        scores = self.score(counts, candidates, bg)
        # Stable descending sort over ascending ids: equal scores keep the lower slot id first.
        order = torch.sort(scores, descending=True, stable=True).indices[:top_t]
        return candidates[order].sort().values


def _batch_share(counts: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    return counts[candidates].to(torch.float64) / counts.sum().to(torch.float64)


class KLSelector(Selector):
    """The seed paper: slot i's term of KL(p || p_bg), p_bg add-one smoothed so that slots never
    seen in the background have finite (large) scores."""

    name = "kl"
    needs_background = True

    def score(self, counts, candidates, bg):
        p = _batch_share(counts, candidates)
        bg_count = bg.bg_count.to(counts.device)
        bg_total = bg_count.sum().to(torch.float64) + bg_count.numel()  # Σ (bg_count + 1)
        p_bg = (bg_count[candidates].to(torch.float64) + 1.0) / bg_total
        return p * torch.log(p / p_bg)


class TFIDFSelector(Selector):
    """Lin et al. 2025: idf = log((n_bg + 1) / (df + 1)); a slot no background batch touched gets
    the largest idf, log(n_bg + 1)."""

    name = "tfidf"
    needs_background = True

    def score(self, counts, candidates, bg):
        df = bg.df.to(counts.device)[candidates].to(torch.float64)
        return _batch_share(counts, candidates) * torch.log((bg.n_bg + 1.0) / (df + 1.0))


class TFSelector(Selector):
    """The batch's share of reads alone (no background; ablation)."""

    name = "tf"

    def score(self, counts, candidates, bg):
        return _batch_share(counts, candidates)


class RandomSelector(Selector):
    """``top_t`` accessed slots drawn uniformly (same budget; ablation)."""

    name = "random"

    def pick(self, counts, candidates, top_t, bg, generator):
        chosen = torch.randperm(candidates.numel(), generator=generator, device="cpu")[:top_t]
        return candidates[chosen.to(candidates.device)].sort().values


class AllSelector(Selector):
    """Every accessed slot, no budget (ablation: dense-within-batch updates)."""

    name = "all"
    has_budget = False

    def pick(self, counts, candidates, top_t, bg, generator):
        return candidates


SELECTORS: dict[str, type[Selector]] = {}


def register_selector(cls: type[Selector]) -> type[Selector]:
    """Make ``cls`` selectable as ``method.selector=<cls.name>`` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Selector) and cls.name):
        raise ValueError(f"{cls!r} is not a Selector subclass with a name")
    SELECTORS[cls.name] = cls
    return cls


for _builtin in (KLSelector, TFIDFSelector, TFSelector, RandomSelector, AllSelector):
    register_selector(_builtin)
SCORED_SELECTORS = tuple(n for n, c in SELECTORS.items() if c.scored())  # the built-ins that rank by a score
BACKGROUND_SELECTORS = tuple(n for n, c in SELECTORS.items() if c.needs_background)  # ... that need background statistics


def selector_class(selector: str | type[Selector]) -> type[Selector]:
    """The selector a name stands for: a registered name, or the dotted path of a Selector class."""
    if isinstance(selector, type) and issubclass(selector, Selector):
        return selector
    if selector in SELECTORS:
        return SELECTORS[selector]
    if isinstance(selector, str) and "." in selector:
        import importlib

        module, _, attr = selector.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"slot selector {selector!r} cannot be imported: {e}") from None
        if isinstance(cls, type) and issubclass(cls, Selector):
            return cls
        raise ValueError(f"slot selector {selector!r} is not a smf_lightning.selection.Selector subclass.")
    raise ValueError(f"unknown slot selector {selector!r}; allowed: {', '.join(SELECTORS)}, or the dotted path of a "
                     f"Selector class of your own.")


def slot_counts(slot_ids: torch.Tensor, n_slots: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Access count per slot: LongTensor[n_slots] from flat slot ids (with multiplicity).

    ``slot_ids`` is what ``SlotAccess.slot_ids(mask)`` returns: one id per counted token ×
    head × knn. Ids outside ``[0, n_slots)`` are a wiring bug (wrong layer / N) and raise.
    With ``weights`` (the reads' softmax weights, same shape), the *read mass* per slot
    instead (float64): a slot counts by how much of each read it carries (method.count_by).
    """
    ids = slot_ids.reshape(-1)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n_slots):
        raise ValueError(
            f"slot ids span [{int(ids.min())}, {int(ids.max())}] but n_slots={n_slots}; pass the "
            f"n_slots of the memory layer these ids came from."
        )
    if weights is not None:
        return torch.bincount(ids.long(), weights=weights.reshape(-1).double(), minlength=n_slots)
    return torch.bincount(ids.long(), minlength=n_slots)


def _check_background(selector: type[Selector], counts: torch.Tensor, bg: BackgroundStats | None) -> None:
    if not selector.needs_background:
        return
    if bg is None:
        raise ValueError(
            f"selector {selector.name!r} needs background statistics (bg=...); compute them with "
            f"smf_lightning.selection.load_or_compute_background_stats, or use selector 'tf'."
        )
    if bg.bg_count.numel() != counts.numel() or bg.df.numel() != counts.numel():
        raise ValueError(
            f"background statistics cover {bg.bg_count.numel()} slots but the counts cover "
            f"{counts.numel()}; they must come from the same memory layer (same n_slots)."
        )
    if bg.n_bg < 1:
        raise ValueError("background statistics hold n_bg=0 batches; the background corpus was empty.")


def score_slots(counts: torch.Tensor, selector: str, bg: BackgroundStats | None = None) -> torch.Tensor:
    """Per-slot score (float64 [N]) for a scored selector (``kl``, ``tfidf``, ``tf``).

    Slots with ``c = 0`` score exactly 0 for every selector (their ``p`` is 0); callers
    that rank must restrict to ``c > 0`` as :func:`select_slots` does. The ``kl`` scores
    summed over all slots are KL(p_batch ‖ p_bg) with the add-one smoothed background.
    ``random`` and ``all`` have no score and raise.
    """
    cls = selector_class(selector)
    if not cls.scored():
        raise ValueError(
            f"selector {selector!r} does not rank slots by a score; scored selectors: "
            f"{', '.join(n for n, c in SELECTORS.items() if c.scored())}."
        )
    if counts.dim() != 1:
        raise ValueError(f"counts must be a 1-D tensor [n_slots], got shape {tuple(counts.shape)}.")
    _check_background(cls, counts, bg)
    candidates = torch.nonzero(counts > 0).squeeze(1)
    scores = torch.zeros(counts.shape, dtype=torch.float64, device=counts.device)
    scores[candidates] = cls().score(counts, candidates, bg)
    return scores


def select_slots(
    counts: torch.Tensor,
    selector: str,
    top_t: int | None,
    bg: BackgroundStats | None = None,
    generator: torch.Generator | None = None,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """The slots this step may update: sorted LongTensor of slot ids (docs/design.md §4).

    Args:
        counts: LongTensor[N], the batch's access counts (see :func:`slot_counts`); under
            gradient accumulation pass the sum over the accumulated micro-batches.
        selector: a registered name (``kl``, ``tfidf``, ``tf``, ``random``, ``all``, or one added
            with :func:`register_selector`), a Selector class's dotted path, or the class.
        top_t: the slot budget (int >= 1). Ignored by ``all`` (may be None there). A budget
            larger than the number of accessed slots selects every accessed slot.
        bg: this layer's :class:`BackgroundStats`; required by ``kl`` and ``tfidf``.
        generator: RNG for ``random`` (seed it for reproducible runs; None = torch's global RNG).
        exclude: BoolTensor[N], slots that may never be selected (hub slots, slots owned by
            earlier tasks: :func:`hub_slots`, DOTS); scores of the rest are unchanged.

    Only accessed slots (``c > 0``) are ever selected. Ties in score go to the lower slot id.
    """
    cls = selector_class(selector)
    if counts.dim() != 1:
        raise ValueError(f"counts must be a 1-D tensor [n_slots], got shape {tuple(counts.shape)}.")
    if cls.has_budget:
        if top_t is None or isinstance(top_t, bool) or int(top_t) != top_t or top_t < 1:
            raise ValueError(
                f"slot budget top_t={top_t!r} is invalid for selector {selector!r}; give an integer "
                f">= 1 (e.g. method.top_t=500), or use selector 'all' for no budget."
            )
        top_t = int(top_t)
    _check_background(cls, counts, bg)

    allowed = counts > 0
    if exclude is not None:
        allowed &= ~exclude.to(allowed.device)
    candidates = torch.nonzero(allowed).squeeze(1)  # ascending slot ids
    if cls.has_budget and candidates.numel() <= top_t:
        return candidates
    return cls().pick(counts, candidates, top_t, bg, generator)


def hub_count(fraction: float, n_slots: int) -> int:
    """How many slots ``exclude_hubs=fraction`` excludes: ceil(fraction * N)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"hub fraction {fraction!r} must be in [0, 1): the share of slots excluded as hubs.")
    return math.ceil(fraction * n_slots)


def hub_slots(bg: BackgroundStats, fraction: float) -> torch.Tensor:
    """BoolTensor[N]: the ``ceil(fraction * N)`` slots the background corpus reads most (ties to
    the lower id). DOTS excludes them from selection: a hub slot is read by general text, so
    writing a fact into it changes the model everywhere (their ablation: known facts kept 87%
    without, 98-99% with hub protection)."""
    n = bg.bg_count.numel()
    k = hub_count(fraction, n)
    mask = torch.zeros(n, dtype=torch.bool)
    if k:
        order = torch.sort(bg.bg_count.cpu(), descending=True, stable=True).indices[:k]
        mask[order] = True
    return mask
