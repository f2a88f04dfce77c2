"""Benchmark: sparse-slot optimizer step time vs the number of slots N and vs dense AdamW.

docs/design.md §5 requires the cost of a step to be proportional to t·v_dim (t selected rows),
not to N·v_dim. This script times one optimizer step (median over repeats, after warmup)
for N = 16,384 and N = 1,048,576 slots at the same budget t, on a gradient shaped like a
real memory layer's: row-sparse COO from a batch of `tokens` tokens × `heads` heads × `knn`
slots (uncoalesced, duplicates included, as nn.EmbeddingBag(sparse=True) produces), and
compares with torch.optim.AdamW over the full [N, v_dim] table fed the dense gradient
masked to the selected rows (the "not sparse" baseline of docs/design.md §5).

Run (one run, this CPU):

    .venv/bin/python experiments/run.py bench sparse_update

Writes experiments/tools/results/bench_sparse_update.{json,csv}. The dense AdamW needs
~4 full-size [N, v_dim] tensors plus temporaries; at N = 1M × 896 that is > 15 GB, so by
default the dense baseline at N = 1M runs at a smaller v_dim (--dense-large-v-dim, 128),
with the sparse optimizers timed at that v_dim too for a like-for-like ratio.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from smf_lightning.optim import SlotAdam, SlotSGD
from smf_lightning.selection import select_slots, slot_counts

SMALL_N, LARGE_N = 16_384, 1_048_576


def make_grads(n_slots: int, v_dim: int, accesses: int, n_grads: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(n_grads):
        rows = torch.randint(0, n_slots, (accesses,), generator=g)
        values = torch.randn(accesses, v_dim, generator=g)
        grads.append(torch.sparse_coo_tensor(rows.unsqueeze(0), values, (n_slots, v_dim), check_invariants=False))
    return grads


def make_selections(grads: list[torch.Tensor], top_t: int, n_steps: int, seed: int) -> list[torch.Tensor]:
    """A fresh selection every step (t slots among the ones the step's gradient touches), so
    SlotAdam keeps meeting slots it has no state for, as in training."""
    g = torch.Generator().manual_seed(seed)
    sels = []
    for step in range(n_steps):
        accessed = torch.unique(grads[step % len(grads)]._indices()[0])
        sels.append(accessed[torch.randperm(accessed.numel(), generator=g)[:top_t]].sort().values)
    return sels


def make_case(n_slots: int, v_dim: int, optimizer: str, args, seed: int):
    """Build one case; returns (step_fn(i), info_fn()) with everything it needs held in the closure."""
    n_steps = args.warmup + args.repeats
    grads = make_grads(n_slots, v_dim, args.tokens * args.heads * args.knn, args.n_grads, seed=seed)
    sels = make_selections(grads, args.top_t, n_steps, seed=seed + 1)
    # A materialised table (every page touched), like a loaded value table.
    weight = torch.nn.Parameter(torch.empty(n_slots, v_dim).fill_(0.01))

    if optimizer in ("SlotSGD", "SlotAdam"):
        opt = SlotSGD([weight], lr=0.1) if optimizer == "SlotSGD" else SlotAdam([weight], lr=1e-3)

        def step(i):
            weight.grad = grads[i % len(grads)]
            opt.step(selection={weight: sels[i]})

    elif optimizer == "AdamW-dense-masked":
        opt = torch.optim.AdamW([weight], lr=1e-3, weight_decay=0.0)
        # Dense gradients masked to the selected rows, built outside the timed region.
        dense = []
        for i, grad in enumerate(grads):
            d = torch.zeros(n_slots, v_dim)
            d[sels[i]] = _rows(grad, sels[i])
            dense.append(d)
        grads = None  # only the dense gradients are used

        def step(i):
            # the time is the optimizer step alone (masking excluded)
            weight.grad = dense[i % len(dense)]
            opt.step()

    else:
        raise ValueError(optimizer)

    def info():
        return {"adam_state_rows": opt.state[weight]["n_rows"]} if optimizer == "SlotAdam" else {}

    return step, info


def run_interleaved(cases, args) -> list[dict]:
    """Time all cases of one v_dim round-robin (rotating the order each round), so that load
    from other processes on a shared machine hits every case alike."""
    built = [(case, *make_case(*case, args, seed=k)) for k, case in enumerate(cases)]
    times = {case: [] for case in cases}
    for i in range(args.warmup + args.repeats):
        for j in range(len(built)):
            case, step, _ = built[(i + j) % len(built)]
            t0 = time.perf_counter()
            step(i)
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times[case].append(dt)
    results = []
    for case, _, info in built:
        n_slots, v_dim, optimizer = case
        t = times[case]
        results.append({
            "n_slots": n_slots, "v_dim": v_dim, "optimizer": optimizer, "top_t": args.top_t,
            "accesses_per_step": args.tokens * args.heads * args.knn,
            "median_ms": 1e3 * statistics.median(t), "mean_ms": 1e3 * statistics.fmean(t),
            "min_ms": 1e3 * min(t), "max_ms": 1e3 * max(t), "repeats": args.repeats, "warmup": args.warmup,
            **info(),
        })
    del built
    gc.collect()
    return results


def time_steps(step_fn, n_warmup: int, n_repeats: int) -> list[float]:
    times = []
    for i in range(n_warmup + n_repeats):
        t0 = time.perf_counter()
        step_fn(i)
        dt = time.perf_counter() - t0
        if i >= n_warmup:
            times.append(dt)
    return times


def _rows(grad: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """grad[sel] (duplicates summed) for a sparse gradient without densifying the whole table."""
    return grad.index_select(0, sel).to_dense()


def bench_selection(n_slots: int, args) -> dict:
    """Time of select_slots('kl') for one step's counts (O(N) bincount + scan, for reference)."""
    g = torch.Generator().manual_seed(0)
    counts = slot_counts(torch.randint(0, n_slots, (args.tokens * args.heads * args.knn,), generator=g), n_slots)
    from smf_lightning.selection import BackgroundStats

    bg = BackgroundStats(bg_count=torch.randint(0, 50, (n_slots,), generator=g), df=torch.randint(0, 10, (n_slots,), generator=g), n_bg=10)
    times = time_steps(lambda i: select_slots(counts, "kl", args.top_t, bg), args.warmup, args.repeats)
    del counts, bg
    return {"n_slots": n_slots, "median_ms": 1e3 * statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--top-t", type=int, default=500, help="selected rows per step (slot budget)")
    ap.add_argument("--v-dim", type=int, default=896, help="value dim (Qwen2.5-0.5B hidden size)")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per batch")
    ap.add_argument("--heads", type=int, default=4, help="memory heads")
    ap.add_argument("--knn", type=int, default=16, help="slots read per head and token")
    ap.add_argument("--repeats", type=int, default=30, help="timed steps per case")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per case")
    ap.add_argument("--n-grads", type=int, default=4, help="distinct sparse gradients cycled through")
    ap.add_argument("--dense-large-v-dim", type=int, default=128,
                    help="v_dim for the dense AdamW baseline at N=1M (full v_dim needs > 15 GB RAM)")
    ap.add_argument("--dense-full-large", action="store_true",
                    help="also run dense AdamW at N=1M with the full v_dim (needs ~20 GB free RAM)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: on a shared 2-core machine, 2 threads make small ops "
                         "10x slower whenever another process runs; 0 = torch's default)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_sparse_update")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    cases = [
        (SMALL_N, args.v_dim, "SlotSGD"),
        (SMALL_N, args.v_dim, "SlotAdam"),
        (SMALL_N, args.v_dim, "AdamW-dense-masked"),
        (LARGE_N, args.v_dim, "SlotSGD"),
        (LARGE_N, args.v_dim, "SlotAdam"),
    ]
    if args.dense_full_large:
        cases.append((LARGE_N, args.v_dim, "AdamW-dense-masked"))
    small_v = args.dense_large_v_dim
    if small_v != args.v_dim:
        cases += [(n, small_v, o) for n in (SMALL_N, LARGE_N) for o in ("SlotSGD", "SlotAdam", "AdamW-dense-masked")]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"t={args.top_t} rows/step, gradient: {args.tokens} tokens x {args.heads} heads x {args.knn} knn "
          f"= {args.tokens * args.heads * args.knn} sparse rows (uncoalesced)")
    results = []
    for v in dict.fromkeys(v for _, v, _ in cases):
        group = [c for c in cases if c[1] == v]
        for r in run_interleaved(group, args):
            results.append(r)
            print(f"  N={r['n_slots']:>9,} v_dim={v:>4} {r['optimizer']:<20} median {r['median_ms']:9.2f} ms  "
                  f"(mean {r['mean_ms']:.2f}, min {r['min_ms']:.2f}, max {r['max_ms']:.2f})", flush=True)
    selection = [bench_selection(n, args) for n in (SMALL_N, LARGE_N)]

    def get(n, v, o, stat="median_ms"):
        return next((r[stat] for r in results if (r["n_slots"], r["v_dim"], r["optimizer"]) == (n, v, o)), None)

    ratios = []
    for v in sorted({r["v_dim"] for r in results}):
        for o in ("SlotSGD", "SlotAdam"):
            if get(SMALL_N, v, o) and get(LARGE_N, v, o):
                ratio = get(LARGE_N, v, o) / get(SMALL_N, v, o)
                ratios.append({"kind": f"{o} N=1M / N=16k", "v_dim": v, "ratio_median": ratio,
                               "ratio_min": get(LARGE_N, v, o, "min_ms") / get(SMALL_N, v, o, "min_ms"),
                               "target": "<= 1.2", "meets_target": ratio <= 1.2})
            for n in (SMALL_N, LARGE_N):
                if get(n, v, "AdamW-dense-masked") and get(n, v, o):
                    ratios.append({"kind": f"dense AdamW / {o} at N={n:,}", "v_dim": v,
                                   "ratio_median": get(n, v, "AdamW-dense-masked") / get(n, v, o),
                                   "ratio_min": get(n, v, "AdamW-dense-masked", "min_ms") / get(n, v, o, "min_ms"),
                                   "target": "", "meets_target": None})

    print("\n| ratio | v_dim | of medians | of minima | target |\n|---|---:|---:|---:|---|")
    for r in ratios:
        verdict = {True: " met", False: " MISSED", None: ""}[r["meets_target"]]
        print(f"| {r['kind']} | {r['v_dim']} | {r['ratio_median']:.2f}x | {r['ratio_min']:.2f}x | {r['target']}{verdict} |")
    for s in selection:
        print(f"select_slots('kl', t={args.top_t}) at N={s['n_slots']:,}: median {s['median_ms']:.2f} ms (O(N) scan of counts)")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak_mb:,.0f} MB")
    if not args.dense_full_large:
        print(f"note: dense AdamW at N=1M ran with v_dim={small_v} (the full v_dim={args.v_dim} needs > 15 GB RAM); "
              f"rerun with --dense-full-large where RAM allows.")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "peak_rss_mb": peak_mb}
    args.out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "cases": results, "ratios": ratios, "selection_kl": selection}, indent=2))
    with args.out.with_suffix(".csv").open("w", newline="") as f:
        fields = ["n_slots", "v_dim", "optimizer", "top_t", "accesses_per_step", "median_ms", "mean_ms", "min_ms",
                  "max_ms", "repeats", "warmup", "adam_state_rows"]
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in results:
            w.writerow({k: r.get(k, "") for k in fields})
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
