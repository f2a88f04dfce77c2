"""Forget taught facts: restore the memory rows they own to their pre-stream content.

A fact's rows are the rows optimizer steps updated on its behalf (memory/ledger.py). Restoring
them — the value row and, with a read gate, the write key and mass — undoes what those steps
wrote, and nothing else moves: a prompt that reads none of the restored rows computes exactly
what it computed before (tests/test_product.py). A row several facts share holds all their
updates, so restoring it takes the others' share too; ``forget`` reports, for every other fact
that shared a restored row, how many of its rows were restored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..memory import memory_layers
from ..memory.ledger import FactLedger, row_tensors


@dataclass
class ForgetReport:
    forgotten: list[str]
    restored: dict[int, int]  # memory layer -> rows restored
    shared: dict[str, tuple[int, int]] = field(default_factory=dict)  # other fact -> (its rows restored, its rows)


@torch.no_grad()
def forget(model, ledger: FactLedger, fact_ids: Sequence[str]) -> ForgetReport:
    """Restore the rows of ``fact_ids`` in ``model`` and drop the facts from ``ledger`` (both in
    place). ConfigError naming the ids the ledger does not hold, before anything changes."""
    ids = list(dict.fromkeys(fact_ids))
    unknown = [f for f in ids if f not in ledger.facts]
    if unknown:
        known = list(ledger.facts)
        listed = ", ".join(known[:5]) + (f", ... ({len(known)} in all; see ledger.json)" if len(known) > 5 else "")
        raise ConfigError(f"unknown fact id(s) {', '.join(unknown)}: the ledger's facts are {listed or 'none'}.")
    rows = ledger.fact_rows(ids)
    mems = memory_layers(model)
    for i, r in rows.items():
        content = ledger.pre_content(i, mems[i], r)
        for name, table in row_tensors(mems[i]).items():
            table[r.to(table.device)] = content[name].to(table.device, table.dtype)
    shared = {}
    for f, entry in ledger.facts.items():
        if f in ids:
            continue
        n = sum(int(torch.isin(r, rows[i]).sum()) for i, r in entry.rows.items() if i in rows)
        if n:
            shared[f] = (n, entry.n_rows())
    ledger.remove(ids)
    return ForgetReport(ids, {i: int(r.numel()) for i, r in rows.items()}, shared)
