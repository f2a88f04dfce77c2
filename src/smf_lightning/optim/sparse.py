"""Sparse-slot optimizers: only the selected rows of a memory value table change.

docs/design.md §5. Dense Adam/AdamW with masked gradients is **not** sparse: momentum and
weight decay keep moving rows that were selected at earlier steps. These optimizers touch
only the rows selected for the current step, so for every step and every optimizer:

* rows not selected are bit-identical after the step, parameters *and* optimizer state;
* the work is O(t · v_dim) for t selected rows (plus O(nnz) index arithmetic on a sparse
  gradient), never O(N · v_dim).

Optimizers:

* :class:`SlotSGD` — plain SGD, no momentum (the anchors' choice, Lin et al. 2025, with
  large learning rates); optional L2 weight decay added to the selected rows' gradient
  (``torch.optim.SGD`` semantics, restricted to selected rows).
* :class:`SlotAdam` — Adam with *lazy* per-row state: a row's first/second moments and its
  own step count advance only when the row is selected, and bias correction uses that
  per-row step count (a row selected for the first time at global step 1000 gets the
  bias correction of step 1). Optional decoupled weight decay (AdamW style) on selected
  rows only. State is stored compactly: only rows that were ever selected own a state row,
  so memory grows with the number of distinct slots ever trained, not with N.

How to drive them (one call per optimizer step)::

    opt = SlotAdam([values_weight_a, values_weight_b], lr=1e-3)
    loss.backward()                    # possibly over several micro-batches
    opt.set_selection({values_weight_a: ids_a, values_weight_b: ids_b})
    opt.step()                         # consumes the selection
    opt.zero_grad()

Under Lightning's automatic optimization, call ``set_selection`` in the LightningModule's
``on_before_optimizer_step`` hook: Lightning runs it after the last micro-batch's backward
and before ``optimizer.step`` reads the selection. ``step(selection=...)`` is the same in
one call (manual optimization).

Gradient accumulation: gradients accumulate in ``param.grad`` across micro-batches (dense:
summed; sparse COO: concatenated, summed here). The step uses the accumulated gradient of
the selected rows, so the selection for the step should be made from the slot counts
summed over the same micro-batches (their union of accessed slots).

Gradient clipping: with ``max_grad_norm`` set, the global L2 norm is computed over the
*selected rows only* of all parameters of this optimizer (the rows that will move), and
they are scaled by ``min(1, max_grad_norm / (norm + 1e-6))`` exactly as
``torch.nn.utils.clip_grad_norm_`` would scale them. ``param.grad`` itself is not modified.
Do not also clip with Lightning's ``gradient_clip_val`` (it would count unselected rows and
touch a sparse gradient it cannot clip). ``last_grad_norm`` holds the pre-clip norm of the
last step (for logging).

Data parallel (DDP): with ``reduce_grad_rows`` set (a callable on a dense ``[t, v_dim]`` block,
e.g. :func:`smf_lightning.selection.distributed.average_rows`), each parameter's gathered
selected-row gradient is reduced across ranks before clipping and the update, so every rank
applies the same update from the same global gradient. A rank whose ``grad`` is None then
takes part with zero rows (a collective must be entered by every rank). The selection must
be the same on every rank (selection/distributed.py).

Precision: the update of a 16-bit table (``float16`` / ``bfloat16``) is computed in float32
and rounded once when written back, and SlotAdam's moments are kept in float32 for such
tables: ``exp_avg_sq`` holds squared gradients, which underflow or lose all but 8 bits in
bfloat16, and ``lr · m / sqrt(v)`` of a small step would round to zero against a bf16 row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch.optim import Optimizer


# SlotAdam allocates state for this many rows at once (all of them when N is smaller:
# 2 x 58 MB for the seed paper's 16,384 x 896), then doubles the capacity when needed.
INITIAL_STATE_ROWS = 16_384
LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(p: torch.Tensor) -> torch.dtype:
    """Dtype of a table's update arithmetic and optimizer state: float32 for 16-bit tables."""
    return torch.float32 if p.dtype in LOW_PRECISION else p.dtype


class _SlotOptimizer(Optimizer):
    """Shared machinery: selection handling, sparse/dense row gathering, clipping."""

    def __init__(self, params: Iterable, defaults: dict, max_grad_norm: float | None):
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={max_grad_norm} must be > 0, or None to disable clipping.")
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(
                        f"{type(self).__name__} updates rows of 2-D value tables [N, v_dim]; got a parameter "
                        f"of shape {tuple(p.shape)}. Pass only memory value weights (memory_value_params)."
                    )
        self.max_grad_norm = max_grad_norm
        self.reduce_grad_rows: Callable[[torch.Tensor], torch.Tensor] | None = None  # DDP: see module doc
        self.last_grad_norm: float | None = None
        self._selection: dict[int, torch.Tensor] | None = None
        self._lookups: dict[int, torch.Tensor] = {}  # scratch row maps, not optimizer state

    # -- selection -------------------------------------------------------------------
    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def set_selection(self, selection: Mapping[torch.Tensor, torch.Tensor]) -> None:
        """The rows the next :meth:`step` may update: ``{param: LongTensor of row ids}``.

        Every parameter of this optimizer must appear (pass an empty tensor to leave one
        unchanged). Ids are deduplicated; out-of-range ids raise. The selection is consumed
        by the next step.
        """
        params = self._params()
        by_id = {id(p): p for p in params}
        out: dict[int, torch.Tensor] = {}
        for p, ids in selection.items():
            if id(p) not in by_id:
                raise ValueError(
                    f"selection has a tensor of shape {tuple(p.shape)} that is not a parameter of this "
                    f"optimizer; key the selection by the value-table weights the optimizer was built on."
                )
            ids = torch.as_tensor(ids)
            if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 1:
                raise ValueError(
                    f"selected row ids must be a 1-D integer tensor, got dtype {ids.dtype}, shape {tuple(ids.shape)}."
                )
            ids = torch.unique(ids.to(device=p.device, dtype=torch.long))  # sorted, deduplicated
            if ids.numel() and (int(ids[0]) < 0 or int(ids[-1]) >= p.shape[0]):
                raise ValueError(
                    f"selected row ids span [{int(ids[0])}, {int(ids[-1])}] but the table has {p.shape[0]} rows."
                )
            out[id(p)] = ids
        missing = [tuple(p.shape) for p in params if id(p) not in out]
        if missing:
            raise ValueError(
                f"selection is missing {len(missing)} parameter(s) of shapes {missing}; give every value "
                f"table an entry (an empty LongTensor leaves that table unchanged this step)."
            )
        self._selection = out

    # -- gradients -------------------------------------------------------------------
    def _row_lookup(self, p: torch.Tensor) -> torch.Tensor:
        """A reusable LongTensor[N] of -1 (per parameter): row id -> position in the selection.
        Allocated once; each step writes and then clears only the t selected entries."""
        lookup = self._lookups.get(id(p))
        if lookup is None or lookup.numel() != p.shape[0] or lookup.device != p.device:
            lookup = torch.full((p.shape[0],), -1, dtype=torch.long, device=p.device)
            self._lookups[id(p)] = lookup
        return lookup

    def _gather_grad_rows(self, p: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """p.grad[ids] as a dense [len(ids), v_dim] tensor, for dense or sparse COO grads.

        For a sparse (possibly uncoalesced, e.g. accumulated) gradient, entries whose row is
        not selected are skipped without being summed: O(nnz + matched·v_dim), no O(N) work.
        """
        grad = p.grad
        if grad is None:  # only under reduce_grad_rows: this rank contributes zeros
            return torch.zeros((ids.numel(), p.shape[1]), dtype=p.dtype, device=p.device)
        if not grad.is_sparse:
            return grad.index_select(0, ids)
        if grad.sparse_dim() != 1:
            raise ValueError(
                f"sparse gradient with sparse_dim={grad.sparse_dim()}; expected row-sparse gradients "
                f"(sparse_dim=1) as nn.EmbeddingBag(sparse=True) produces."
            )
        rows, vals = grad._indices()[0], grad._values()
        out = torch.zeros((ids.numel(),) + tuple(grad.shape[1:]), dtype=grad.dtype, device=grad.device)
        if ids.numel() == 0 or rows.numel() == 0:
            return out
        lookup = self._row_lookup(p)
        lookup[ids] = torch.arange(ids.numel(), device=ids.device)
        try:
            pos = lookup.index_select(0, rows)
        finally:
            lookup[ids] = -1
        hit = torch.nonzero(pos >= 0).squeeze(1)
        out.index_add_(0, pos.index_select(0, hit), vals.index_select(0, hit))
        return out

    def _clip(self, grads: list[torch.Tensor]) -> None:
        if not grads:
            self.last_grad_norm = 0.0
            return
        # Same arithmetic as torch.nn.utils.clip_grad_norm_, over the selected rows only.
        norms = [torch.linalg.vector_norm(g, 2.0) for g in grads]
        total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
        self.last_grad_norm = float(total)
        if self.max_grad_norm is not None:
            coef = torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coef.to(g.dtype))

    # -- step ------------------------------------------------------------------------
    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], float] | None = None,
        selection: Mapping[torch.Tensor, torch.Tensor] | None = None,
    ):
        """Update the selected rows (from ``selection`` or :meth:`set_selection`).

        The closure, if any, runs first (Lightning's closure runs the training step, the
        backward and ``on_before_optimizer_step``, where the selection is usually set).
        Parameters whose ``grad`` is None are skipped (no update, no state change).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if selection is not None:
            self.set_selection(selection)
        if self._selection is None:
            if all(p.grad is None for p in self._params()):
                return loss  # nothing to do (e.g. a skipped training step)
            raise RuntimeError(
                f"{type(self).__name__}.step() called without a slot selection; call "
                f"set_selection({{value_weight: row_ids}}) before every step (in Lightning: in "
                f"on_before_optimizer_step), or pass step(selection=...)."
            )
        selection, self._selection = self._selection, None
        work = []  # (group, param, ids, grad rows)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None and self.reduce_grad_rows is None:
                    continue
                ids = selection[id(p)]
                rows = self._gather_grad_rows(p, ids).to(compute_dtype(p))  # clip and reduce in fp32
                if self.reduce_grad_rows is not None:
                    rows = self.reduce_grad_rows(rows)
                work.append((group, p, ids, rows))
        self._clip([g for *_, g in work])
        for group, p, ids, g in work:
            if ids.numel():
                self._update_rows(group, p, ids, g)
        return loss

    def _update_rows(self, group: dict, p: torch.Tensor, ids: torch.Tensor, grad_rows: torch.Tensor) -> None:
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts every non-"step" state tensor to the parameter's float dtype; our
        # integer state (row maps, per-row step counts) must stay integer, and the float32
        # moments of a 16-bit table must stay float32 (compute_dtype).
        saved_groups = state_dict["param_groups"]
        kept: dict[int, dict[str, torch.Tensor]] = {}
        for saved, group in zip(saved_groups, self.param_groups):
            for pid, p in zip(saved["params"], group["params"]):
                s = state_dict["state"].get(pid, {})
                kept[id(p)] = {
                    k: v.to(device=p.device, dtype=compute_dtype(p) if v.is_floating_point() else v.dtype)
                    for k, v in s.items()
                    if torch.is_tensor(v) and not v.is_complex()
                }
        super().load_state_dict(state_dict)
        for p in self._params():
            if id(p) in kept and kept[id(p)]:
                self.state[p].update(kept[id(p)])
        self._selection = None


class SlotSGD(_SlotOptimizer):
    """SGD without momentum on selected rows only (docs/design.md §5; Lin et al. 2025).

    Args:
        params: the value-table weights ([N, v_dim]) or param groups.
        lr: learning rate (no default: its scale depends on the value init and the memory's
            output projection, docs/design.md §9 — set it in conf/).
        weight_decay: L2 penalty added to the gradient of the selected rows only.
        max_grad_norm: clip the global norm of the selected rows' gradients (None = off).
    """

    def __init__(self, params: Iterable, lr: float, weight_decay: float = 0.0, max_grad_norm: float | None = None):
        if not lr >= 0:
            raise ValueError(f"SlotSGD lr={lr} must be >= 0.")
        if not weight_decay >= 0:
            raise ValueError(f"SlotSGD weight_decay={weight_decay} must be >= 0.")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay), max_grad_norm)

    def _update_rows(self, group, p, ids, grad_rows):
        rows = p.index_select(0, ids).to(compute_dtype(p))
        grad_rows = grad_rows.to(rows.dtype)
        if group["weight_decay"]:
            grad_rows = grad_rows.add(rows, alpha=group["weight_decay"])
        rows.add_(grad_rows, alpha=-group["lr"])
        p.index_copy_(0, ids, rows.to(p.dtype))


class SlotAdam(_SlotOptimizer):
    """Adam with lazy per-row state on selected rows only (docs/design.md §5).

    A row's ``exp_avg``, ``exp_avg_sq`` and step count advance only at steps where it is
    selected; bias correction uses the row's own step count. With ``weight_decay > 0`` the
    selected rows are decayed as in AdamW (``row *= 1 - lr·weight_decay``, decoupled).

    State per parameter (compact): ``slot_to_row`` LongTensor[N] (-1 = no state yet),
    ``exp_avg``/``exp_avg_sq`` [capacity, v_dim], ``row_step`` LongTensor[capacity],
    ``n_rows`` (rows in use). Capacity starts at min(N, 16,384) rows and doubles when
    full, so the amortised cost per step stays O(t · v_dim). Use :meth:`row_state` to read a
    slot's state.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = None,
    ):
        if not lr >= 0:
            raise ValueError(f"SlotAdam lr={lr} must be >= 0.")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"SlotAdam betas={tuple(betas)} must each be in [0, 1).")
        if not eps >= 0:
            raise ValueError(f"SlotAdam eps={eps} must be >= 0.")
        if not weight_decay >= 0:
            raise ValueError(f"SlotAdam weight_decay={weight_decay} must be >= 0.")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay), max_grad_norm)

    def _state_rows(self, p: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """State row of each selected slot, allocating rows for slots selected the first time."""
        state = self.state[p]
        if "slot_to_row" not in state:
            cap = min(p.shape[0], max(INITIAL_STATE_ROWS, ids.numel()))
            state["slot_to_row"] = torch.full((p.shape[0],), -1, dtype=torch.long, device=p.device)
            state["exp_avg"] = torch.zeros((cap, p.shape[1]), dtype=compute_dtype(p), device=p.device)
            state["exp_avg_sq"] = torch.zeros((cap, p.shape[1]), dtype=compute_dtype(p), device=p.device)
            state["row_step"] = torch.zeros(cap, dtype=torch.long, device=p.device)
            state["n_rows"] = 0
        rows = state["slot_to_row"].index_select(0, ids)
        new = torch.nonzero(rows < 0).squeeze(1)
        if new.numel():
            n, need = state["n_rows"], state["n_rows"] + new.numel()
            cap = state["row_step"].numel()
            if need > cap:
                grow = min(p.shape[0], max(need, 2 * cap)) - cap
                for key in ("exp_avg", "exp_avg_sq", "row_step"):
                    buf = state[key]
                    state[key] = torch.cat([buf, buf.new_zeros((grow,) + tuple(buf.shape[1:]))])
            fresh = torch.arange(n, need, device=p.device)
            rows[new] = fresh
            state["slot_to_row"][ids[new]] = fresh
            state["n_rows"] = need
        return rows

    def _update_rows(self, group, p, ids, grad_rows):
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        state = self.state[p]
        rows = self._state_rows(p, ids)
        dtype = compute_dtype(p)
        grad_rows = grad_rows.to(dtype)
        step = state["row_step"].index_select(0, rows) + 1
        state["row_step"].index_copy_(0, rows, step)
        m = state["exp_avg"].index_select(0, rows)
        v = state["exp_avg_sq"].index_select(0, rows)
        m.lerp_(grad_rows, 1 - beta1)
        v.mul_(beta2).addcmul_(grad_rows, grad_rows, value=1 - beta2)
        state["exp_avg"].index_copy_(0, rows, m)
        state["exp_avg_sq"].index_copy_(0, rows, v)

        # Per-row bias correction (float64 powers, as Python floats are in torch.optim.Adam).
        step64 = step.to(torch.float64)
        bias1 = 1 - torch.pow(beta1, step64)
        bias2_sqrt = (1 - torch.pow(beta2, step64)).sqrt()
        step_size = (lr / bias1).to(dtype).unsqueeze(1)
        denom = (v.sqrt() / bias2_sqrt.to(dtype).unsqueeze(1)).add_(eps)

        values = p.index_select(0, ids).to(dtype)
        if wd:
            values.mul_(1 - lr * wd)
        values.sub_(m / denom * step_size)
        p.index_copy_(0, ids, values.to(p.dtype))

    def row_state(self, p: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """``exp_avg``, ``exp_avg_sq`` ([len(ids), v_dim]) and ``step`` ([len(ids)]) of the given
        slots; zeros for slots that were never selected."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=p.device)
        state = self.state[p]
        out = {
            "exp_avg": torch.zeros((ids.numel(), p.shape[1]), dtype=compute_dtype(p), device=p.device),
            "exp_avg_sq": torch.zeros((ids.numel(), p.shape[1]), dtype=compute_dtype(p), device=p.device),
            "step": torch.zeros(ids.numel(), dtype=torch.long, device=p.device),
        }
        if "slot_to_row" not in state:
            return out
        rows = state["slot_to_row"].index_select(0, ids)
        have = torch.nonzero(rows >= 0).squeeze(1)
        out["exp_avg"][have] = state["exp_avg"].index_select(0, rows[have])
        out["exp_avg_sq"][have] = state["exp_avg_sq"].index_select(0, rows[have])
        out["step"][have] = state["row_step"].index_select(0, rows[have])
        return out
