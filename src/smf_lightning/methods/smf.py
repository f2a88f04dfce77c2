"""Sparse Memory Finetuning (Lin et al. 2025; KL selector: "Improving Sparse Memory Finetuning").

Each optimizer step: count the slots every memory layer read for the batch (padding
excluded; by default only loss-carrying tokens), score them against the background
statistics with the configured selector, keep the top-t per layer, and let the sparse
optimizer move exactly those value rows. Every other weight is frozen, so the model's
non-memory parameters stay bit-identical (tested).

The recipe levers of DOTS (experiments/recipe/RECIPE.md), each a key of conf/method/smf.yaml:
- ``exclude_hubs``: the share of slots the background reads most never get selected;
- ``exclude_owned``: slots selected while training an earlier task are not selected again,
  so a later fact cannot overwrite an earlier one's rows;
- ``select_per``: ``step`` scores the whole batch (the budget is shared by the batch's
  facts); ``fact`` selects top-t slots for every fact of the task once, at the start of the
  task, from all of that fact's training sequences, and a step updates the union of its
  batch's facts' slots that the batch read (with one memory layer the addressing never
  changes during SMF, so a fact's reads are the same at every step);
- ``budget`` (selection/budget.py): ``fixed`` spends ``top_t`` per fact; ``stream`` sizes the
  per-fact budget from the planned stream, so that its facts fit the slots ``exclude_owned``
  leaves them (the same selections as ``fixed`` for every stream that fits at ``top_t``);
- ``optimizer_state``: ``fresh`` starts every task with a new optimizer state (DOTS), ``carry``
  keeps the Adam moments of rows across tasks;
- read gate (``model.memory.read_gate``, memory/layer.py): each step also writes the loss
  positions' queries into the write keys of the rows it updated, so that later reads of those
  rows by unrelated questions (other queries) do not count;
- ``skip_frequent_tokens`` (selection/frequent.py): positions holding one of the background's
  most frequent tokens (a share of its token occurrences) neither count for selection nor write
  gate keys, so a fact's rows are not the rows every question's `` of`` or ``,`` reads;
- ``count_by``: ``reads`` counts every read of a slot as 1 (Lin et al.); ``weight`` counts its
  softmax weight (read mass), so the budget goes to the slots that carry a position's output
  rather than to the 32nd-best match it barely reads (experiments/recipe/RECIPE.md: with a sharp softmax a fact's
  few best slots carry most of each answer position's output).
- the fact ledger (memory/ledger.py): every step records, before it moves them, the pre-stream
  content of rows updated for the first time and the facts each row was updated for; it is saved
  in the checkpoint and read by the product commands (export, forget, ask --explain). A model
  loaded from an export carries the export's ledger (models/build.py): its rows count as owned.

Data parallel (DDP; docs/usage.md "Scaling out"): every rank selects the same rows and applies the same update.
The step's slot counts are summed over ranks before selection, rank 0's selection is
broadcast, DDP's all-reduce of the (sparse) value gradient is blocked and the optimizer
averages only the selected rows' gradients over ranks (selection/distributed.py). The
random selector's generator is seeded with the run's seed, the same on every rank.
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from ..memory import freeze_all_but_values, memory_layers
from ..memory.layer import training_gate
from ..memory.ledger import FactLedger
from ..optim import SlotAdam, SlotSGD
from ..selection import distributed
from ..selection.budget import BUDGETS, SlotBudget, resolve_budget
from ..selection.frequent import writing_positions
from ..selection.selectors import hub_slots, loss_position_mask, select_slots, selector_class, slot_counts
from .base import ContinualLM, MethodConfig, _need
from .prefix_cache import FrozenPrefixCache

SELECT_PER = ("step", "fact")
OPTIMIZERS = ("adam", "sgd")
# trainer.precision values SMF supports. bf16-mixed: the base model's matmuls in bf16 under
# autocast, while the memory addressing, the softmax over slot scores and the value gather run in
# fp32 (memory/layer.py) and the value table, its gradient and SlotAdam's moments stay fp32.
SUPPORTED_PRECISION = {
    "32-true": None,
    "bf16-mixed": None,
    "16-mixed": "fp16 needs loss scaling (GradScaler), which SlotAdam / SlotSGD do not implement for their "
                "selected rows; use trainer.precision=bf16-mixed",
    "bf16-true": "it casts the value table to bfloat16, whose 8-bit mantissa swallows small row updates; use "
                 "trainer.precision=bf16-mixed, or model.dtype=bfloat16 with trainer.precision=32-true (the frozen "
                 "base in bf16, the value table kept fp32 by the retrofit)",
    "16-true": "it casts the value table to float16; use trainer.precision=bf16-mixed",
}
OPTIMIZER_STATE = ("fresh", "carry")
COUNT_BY = ("reads", "weight")
log = logging.getLogger(__name__)


@dataclass
class SMFConfig(MethodConfig):
    """SMF's keys (conf/method/smf.yaml says what each does). The defaults here are plain SMF
    (Lin et al.: top-t per step over loss positions, read counts, no exclusions), which is also how
    a config saved before a key existed behaved; the YAML holds the project's recipe."""

    retrofit: bool = True
    loss_tokens_only: bool = True
    select_per: str = "step"
    exclude_hubs: float = 0.0
    exclude_owned: bool = False
    optimizer_state: str = "carry"
    count_by: str = "reads"
    prefix_cache: int = 0
    budget: str = "fixed"
    min_top_t: int = 1  # read with budget=stream only (plain SMF has no floor)
    reserve: float = 0.0
    skip_frequent_tokens: float = 0.0

    def validate(self) -> None:
        super().validate()
        try:
            selector = selector_class(self.selector)
        except ValueError as e:
            raise ConfigError(f"bad config: method.selector: {e} Fix it on the command line, e.g. `method.selector=kl`.") from None
        if selector.has_budget:
            _need(isinstance(self.top_t, int) and not isinstance(self.top_t, bool) and self.top_t >= 1, "method.top_t",
                  self.top_t, "an integer >= 1 (the slot budget per layer and step)")
        _need(self.optimizer in OPTIMIZERS, "method.optimizer", self.optimizer, " | ".join(OPTIMIZERS))
        _need(self.retrofit is True, "method.retrofit", self.retrofit, "true for smf (SMF trains memory slots)")
        _need(isinstance(self.prefix_cache, int) and not isinstance(self.prefix_cache, bool) and self.prefix_cache >= 0,
              "method.prefix_cache", self.prefix_cache, "an integer >= 0 (batches whose frozen-prefix states are kept; 0 = off)")
        _need(self.count_by in COUNT_BY, "method.count_by", self.count_by, " | ".join(COUNT_BY))
        _need(self.select_per in SELECT_PER, "method.select_per", self.select_per, " | ".join(SELECT_PER))
        _need(self.optimizer_state in OPTIMIZER_STATE, "method.optimizer_state", self.optimizer_state,
              " | ".join(OPTIMIZER_STATE))
        self.exclude_hubs = float(self.exclude_hubs or 0.0)
        _need(0.0 <= self.exclude_hubs < 1.0, "method.exclude_hubs", self.exclude_hubs, "a share of slots in [0, 1)")
        _need(not (self.exclude_hubs > 0 and not selector.needs_background), "method.exclude_hubs",
              self.exclude_hubs, "0 unless method.selector reads the background statistics, e.g. kl or tfidf (hubs are "
              "defined by them)")
        _need(not (self.select_per == "fact" and not selector.has_budget), "method.select_per", "fact",
              f"step when method.selector={self.selector} (no budget to spend per fact)")
        _need(self.budget in BUDGETS, "method.budget", self.budget, " | ".join(BUDGETS))
        _need(isinstance(self.min_top_t, int) and not isinstance(self.min_top_t, bool) and self.min_top_t >= 1,
              "method.min_top_t", self.min_top_t, "an integer >= 1 (the smallest per-fact budget method.budget=stream "
              "may resolve to)")
        self.skip_frequent_tokens = float(self.skip_frequent_tokens or 0.0)
        _need(0.0 <= self.skip_frequent_tokens < 1.0, "method.skip_frequent_tokens", self.skip_frequent_tokens,
              "a share of the background's token occurrences in [0, 1) (0 = every position writes)")
        self.reserve = float(self.reserve or 0.0)
        _need(0.0 <= self.reserve < 1.0 - self.exclude_hubs, "method.reserve", self.reserve,
              f"a share of slots in [0, 1 - method.exclude_hubs={self.exclude_hubs})")

    @property
    def owns_slots(self) -> bool:
        """Whether every fact owns its slots for good, so that a long stream can exhaust the table
        (per-fact selection with exclude_owned; selection/budget.py)."""
        return self.exclude_owned and self.select_per == "fact"


def stream_budget(config: SMFConfig, n_slots: int, n_tasks: int, facts_per_task: int, owned: int = 0) -> SlotBudget:
    """The per-fact slot budget of ``config`` for a stream of ``n_tasks x facts_per_task`` facts on
    a memory of ``n_slots`` slots per layer of which ``owned`` are owned already (selection/budget.py).
    ConfigError if the stream cannot fit: before the model loads, with the numbers and the options."""
    return resolve_budget(config.budget, config.top_t, min_top_t=config.min_top_t, bounded=config.owns_slots,
                          n_tasks=n_tasks, facts_per_task=facts_per_task, n_slots=n_slots,
                          exclude_hubs=config.exclude_hubs, owned=owned, reserve=config.reserve)


def starting_memory(model_cfg) -> tuple[int, int]:
    """(slots per memory layer, slots facts already own in the layer with the most) of the memory a
    run will train, read before it loads: a full export it continues from (model.init_checkpoint)
    brings its own memory (retrofit.json) and fact ledger; otherwise model.memory.n_slots, none owned."""
    n_slots = int(model_cfg.memory.n_slots)
    init = model_cfg.get("init_checkpoint")
    if not init:
        return n_slots, 0
    from ..memory.retrofit import RETROFIT_FILE

    path = Path(init)
    try:
        n_slots = int(json.loads((path / RETROFIT_FILE).read_text())["memory"]["n_slots"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not a readable export: loading it says so
    ledger = FactLedger.read(path)
    owned = max((int(ledger.owned_rows(i).numel()) for i in ledger.layers), default=0) if ledger else 0
    return n_slots, owned


def _log_budget(budget: SlotBudget) -> None:
    # a warning when the stream lowers method.top_t: a sweep over top_t would otherwise label its
    # points by a budget they did not spend (summary.json top_t is the configured one)
    (log.warning if budget.lowered else log.info)("%s", budget.describe())


class SparseMemoryFinetune(ContinualLM):
    method_name = "smf"
    Config = SMFConfig
    memory_only = True
    needs_background = True

    @classmethod
    def run_label(cls, config: SMFConfig) -> str:
        return f"{config.name}-{config.selector}-t{config.top_t}"

    @classmethod
    def check_run_config(cls, cfg, config: SMFConfig) -> None:
        """The slot budget against the memory's size, and (continual stage) the stream against its
        capacity: the per-fact budget of method.budget, resolved and logged here (selection/budget.py)."""
        if not selector_class(config.selector).has_budget:
            return
        n_slots, owned = starting_memory(cfg.model)
        _need(config.top_t <= n_slots, "method.top_t", config.top_t, f"<= model.memory.n_slots={n_slots}")
        d = cfg.data
        if cfg.get("stage", "continual") == "continual" and "n_tasks" in d and "facts_per_task" in d:  # healing trains no stream
            _log_budget(stream_budget(config, n_slots, int(d.n_tasks), int(d.facts_per_task), owned))

    def __init__(self, model, method_cfg: dict, background: dict | None = None, seed: int = 0):
        freeze_all_but_values(model)
        super().__init__(model, method_cfg)
        self.memories = memory_layers(model)
        if not self.memories:
            raise ValueError("SMF needs a retrofitted model (memory layers); set method.retrofit=true.")
        self.background = background or {}
        c = self.config
        self.selector = c.selector
        self.top_t = c.top_t if selector_class(self.selector).has_budget else None
        self.loss_tokens_only = c.loss_tokens_only
        self.select_per = c.select_per
        self.exclude_owned = c.exclude_owned
        self.optimizer_state = c.optimizer_state
        self.count_by = c.count_by
        hubs = c.exclude_hubs
        self.hub_mask = {}
        for i, mem in self.memories.items():
            bg = self.background.get(i)
            if hubs > 0 and bg is None:
                raise ValueError("method.exclude_hubs needs background statistics (selector kl or tfidf).")
            self.hub_mask[i] = hub_slots(bg, hubs) if hubs > 0 else torch.zeros(mem.n_slots, dtype=torch.bool)
        # slots selected in earlier tasks (exclude_owned) and in the current one
        self.owned = {i: torch.zeros(m.n_slots, dtype=torch.bool) for i, m in self.memories.items()}
        self._task_selected = {i: torch.zeros(m.n_slots, dtype=torch.bool) for i, m in self.memories.items()}
        self.fact_slots: dict[str, dict[int, torch.Tensor]] = {}
        self.capacity_history: list[dict] = []  # one entry per finished task and memory layer (capacity())
        # random selector only; the same seed on every rank, so DDP ranks draw the same slots
        self._generator = torch.Generator().manual_seed(seed)
        self._counts: dict[int, torch.Tensor] = {}
        self._batch_facts: list[str] = []
        self.last_selection: dict[int, torch.Tensor] = {}
        self.last_counts: dict[int, torch.Tensor] = {}
        self.prefix_cache = FrozenPrefixCache(model, capacity=c.prefix_cache)
        # memory layers with a read gate (memory/layer.py): the loss positions' reads of the step's
        # micro-batches, written into the updated rows' write keys at the step
        self.gated = [i for i, m in self.memories.items() if m.cfg.read_gate is not None]
        self._gate_reads: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        # which rows each fact wrote and what they held before (memory/ledger.py); a model from an
        # export brings its ledger, whose rows earlier facts own: never selected again with exclude_owned
        inherited = getattr(model, "fact_ledger", None)
        self.ledger = inherited.continued() if inherited is not None else FactLedger()
        for i in self.ledger.layers:
            if i not in self.owned:
                raise ValueError(f"the model's fact ledger names memory layer {i}, which the model does not have")
            self.owned[i][self.ledger.owned_rows(i)] = True
        # what the stream starts with, for its budget (setup): fixed before any checkpoint is restored
        self._owned_before = max(int(o.sum()) for o in self.owned.values())
        self.budget: SlotBudget | None = None  # resolved when training starts (setup)
        # tokens whose positions neither count for selection nor write gate keys (selection/frequent.py);
        # set from the background corpus by the continual stage when method.skip_frequent_tokens > 0
        self.skipped_tokens: torch.Tensor | None = None

    def set_skipped_tokens(self, mask: torch.Tensor | None) -> None:
        """bool [vocab]: tokens whose positions do not count for selection nor write keys (None: none)."""
        self.skipped_tokens = None if mask is None or not bool(mask.any()) else mask.bool().cpu()

    # ---- pickling (strategy=ddp_spawn sends the module to its processes) ---------------
    def __getstate__(self) -> dict:
        # a torch.Generator does not survive torch.multiprocessing's pickling; its state does
        state = dict(super().__getstate__())
        state["_generator"] = self._generator.get_state()
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        generator = torch.Generator()
        generator.set_state(state.pop("_generator"))
        super().__setstate__(state)
        self._generator = generator

    def setup(self, stage: str) -> None:
        precision = str(self.trainer.precision)
        if precision not in SUPPORTED_PRECISION or SUPPORTED_PRECISION[precision]:
            why = SUPPORTED_PRECISION.get(precision) or "it is not one SMF was written for"
            raise ValueError(f"trainer.precision={precision} is not supported by SMF: {why}. "
                             f"Supported: {', '.join(k for k, v in SUPPORTED_PRECISION.items() if v is None)}.")
        dm = self.trainer.datamodule  # the stream: its planned facts size the budget
        if self.top_t is not None and getattr(dm, "n_tasks", None) and getattr(dm, "facts_per_task", None):
            self.budget = self.resolve_budget(dm.n_tasks, dm.facts_per_task)
            self.top_t = self.budget.top_t
            _log_budget(self.budget)

    def resolve_budget(self, n_tasks: int, facts_per_task: int) -> SlotBudget:
        """The per-fact budget for a stream of ``n_tasks x facts_per_task`` facts on this memory,
        from the same numbers check_run_config read before the model loaded (selection/budget.py)."""
        n_slots = {m.n_slots for m in self.memories.values()}
        if len(n_slots) != 1:
            raise ValueError(f"SMF's slot budget needs memory layers of one size, got {sorted(n_slots)} slots")
        return stream_budget(self.config, n_slots.pop(), n_tasks, facts_per_task, self._owned_before)

    def lm_loss(self, batch: dict) -> torch.Tensor:
        with self.prefix_cache.reuse(batch):
            return super().lm_loss(batch)

    def configure_optimizers(self):
        opt = self._build_optimizer()
        if distributed.world_size() > 1:  # DDP: the selected rows' gradients averaged over ranks
            opt.reduce_grad_rows = lambda rows: distributed.average_rows(rows, self.device)
        return opt

    def backward_sync(self):
        if distributed.world_size() > 1:
            # DDP would all-reduce the whole sparse value gradient (unsupported by NCCL, and
            # O(accessed rows)); the optimizer reduces the selected rows instead.
            return self.trainer.strategy.block_backward_sync()
        return super().backward_sync()

    def _build_optimizer(self):
        values = [m.values.weight for m in self.memories.values()]
        c = self.config
        clip = c.grad_clip
        clip = float(clip) if clip else None
        if c.optimizer == "sgd":
            return SlotSGD(values, lr=c.lr, weight_decay=c.weight_decay, max_grad_norm=clip)
        return SlotAdam(
            values,
            lr=c.lr,
            betas=tuple(c.betas),
            eps=c.eps,
            weight_decay=c.weight_decay,
            max_grad_norm=clip,
        )

    # ---- tasks ------------------------------------------------------------------------
    def _excluded(self, i: int) -> torch.Tensor:
        return self.hub_mask[i] | self.owned[i] if self.exclude_owned else self.hub_mask[i]

    def on_train_epoch_start(self) -> None:
        # one Trainer epoch = one task of the stream
        if self.optimizer_state == "fresh":
            for opt in self.trainer.optimizers:
                opt.state.clear()
        for sel in self._task_selected.values():
            sel.zero_()
        dm = self.trainer.datamodule
        # the task's facts into the ledger, with their questions and answers; a data module of
        # one's own that serves only batches (no task_facts) leaves the ledger's descriptions empty
        if dm is not None and hasattr(dm, "task_facts"):
            facts = {f.id: f for f in dm.task_facts(dm.current_task)}
            for fid in dict.fromkeys(ex.fact_id for ex in dm.training_examples(dm.current_task)):
                f = facts.get(fid)  # None for a document's passage: no question of its own
                self.ledger.describe(fid, self._ledger_task(), *((f.question, f.answer) if f else ()))
        if self.select_per == "fact":
            self.fact_slots = self.select_fact_slots(dm.training_examples(dm.current_task), dm.collate)

    def on_train_epoch_end(self) -> None:
        entries = self._task_capacity(self.trainer.current_epoch)
        self.capacity_history += entries
        for e in entries:
            log.info("capacity after task %d (memory layer %s): %d slots written (%s per fact), %d of %d owned, %d free "
                     "(%d hub slots never selected)", e["task"], e["layer"], e["written"],
                     "-" if e["per_fact"] is None else f"{e['per_fact']:.0f}", e["owned"], e["n_slots"], e["free"], e["hubs"])
        for i, sel in self._task_selected.items():
            self.owned[i] |= sel

    # ---- capacity: how much of the table the stream has used --------------------------
    def capacity(self) -> dict[int, dict[str, int]]:
        """Per memory layer: its slots, the hub slots never selected, the slots owned (selected by
        a finished task or the one in progress) and the slots a next task may still select (with
        exclude_owned, neither hubs nor owned)."""
        out = {}
        for i, mem in self.memories.items():
            owned = self.owned[i] | self._task_selected[i]
            blocked = self.hub_mask[i] | owned if self.exclude_owned else self.hub_mask[i]
            out[i] = {"n_slots": mem.n_slots, "hubs": int(self.hub_mask[i].sum()), "owned": int(owned.sum()),
                      "free": int(mem.n_slots - blocked.sum())}
        return out

    def _task_capacity(self, task: int) -> list[dict]:
        """capacity() at the end of ``task``, with the slots it wrote and its facts' mean budget."""
        out = []
        for i, c in self.capacity().items():
            per_fact = [int(s[i].numel()) for s in self.fact_slots.values() if i in s]
            out.append({"task": task, "layer": i, "written": int(self._task_selected[i].sum()),
                        "per_fact": sum(per_fact) / len(per_fact) if per_fact else None, **c})
        return out

    def _capacity_history(self) -> list[dict]:
        """capacity_history with the task in progress: the evaluation and the task checkpoint run
        before this module's on_train_epoch_end records it."""
        task = self.trainer.current_epoch if self._trainer is not None else None
        if task is None or any(e["task"] == task for e in self.capacity_history):
            return list(self.capacity_history)
        return self.capacity_history + self._task_capacity(task)

    def slots_per_fact(self) -> dict[str, dict]:
        """Per memory layer, the rows this stream's facts own (fact ledger): how many facts, and the
        min / median / max rows of one fact; a fact whose steps updated nothing counts 0."""
        facts = [e for e in self.ledger.facts.values() if e.task >= self.ledger.first_task]
        out = {}
        for i in self.memories:
            n = [int(e.rows[i].numel()) if i in e.rows else 0 for e in facts]
            out[str(i)] = ({"facts": len(n), "min": min(n), "median": statistics.median(n), "max": max(n)} if n
                           else {"facts": 0, "min": None, "median": None, "max": None})
        return out

    def summary_extras(self) -> dict:
        return {"capacity": {"layers": {str(i): c for i, c in self.capacity().items()},
                             "per_task": self._capacity_history(), "exclude_owned": self.exclude_owned,
                             "budget": self.budget.to_dict() if self.budget is not None else None,
                             "slots_per_fact": self.slots_per_fact()}}

    @torch.no_grad()
    def select_fact_slots(self, examples, collate, batch_size: int = 16) -> dict[str, dict[int, torch.Tensor]]:
        """fact id -> layer -> the top-t slots of that fact's training sequences (select_per=fact)."""
        counts: dict[str, dict[int, torch.Tensor]] = {}
        was_training = self.model.training
        self.model.eval()
        try:
            with training_gate(self.memories.values()):  # selection sees training's read gate
                for start in range(0, len(examples), batch_size):
                    chunk = examples[start:start + batch_size]
                    batch = collate(chunk)
                    device = next(self.model.parameters()).device
                    self.model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                               logits_to_keep=1)
                    mask = loss_position_mask(batch["labels"]) if self.loss_tokens_only else batch["attention_mask"].bool()
                    mask = writing_positions(batch["input_ids"], self.skipped_tokens, mask, batch.get("write_mask"))
                    for row, ex in enumerate(chunk):
                        per_layer = counts.setdefault(ex.fact_id, {})
                        for i, mem in self.memories.items():
                            c = self._count(mem.last_access, mem.n_slots, row=row, keep=mask[row])
                            per_layer[i] = per_layer[i] + c if i in per_layer else c
        finally:
            self.model.train(was_training)
        return {
            fid: {i: select_slots(c, self.selector, self.top_t, bg=self.background.get(i), generator=self._generator,
                                  exclude=self._excluded(i))
                  for i, c in per_layer.items()}
            for fid, per_layer in counts.items()
        }

    def _count(self, acc, n_slots: int, row: int | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Per-slot counts of the reads kept by ``keep`` (of one batch row, or of the batch's
        padding-free positions): read counts (count_by=reads) or read mass (count_by=weight)."""
        ids = acc.indices if row is None else acc.indices[row]
        keep = acc.mask(keep) if row is None else keep.to(ids.device)
        if self.count_by == "reads":
            return slot_counts(ids[keep].reshape(-1).cpu(), n_slots)
        if acc.weights.shape != acc.indices.shape:
            raise ValueError("method.count_by=weight needs the reads' weights (the memory layer's record_weights=True).")
        weights = acc.weights if row is None else acc.weights[row]
        return slot_counts(ids[keep].reshape(-1).cpu(), n_slots, weights=weights[keep].reshape(-1).cpu())

    # ---- steps ------------------------------------------------------------------------
    def on_accumulation_start(self) -> None:
        dtype = torch.float64 if self.count_by == "weight" else torch.long
        self._counts = {i: torch.zeros(m.n_slots, dtype=dtype) for i, m in self.memories.items()}
        self._batch_facts = []
        self._gate_reads = {i: [] for i in self.gated}

    def after_backward(self, batch: dict) -> None:
        # Selection for the step uses the slot counts summed over its micro-batches.
        mask = loss_position_mask(batch["labels"]) if self.loss_tokens_only else None
        mask = writing_positions(batch["input_ids"], self.skipped_tokens, mask, batch.get("write_mask"))
        for i, mem in self.memories.items():
            self._counts[i] += self._count(mem.last_access, mem.n_slots, keep=mask)
        self._batch_facts += list(batch.get("fact_ids", []))
        for i in self.gated:
            acc = self.memories[i].last_access
            if acc.weights.shape != acc.indices.shape:
                raise ValueError("memory.read_gate needs the reads' weights (the memory layer's record_weights=True).")
            keep = acc.mask(mask)
            self._gate_reads[i].append((acc.indices[keep], acc.weights[keep], acc.queries[keep]))

    def _step_selection(self, i: int, mem) -> torch.Tensor:
        if self.select_per == "fact":
            chosen = [self.fact_slots[f][i] for f in dict.fromkeys(self._batch_facts) if f in self.fact_slots]
            if not chosen:
                return torch.zeros(0, dtype=torch.long)
            union = torch.unique(torch.cat(chosen))
            return union[self._counts[i][union] > 0]  # rows this batch read (unread rows get no update)
        return select_slots(self._counts[i], self.selector, self.top_t, bg=self.background.get(i),
                            generator=self._generator, exclude=self._excluded(i))

    def take_optimizer_step(self, opt) -> int:
        selection = {}
        for i, mem in self.memories.items():
            # DDP: the step's counts over every rank's shard (integer sum, exact), one selection
            self._counts[i] = distributed.sum_over_ranks(self._counts[i], self.device)
            sel = distributed.broadcast_ids(self._step_selection(i, mem), self.device)
            self.last_selection[i] = sel
            self._task_selected[i][sel] = True
            selection[mem.values.weight] = sel.to(mem.values.weight.device)
        self.last_counts = self._counts
        # before the rows move: their pre-stream content, and the facts they are updated for
        self.ledger.record_step(self.memories, self.last_selection, self._batch_facts, self._ledger_task(),
                                self.fact_slots if self.select_per == "fact" else None)
        opt.optimizer.set_selection(selection)
        opt.step()
        for i in self.gated:
            self._write_keys(i, self.memories[i], self.last_selection[i])
        return sum(int(s.numel()) * m.v_dim for s, m in zip(self.last_selection.values(), self.memories.values()))

    def _ledger_task(self) -> int:
        """The ledger's index of the task in progress (after an inherited ledger's tasks)."""
        return self.ledger.first_task + (self.trainer.current_epoch if self._trainer is not None else 0)

    def _write_keys(self, i: int, mem, sel: torch.Tensor) -> None:
        """The step's loss-position reads of the rows it updated go into those rows' write keys
        (memory/layer.py, read gate); under DDP the sums over every rank's shard, so all ranks
        keep the same keys."""
        reads = self._gate_reads.get(i) or []
        if not reads or sel.numel() == 0:
            return
        rows = torch.unique(sel.to(mem.write_keys.device))
        idx, w, q = (torch.cat([r[k] for r in reads]).to(rows.device) for k in range(3))
        keys, mass = mem.write_delta(rows, idx, w, q)
        keys = distributed.sum_over_ranks(keys, self.device)
        mass = distributed.sum_over_ranks(mass, self.device)
        mem.add_writes(rows, keys, mass)

    # ---- checkpoints: slot ownership survives a resume ---------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        # write keys of the gated layers' written rows (buffers, so not in the trainable state_dict)
        checkpoint["write_keys"] = {}
        for i in self.gated:
            mem = self.memories[i]
            rows = mem.written_rows()
            checkpoint["write_keys"][i] = (rows, mem.write_keys[rows].clone(), mem.write_mass[rows].clone())
        # Written by TaskCheckpoint at the end of a task, before this module's on_train_epoch_end
        # folds the task's slots into `owned`: store both, the union is what the next task excludes.
        checkpoint["owned_slots"] = {i: torch.nonzero(self.owned[i] | self._task_selected[i]).squeeze(1)
                                     for i in self.owned}
        checkpoint["capacity_history"] = self._capacity_history()
        checkpoint["fact_ledger"] = self.ledger.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        for i, ids in checkpoint.get("owned_slots", {}).items():
            self.owned[int(i)].zero_()
            self.owned[int(i)][ids] = True
        self.capacity_history = list(checkpoint.get("capacity_history", []))
        if "fact_ledger" in checkpoint:
            self.ledger = FactLedger.from_state_dict(checkpoint["fact_ledger"])
        for i, (rows, keys, mass) in checkpoint.get("write_keys", {}).items():
            mem = self.memories[int(i)]
            mem.clear_writes()
            mem.add_writes(rows.to(mem.write_keys.device), keys, mass)
