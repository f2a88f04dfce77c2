"""Sparse-slot optimizers: only the selected memory value rows change (docs/design.md §5)."""

from .sparse import SlotAdam, SlotSGD

__all__ = ["SlotAdam", "SlotSGD"]
