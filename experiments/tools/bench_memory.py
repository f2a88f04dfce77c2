"""Benchmark: cost of the memory layers on the real offline Qwen2.5-class model.

Forward and forward+backward time of the retrofitted model (memory at layers 6, 12, 18;
N = 16,384; 4 heads; knn 16) versus the base model on the same batch, interleaved in one
run so machine noise hits both alike. Target: retrofitted forward <= 1.10 x base forward.

    python experiments/run.py bench memory            # prints a table, writes experiments/tools/results/bench_memory.{json,csv}

Backward: the base model is timed with every weight trainable (what full finetuning pays);
the retrofitted model with only the memory values trainable (what SMF pays).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from smf_lightning.memory import MemoryConfig, freeze_all_but_values, param_counts, retrofit
from smf_lightning.models.loading import load_base_model

RESULTS = Path(__file__).parent / "results"


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b-offline")
    ap.add_argument("--layers", default="6,12,18")
    ap.add_argument("--n-slots", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS / "bench_memory"))
    args = ap.parse_args()

    loaded = load_base_model(args.model, source="offline")
    base = loaded.model.eval()
    cfg = MemoryConfig(layers=[int(i) for i in args.layers.split(",")], n_slots=args.n_slots, heads=4, knn=16, k_dim=256)
    mem_model = retrofit(copy.deepcopy(base), cfg).eval()
    with torch.no_grad():  # non-zero values: time the real memory path, not a multiply by 0
        for p in mem_model.parameters():
            if p.dim() == 2 and p.shape[0] == args.n_slots:
                p.normal_(0, 0.02)
    freeze_all_but_values(mem_model)
    for p in base.parameters():
        p.requires_grad_(True)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 20000, (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def fwd(model):
        with torch.no_grad():
            model(**batch)

    def fwd_bwd(model):
        out = model(**batch, labels=ids)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    for m in (base, mem_model):  # warm-up
        fwd(m)
        fwd_bwd(m)
    times = {k: [] for k in ("base_fwd", "mem_fwd", "base_fwd_bwd", "mem_fwd_bwd")}
    for r in range(args.repeats):
        times["base_fwd"].append(timed(lambda: fwd(base)))
        times["mem_fwd"].append(timed(lambda: fwd(mem_model)))
        times["base_fwd_bwd"].append(timed(lambda: fwd_bwd(base)))
        times["mem_fwd_bwd"].append(timed(lambda: fwd_bwd(mem_model)))
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k}={v[-1]:.3f}s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": loaded.info,
        "memory": cfg.to_dict(),
        "param_counts": param_counts(mem_model),
        "batch": [args.batch, args.seq],
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "median_s": med,
        "all_s": times,
        "ratio_fwd": med["mem_fwd"] / med["base_fwd"],
        "ratio_fwd_bwd": med["mem_fwd_bwd"] / med["base_fwd_bwd"],
        "target_ratio_fwd": 1.10,
    }
    result["meets_target"] = result["ratio_fwd"] <= 1.10
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    with out.with_suffix(".csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["measure", "base_s", "retrofitted_s", "ratio"])
        w.writerow(["forward", f"{med['base_fwd']:.4f}", f"{med['mem_fwd']:.4f}", f"{result['ratio_fwd']:.3f}"])
        w.writerow(["forward+backward", f"{med['base_fwd_bwd']:.4f}", f"{med['mem_fwd_bwd']:.4f}", f"{result['ratio_fwd_bwd']:.3f}"])
    print(f"\n{'measure':<18}{'base (s)':>10}{'retrofit (s)':>14}{'ratio':>8}")
    print(f"{'forward':<18}{med['base_fwd']:>10.3f}{med['mem_fwd']:>14.3f}{result['ratio_fwd']:>8.3f}   (target <= 1.10)")
    print(f"{'fwd+bwd':<18}{med['base_fwd_bwd']:>10.3f}{med['mem_fwd_bwd']:>14.3f}{result['ratio_fwd_bwd']:>8.3f}   (base: all weights trainable; retrofit: values only)")
    print(f"params: {result['param_counts']}\nwrote {out.with_suffix('.json')} and .csv")


if __name__ == "__main__":
    main()
