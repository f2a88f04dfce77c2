"""Which token positions count: masks over a batch's ``[B, T]`` positions.

A pure function of tensors, shared by the memory's data-fitted parts (memory/whitening.py,
``whiten_on=loss``) and slot selection (selection/, ``loss_tokens_only``): it lives here so
that memory never imports selection (selection imports memory, never the reverse). Also
importable as ``smf_lightning.selection.loss_position_mask`` and from
``smf_lightning.selection.selectors``.
"""

from __future__ import annotations

import torch


def loss_position_mask(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """[B, T] bool: positions whose hidden state is scored by the causal-LM loss.

    Hugging Face shifts inside the loss: the output at position ``i`` predicts
    ``labels[:, i+1]``. So the memory reads at position ``i`` carry loss iff
    ``labels[:, i+1] != ignore_index``; the last position never does. Pass the result as the
    ``mask`` of ``SlotAccess.slot_ids`` to count only loss-carrying tokens (docs/design.md §9: slots
    hit by template tokens like "Question:" otherwise look fact-specific).
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [batch, seq] token ids, got shape {tuple(labels.shape)}.")
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != ignore_index
    return mask
