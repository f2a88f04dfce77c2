"""Which tokens may not write: the background corpus's most frequent tokens (``method.skip_frequent_tokens``).

A fact's training sequences read memory rows at every position, its function words and
punctuation too, and SMF's per-fact selection may pick the rows those positions read. Such a row
is then read, and its gate passed, by every question holding the same token in a similar context
— measured on the rephrasing study's dev stream, where a known question's reads that pass the gate
onto written rows sit at `` in``, `` of``, ``,``, `` the``, digits and quotes
(experiments/rephrase/REPHRASE.md, "The gate frontier"). With ``skip_frequent_tokens = s`` the
most frequent tokens of the background corpus that together make up a share ``s`` of its
(padding-free) token occurrences are skipped: positions holding one are not counted for slot
selection and do not write the read gate's keys. The corpus is the background's, never an
evaluation item.

Pure functions of tensors; nothing reads a model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


def token_counts(batches: Iterable[Mapping[str, torch.Tensor]], vocab_size: int) -> torch.Tensor:
    """Occurrences of every token id in ``batches`` (input_ids where attention_mask is 1): [vocab_size]."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for batch in batches:
        ids = batch["input_ids"][batch["attention_mask"].bool()].reshape(-1).cpu()
        if ids.numel() and int(ids.max()) >= vocab_size:
            raise ValueError(f"token id {int(ids.max())} is outside the vocabulary of {vocab_size}")
        counts += torch.bincount(ids, minlength=vocab_size)
    return counts


def frequent_tokens(counts: torch.Tensor, share: float) -> torch.Tensor:
    """bool [vocab]: the fewest most-frequent tokens whose occurrences reach ``share`` of all
    (ties broken towards the lower id); none for share 0. ``share`` in [0, 1)."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"share={share!r} must be in [0, 1)")
    mask = torch.zeros(counts.numel(), dtype=torch.bool)
    total = int(counts.sum())
    if share == 0.0 or total == 0:
        return mask
    order = torch.sort(counts, descending=True, stable=True).indices  # stable: equal counts keep id order
    cumulative = torch.cumsum(counts[order], 0).double()
    k = int(torch.searchsorted(cumulative, torch.tensor([share * total], dtype=torch.float64))[0]) + 1
    mask[order[:k]] = True
    return mask


def writing_positions(input_ids: torch.Tensor, skipped: torch.Tensor | None,
                      base: torch.Tensor | None, allowed: torch.Tensor | None = None) -> torch.Tensor | None:
    """[B, T] bool: the positions of ``base`` (None: every position) that ``allowed`` permits
    (None: all; a batch's ``write_mask``: not padding, not a context prefix) and whose token is not ``skipped``
    (a bool [vocab] mask); ``base`` itself when nothing is skipped or disallowed."""
    keep = None if skipped is None else ~skipped.to(input_ids.device)[input_ids]
    if allowed is not None:
        allowed = allowed.to(input_ids.device).bool()
        keep = allowed if keep is None else keep & allowed
    if keep is None:
        return base
    return keep if base is None else base.to(keep.device) & keep
