"""Slot selection for sparse memory finetuning: background statistics, selectors, statistics.

docs/design.md §3 (background statistics), §4 (selectors), §7 (slot statistics).
"""

from .background import (
    BackgroundStats,
    background_cache_key,
    compute_background_stats,
    fingerprint_model,
    load_background_stats,
    load_or_compute_background_stats,
    save_background_stats,
)
from .selectors import (
    BACKGROUND_SELECTORS,
    SCORED_SELECTORS,
    SELECTORS,
    Selector,
    loss_position_mask,
    register_selector,
    score_slots,
    select_slots,
    selector_class,
    slot_counts,
)
from .stats import (
    SlotHistory,
    background_summary,
    hub_share,
    kl_batch_background,
    slot_step_stats,
    slot_usage_stats,
)

__all__ = [
    "BACKGROUND_SELECTORS",
    "BackgroundStats",
    "SCORED_SELECTORS",
    "SELECTORS",
    "Selector",
    "SlotHistory",
    "background_cache_key",
    "background_summary",
    "compute_background_stats",
    "fingerprint_model",
    "hub_share",
    "kl_batch_background",
    "load_background_stats",
    "load_or_compute_background_stats",
    "loss_position_mask",
    "register_selector",
    "save_background_stats",
    "score_slots",
    "select_slots",
    "selector_class",
    "slot_counts",
    "slot_step_stats",
    "slot_usage_stats",
]
