"""One slot selection for all ranks of a data-parallel (DDP) run (docs/usage.md "Scaling out").

Each rank sees its own shard of the step's batch, so its slot counts are only part of the
step's counts. If every rank selected from its own counts, ranks would update different
rows and the replicas would drift apart. So, per memory layer and optimizer step:

1. the counts are **summed** over ranks (``all_reduce(SUM)``): read counts are integers, and a
   mean over integers would truncate (``ReduceOp.AVG`` on int64 floors); read mass
   (``count_by=weight``) is float64 and summed the same way;
2. every rank runs the same selector on the same global counts (the random selector's
   generator is seeded identically on every rank, from the run's seed);
3. rank 0's selection is broadcast to the others, so even a selector input that is not
   bit-identical across ranks (background statistics computed on different GPUs, a topk tie
   broken differently) cannot make the ranks update different rows.

Every rank also reduces the selected rows' gradients itself (``average_rows``): DDP's own
reducer would all-reduce the whole sparse value gradient, which NCCL does not support
(pytorch/pytorch#22400) and which is O(accessed rows) instead of O(t · v_dim).

All functions are no-ops without an initialised process group of more than one rank, so the
single-process path is unchanged bit for bit. Collectives run on ``device`` (a CUDA tensor for
NCCL, CPU for gloo) and return tensors on the device of their input.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Ranks of the default process group (1 when there is none)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_over_ranks(counts: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Element-wise sum of ``counts`` over all ranks, exact for integer counts."""
    if world_size() == 1:
        return counts
    t = counts.to(device) if device is not None else counts.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.to(counts.device)


def broadcast_ids(ids: torch.Tensor, device: torch.device | str | None = None, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s 1-D LongTensor on every rank (lengths may differ between ranks before)."""
    if world_size() == 1:
        return ids
    device = ids.device if device is None else torch.device(device)
    n = torch.tensor([ids.numel()], dtype=torch.long, device=device)
    dist.broadcast(n, src=src)
    out = ids.to(device=device, dtype=torch.long) if dist.get_rank() == src else torch.empty(
        int(n), dtype=torch.long, device=device)
    dist.broadcast(out, src=src)
    return out.to(ids.device)


def average_rows(rows: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Mean over ranks of a dense ``[t, v_dim]`` block of gradient rows (DDP's gradient average,
    restricted to the selected rows)."""
    n = world_size()
    if n == 1:
        return rows
    t = rows.to(device) if device is not None else rows.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.div_(n).to(rows.device)
