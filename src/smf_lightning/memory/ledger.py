"""The fact ledger: which memory rows each taught fact wrote, and what those rows held before.

SMF moves only the value rows it selects (docs/design.md §4, §5), so what a stream taught lives
in a short list of rows per fact. During training (methods/smf.py) the ledger records

- for every fact, the rows of each memory layer that optimizer steps updated on its behalf;
- for every row, the first time any step updates it, its *pre-stream* content: the value row
  and, in a read-gated layer (memory/layer.py), its write key and write mass.

The product commands read it (docs/usage.md, "Using the updated model"): forgetting a fact
restores its rows to their pre-stream content, ``ask --explain`` names the facts whose rows an
answer read, and a run continued from an export treats every row in the ledger as owned, so new
facts never overwrite them.

Attribution (``record_step``): with ``method.select_per=fact`` a row updated by a step belongs
to each fact of the batch whose own selected slots contain it; with ``select_per=step`` the
step's budget serves the whole batch, so its rows belong to every fact of the batch. Under data
parallel training each rank sees its own shard's facts; rank 0's ledger is the one checkpointed.

Pre-stream content is kept sparse: the ids of every captured row, and of each tensor only the
rows that were not zero. An additive memory's values and an unwritten row's write key start at
zero, so a first stream costs a row id per updated row; only rows new to the ledger are copied.

The ledger lives in memory/ because the method that fills it (methods/), the loader that hands
an export's ledger to a continued run (models/build.py) and the product commands (product/) all
read it; it reads nothing but torch and the memory layers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError

LEDGER_FILE = "ledger.json"  # facts: id, task, question, answer, rows per memory layer
PRE_FILE = "ledger_pre.safetensors"  # the pre-stream content of every row in the ledger
FORMAT = 1


def row_tensors(mem) -> dict[str, torch.Tensor]:
    """The per-row tensors of a memory layer that training writes: its value table and, with a
    read gate, the write keys and masses (one row of each per slot)."""
    out = {"values": mem.values.weight}
    if mem.cfg.read_gate is not None:
        out["write_keys"] = mem.write_keys
        out["write_mass"] = mem.write_mass
    return out


@dataclass
class FactEntry:
    """One taught fact: its task in the stream, its question and answer (None where the stream has
    none, e.g. a document's passage) and the rows updated on its behalf (layer -> sorted ids)."""

    task: int
    question: str | None = None
    answer: str | None = None
    rows: dict[int, torch.Tensor] = field(default_factory=dict)

    def n_rows(self) -> int:
        return sum(int(r.numel()) for r in self.rows.values())


def _union(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return torch.unique(b if a is None else torch.cat([a, b]))


def _sorted_lookup(ids: torch.Tensor, data: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> None:
    """out[k] = data[j] where ids[j] == rows[k] (ids sorted); other rows of out untouched."""
    if ids.numel() == 0 or rows.numel() == 0:
        return
    pos = torch.searchsorted(ids, rows).clamp(max=ids.numel() - 1)
    hit = ids[pos] == rows
    out[hit] = data[pos[hit]].to(out.dtype)


class FactLedger:
    """Facts -> rows they wrote, and the pre-stream content of every written row (module doc)."""

    def __init__(self) -> None:
        self.facts: dict[str, FactEntry] = {}
        # task index of this stream's first task: a run continued from an export numbers its
        # tasks after the ones the export's ledger holds
        self.first_task = 0
        # layer -> chunks of captured rows: {"rows": ids, "<tensor>.rows": nonzero ids, "<tensor>": their rows};
        # merged into one chunk when read (appending per step, merging per read keeps a step O(new rows))
        self._pre: dict[int, list[dict[str, torch.Tensor]]] = {}
        self._captured: dict[int, torch.Tensor] = {}  # layer -> bool mask over slots, built when first needed

    # ---- recording (methods/smf.py) -----------------------------------------------------
    def describe(self, fact_id: str, task: int, question: str | None = None, answer: str | None = None) -> None:
        """Register a fact of the stream (at the start of its task), with its question and answer."""
        entry = self.facts.setdefault(fact_id, FactEntry(task))
        entry.question = entry.question if question is None else question
        entry.answer = entry.answer if answer is None else answer

    @torch.no_grad()
    def record_step(self, memories: Mapping[int, torch.nn.Module], selection: Mapping[int, torch.Tensor],
                    batch_facts: Sequence[str], task: int,
                    fact_slots: Mapping[str, Mapping[int, torch.Tensor]] | None = None) -> None:
        """One optimizer step, called *before* it moves the rows: capture the pre-stream content of
        the selected rows the ledger has not seen, and attribute them to the batch's facts (per
        fact's own slots with ``fact_slots``, select_per=fact; to every batch fact without)."""
        facts = list(dict.fromkeys(batch_facts))
        for f in facts:
            self.facts.setdefault(f, FactEntry(task))
        for i, sel in selection.items():
            sel = torch.unique(sel.detach().to("cpu", torch.long))
            if sel.numel() == 0:
                continue
            self._capture(i, memories[i], sel)
            for f in facts:
                if fact_slots is None:
                    rows = sel
                else:
                    own = fact_slots.get(f, {}).get(i)
                    if own is None:
                        continue
                    rows = sel[torch.isin(sel, own.to("cpu"))]
                if rows.numel():
                    entry = self.facts[f]
                    entry.rows[i] = _union(entry.rows.get(i), rows)

    def _mask(self, layer: int, n_slots: int) -> torch.Tensor:
        if layer not in self._captured:
            mask = torch.zeros(n_slots, dtype=torch.bool)
            mask[self.captured_rows(layer)] = True
            self._captured[layer] = mask
        return self._captured[layer]

    def _capture(self, layer: int, mem, rows: torch.Tensor) -> None:
        mask = self._mask(layer, mem.n_slots)
        new = rows[~mask[rows]]
        if new.numel() == 0:
            return
        mask[new] = True
        chunk = {"rows": new}
        for name, t in row_tensors(mem).items():
            data = t.detach()[new.to(t.device)].to("cpu")
            nonzero = data.reshape(new.numel(), -1).ne(0).any(1)
            chunk[f"{name}.rows"], chunk[name] = new[nonzero], data[nonzero]
        self._pre.setdefault(layer, []).append(chunk)

    # ---- reading --------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return sorted(set(self._pre) | {i for e in self.facts.values() for i in e.rows})

    def _merged(self, layer: int) -> dict[str, torch.Tensor]:
        chunks = self._pre.get(layer, [])
        if not chunks:
            return {"rows": torch.zeros(0, dtype=torch.long)}
        if len(chunks) > 1:
            rows = torch.cat([c["rows"] for c in chunks])
            merged = {"rows": rows.sort().values}
            for name in [k for k in chunks[0] if k != "rows" and not k.endswith(".rows")]:
                ids = torch.cat([c[f"{name}.rows"] for c in chunks])
                order = ids.argsort()
                merged[f"{name}.rows"], merged[name] = ids[order], torch.cat([c[name] for c in chunks])[order]
            self._pre[layer] = [merged]
        return self._pre[layer][0]

    def captured_rows(self, layer: int) -> torch.Tensor:
        """Sorted ids of the rows of ``layer`` whose pre-stream content the ledger holds."""
        return self._merged(layer)["rows"]

    def pre_content(self, layer: int, mem, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The pre-stream content of ``rows`` of ``layer`` (every one captured), shaped like
        ``mem``'s row tensors (row_tensors), on the CPU."""
        rows = rows.to("cpu", torch.long)
        merged = self._merged(layer)
        missing = rows[~torch.isin(rows, merged["rows"])]
        if missing.numel():
            raise ValueError(f"memory layer {layer}: rows {missing[:5].tolist()} were never captured by the ledger")
        out = {}
        for name, t in row_tensors(mem).items():
            out[name] = torch.zeros(rows.numel(), *t.shape[1:], dtype=t.dtype)
            if name in merged:
                _sorted_lookup(merged[f"{name}.rows"], merged[name], rows, out[name])
        return out

    def fact_rows(self, fact_ids: Iterable[str]) -> dict[int, torch.Tensor]:
        """layer -> the union of the rows of ``fact_ids``."""
        out: dict[int, torch.Tensor] = {}
        for f in fact_ids:
            for i, rows in self.facts[f].rows.items():
                out[i] = _union(out.get(i), rows)
        return out

    def owned_rows(self, layer: int) -> torch.Tensor:
        """Sorted ids of the rows of ``layer`` that some fact in the ledger owns."""
        parts = [e.rows[layer] for e in self.facts.values() if layer in e.rows]
        return torch.unique(torch.cat(parts)) if parts else torch.zeros(0, dtype=torch.long)

    def owners(self, layer: int) -> dict[int, list[str]]:
        """row id -> the facts that own it, for one memory layer."""
        out: dict[int, list[str]] = {}
        for f, e in self.facts.items():
            for r in e.rows.get(layer, torch.zeros(0, dtype=torch.long)).tolist():
                out.setdefault(r, []).append(f)
        return out

    # ---- editing ----------------------------------------------------------------------------
    def remove(self, fact_ids: Iterable[str]) -> None:
        """Drop facts; their rows that no remaining fact owns leave the pre-stream record too
        (after a forget they hold that content again, and a later stream may take them)."""
        gone = self.fact_rows(fact_ids)
        for f in fact_ids:
            del self.facts[f]
        for i, rows in gone.items():
            free = rows[~torch.isin(rows, self.owned_rows(i))]
            if free.numel():
                self._drop_pre(i, free)

    def _drop_pre(self, layer: int, rows: torch.Tensor) -> None:
        merged = self._merged(layer)
        kept = {"rows": merged["rows"][~torch.isin(merged["rows"], rows)]}
        for name in [k for k in merged if k != "rows" and not k.endswith(".rows")]:
            keep = ~torch.isin(merged[f"{name}.rows"], rows)
            kept[f"{name}.rows"], kept[name] = merged[f"{name}.rows"][keep], merged[name][keep]
        self._pre[layer] = [kept]
        self._captured.pop(layer, None)

    def continued(self) -> FactLedger:
        """This ledger as the start of a later stream (a run continued from an export): the same
        facts and rows, new tasks numbered after its last."""
        out = FactLedger.from_state_dict(self.state_dict())
        out.first_task = max((e.task for e in self.facts.values()), default=-1) + 1
        return out

    # ---- checkpoints: tensors and plain containers (torch.load(weights_only=True)) --------
    def state_dict(self) -> dict:
        return {
            "format": FORMAT,
            "first_task": self.first_task,
            "facts": {f: {"task": e.task, "question": e.question, "answer": e.answer, "rows": dict(e.rows)}
                      for f, e in self.facts.items()},
            "pre": {i: dict(self._merged(i)) for i in sorted(self._pre)},
        }

    @classmethod
    def from_state_dict(cls, state: Mapping) -> FactLedger:
        out = cls()
        out.first_task = int(state.get("first_task", 0))
        for f, e in state.get("facts", {}).items():
            out.facts[f] = FactEntry(int(e["task"]), e.get("question"), e.get("answer"),
                                     {int(i): r.to(torch.long) for i, r in e["rows"].items()})
        for i, merged in state.get("pre", {}).items():
            out._pre[int(i)] = [dict(merged)]
        return out

    # ---- files (an export: ledger.json beside ledger_pre.safetensors) ----------------------
    def write(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        facts = [{"id": f, "task": e.task, "question": e.question, "answer": e.answer, "n_rows": e.n_rows(),
                  "rows": {str(i): r.tolist() for i, r in sorted(e.rows.items())}} for f, e in self.facts.items()]
        (folder / LEDGER_FILE).write_text(json.dumps({"format": FORMAT, "layers": self.layers, "facts": facts}, indent=1))
        tensors = {f"{i}/{k}": v.contiguous() for i in sorted(self._pre) for k, v in self._merged(i).items()}
        save_file(tensors, str(folder / PRE_FILE))

    @classmethod
    def read(cls, folder: str | Path) -> FactLedger | None:
        """The ledger of an export directory; None if it has none. ConfigError (one line) if its
        files cannot be read."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / LEDGER_FILE).is_file():
            return None
        try:
            meta = json.loads((folder / LEDGER_FILE).read_text())
            tensors = load_file(str(folder / PRE_FILE))
            out = cls()
            for fact in meta["facts"]:
                out.facts[str(fact["id"])] = FactEntry(
                    int(fact["task"]), fact.get("question"), fact.get("answer"),
                    {int(i): torch.tensor(r, dtype=torch.long) for i, r in fact["rows"].items()})
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
            raise ConfigError(f"cannot read the fact ledger of {folder} ({LEDGER_FILE}, {PRE_FILE}): {e}") from None
        for key, value in tensors.items():
            i, name = key.split("/", 1)
            out._pre.setdefault(int(i), [{}])[0][name] = value
        return out
