"""How many slots a fact may take: the per-fact slot budget of a stream (``method.budget``).

With ``method.select_per=fact`` and ``method.exclude_owned=true`` (the recipe) every fact selects
up to top-t slots of each memory layer once, when its task starts, and no later task selects them
again. A stream of F planned facts (``data.n_tasks x data.facts_per_task``) therefore needs up to
F x t slots of a layer, out of the slots it may select:

    selectable = n_slots - hubs - owned - reserved

- ``hubs``: ``ceil(method.exclude_hubs x n_slots)``, the slots the background reads most, never selected;
- ``owned``: slots facts already own when the stream starts (the fact ledger of an export the run
  continues from, ``model.init_checkpoint``; the layer with the most), never selected again;
- ``reserved``: ``ceil(method.reserve x n_slots)``, slots the stream leaves free for a later one.

Hubs and inherited rows may overlap, so ``selectable`` is a lower bound of what the run can select.
The bound on use is exact: a fact's selection never holds more than its budget, a step updates
only its batch's facts' selected slots, and an owned slot is never selected, so a stream of F
facts at budget t owns at most F x t new slots per layer (facts of one task may share slots, so it
usually owns fewer). Hence no slack beyond ``reserved`` is needed for the stream to fit. What
the count cannot promise: a fact selects only among the free slots its own sequences read, so
the last facts of a stream that fills the table may take fewer than their budget while slots
remain free elsewhere (``summary.json`` ``capacity.slots_per_fact`` shows it; ``reserve`` keeps
part of the table free to the end).

The policies:

- ``fixed``: every fact gets ``method.top_t``; a stream with F x top_t > selectable is refused
  before the model loads (and ``stream`` would give it ``selectable // F``, which the message says).
- ``stream``: the budget is sized from the planned stream,
  ``t = min(top_t, selectable // F)``. For every stream that fits at ``top_t`` (F x top_t <=
  selectable) this is ``top_t`` itself, so the selections are those of ``fixed``; a longer
  stream gets the largest budget that fits. A stream for which even
  ``min(method.min_top_t, top_t)`` does not fit is refused, with the numbers and the options.

Without ``exclude_owned`` slots are reused, so the table cannot run out; with ``select_per=step``
the budget is per optimizer step, not per fact, so there is no per-fact plan to size. In both
cases both policies spend ``top_t`` and nothing is checked.

The budget is resolved twice from the same numbers: before the model loads, from the composed
config (methods/smf.py ``check_run_config``: refusal and the log line), and by the method when
training starts, from its stream and its memory (what ``summary.json`` ``capacity.budget``
records); a test checks that the two agree.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import ConfigError
from .selectors import hub_count

BUDGETS = ("fixed", "stream")


@dataclass(frozen=True)
class SlotBudget:
    """The resolved per-fact budget of a stream, with the numbers it came from (per memory layer)."""

    policy: str  # method.budget: fixed | stream
    top_t: int  # slots a fact may select in each memory layer: what the run spends
    requested_top_t: int  # method.top_t
    min_top_t: int  # method.min_top_t: the smallest budget `stream` may resolve to (with top_t, the smaller)
    bounded: bool  # whether facts own their slots for good (select_per=fact with exclude_owned): a plan to size
    planned_facts: int  # data.n_tasks x data.facts_per_task
    n_slots: int
    hubs: int
    owned: int  # slots facts owned before the stream (an inherited ledger; the layer with the most)
    reserved: int
    selectable: int  # n_slots - hubs - owned - reserved

    @property
    def lowered(self) -> bool:
        """Whether a fact gets fewer slots than method.top_t (budget=stream on a long stream)."""
        return self.top_t < self.requested_top_t

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One line for the run log."""
        head = f"slot budget (method.budget={self.policy}): {self.top_t} slots per fact and memory layer"
        if not self.bounded:
            return f"{head} (method.top_t: no per-fact plan without select_per=fact and exclude_owned)"
        return (f"{head} for {self.planned_facts:,} planned facts: {self.selectable:,} selectable = "
                f"{self.n_slots:,} slots - {self.hubs:,} hubs - {self.owned:,} owned before the stream - "
                f"{self.reserved:,} reserved; method.top_t={self.requested_top_t}"
                f"{' lowered to fit the stream' if self.lowered else ''}, at most "
                f"{self.planned_facts * self.top_t:,} slots owned by the stream")


def resolve_budget(policy: str, top_t: int, *, min_top_t: int, bounded: bool, n_tasks: int, facts_per_task: int,
                   n_slots: int, exclude_hubs: float, owned: int = 0, reserve: float = 0.0) -> SlotBudget:
    """The per-fact budget of ``policy`` for a stream of ``n_tasks x facts_per_task`` facts (module
    doc); ConfigError with the numbers and the options if the stream cannot fit."""
    if policy not in BUDGETS:
        raise ConfigError(f"bad config: method.budget={policy!r}; allowed: {' | '.join(BUDGETS)}.")
    facts = n_tasks * facts_per_task
    hubs = hub_count(exclude_hubs, n_slots)
    reserved = math.ceil(reserve * n_slots)
    selectable = max(n_slots - hubs - owned - reserved, 0)
    resolved = top_t
    if bounded and facts > 0:
        fit = selectable // facts  # the largest budget every planned fact can have
        if policy == "fixed" and facts * top_t > selectable:
            options = [f"method.budget=stream ({fit:,} slots per fact for this stream)",
                       f"a lower method.top_t (at most {fit:,} for this stream)"] if fit >= 1 else []
            raise ConfigError(_cannot_fit(f"method.top_t={top_t}", top_t, n_tasks, facts_per_task, n_slots, hubs,
                                          owned, reserved, exclude_hubs, reserve, selectable, options))
        if policy == "stream":
            resolved = min(top_t, fit)
            smallest = min(min_top_t, top_t)
            if resolved < smallest:
                options = [f"a lower method.min_top_t (at most {fit:,}, the budget every fact would get; "
                           "conf/method/smf.yaml says what small budgets learned)"] if fit >= 1 else []
                raise ConfigError(_cannot_fit(
                    f"min(method.min_top_t={min_top_t}, method.top_t={top_t})={smallest}", smallest, n_tasks,
                    facts_per_task, n_slots, hubs, owned, reserved, exclude_hubs, reserve, selectable, options,
                    why=" even at the smallest per-fact budget method.budget=stream may spend"))
    return SlotBudget(policy=policy, top_t=resolved, requested_top_t=top_t, min_top_t=min_top_t, bounded=bounded,
                      planned_facts=facts, n_slots=n_slots, hubs=hubs, owned=owned, reserved=reserved,
                      selectable=selectable)


def _cannot_fit(what: str, per_fact: int, n_tasks: int, facts_per_task: int, n_slots: int, hubs: int, owned: int,
                reserved: int, exclude_hubs: float, reserve: float, selectable: int, options: list[str],
                why: str = "") -> str:
    parts = [f"model.memory.n_slots={n_slots:,} minus {hubs:,} hub slots of method.exclude_hubs={exclude_hubs}"]
    if owned:
        parts.append(f"{owned:,} slots the facts of model.init_checkpoint's ledger own")
    if reserved:
        parts.append(f"{reserved:,} kept free by method.reserve={reserve}")
    options = [*options, "a larger model.memory.n_slots", "a shorter stream"]
    if reserved:
        options.append("a smaller method.reserve")
    options.append("or method.exclude_owned=false (later facts reuse slots)")
    return (f"bad config: the stream cannot fit the memory{why}: {n_tasks:,} tasks x {facts_per_task:,} facts x {what} "
            f"slots = {n_tasks * facts_per_task * per_fact:,} slots per memory layer, but only {selectable:,} can be "
            f"selected ({', '.join(parts)}), and method.exclude_owned=true never selects a slot twice. At this budget "
            f"{selectable // per_fact:,} facts fit. Options: {'; '.join(options)}.")
