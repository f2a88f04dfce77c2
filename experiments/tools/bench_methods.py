"""Benchmark: one optimizer step of SMF vs full finetuning vs LoRA on the same batch.

Each method runs in its own subprocess (so peak RSS is its own), on the offline
Qwen2.5-class model, same batch of fact-injection-like sequences, with the settings of
conf/method/*.yaml (SMF: memory at layer 12, N = 16,384, KL-free `tf` selection so no
background pass is needed — selection cost is the same for every scored selector).

    python experiments/run.py bench methods            # writes experiments/tools/results/bench_methods.{json,csv}

Targets (experiments/headline/REPORT.md, "Performance"): SMF step <= 0.6 x full finetuning's, SMF peak memory <= 0.5 x.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def one_method(method: str, steps: int, batch: int, seq: int, layers: list[int]) -> dict:
    import torch

    from smf_lightning.memory import MemoryConfig, retrofit
    from smf_lightning.methods import build_method
    from smf_lightning.models.loading import load_base_model

    loaded = load_base_model("qwen2.5-0.5b-offline", source="offline")
    model = loaded.model
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cfgs = {
        "smf": {"name": "smf", "selector": "tf", "top_t": 500, "optimizer": "adam", "lr": 1.0, "accumulate": 1},
        "full_ft": {"name": "full_ft", "optimizer": "adamw", "lr": 1e-5, "grad_clip": 1.0, "accumulate": 1},
        "lora": {"name": "lora", "optimizer": "adamw", "lr": 1e-3, "grad_clip": 1.0, "accumulate": 1, "r": 16,
                 "alpha": 32, "dropout": 0.0,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
    }
    if method == "smf":
        retrofit(model, MemoryConfig(layers=layers, n_slots=16384, heads=4, knn=16, k_dim=256))
    module = build_method(cfgs[method], model)
    opt = module.configure_optimizers()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 20000, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 2] = -100  # loss on the "answer" half, like fact injection
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    class _Opt:  # the LightningOptimizer surface the methods use
        optimizer = opt

        def step(self):
            opt.step()

    times = []
    model.train()
    for i in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        module.on_accumulation_start()
        loss = module.lm_loss(b)
        loss.backward()
        module.after_backward(b)
        module.take_optimizer_step(_Opt())
        if i:  # first step warms up (allocations, Adam state)
            times.append(time.perf_counter() - t0)
    return {
        "method": method,
        "step_s_median": statistics.median(times),
        "step_s_all": times,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_load_mb": rss_loaded,
        "trainable_params": module.trainable_param_count(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--layers", default="12")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # child-process mode
    args = ap.parse_args()
    layers = [int(i) for i in args.layers.split(",")]
    if args.only:
        print(json.dumps(one_method(args.only, args.steps, args.batch, args.seq, layers)))
        return
    results = {}
    for method in ("smf", "lora", "full_ft"):
        print(f"running {method} ...", flush=True)
        out = subprocess.run([sys.executable, __file__, "--only", method, "--steps", str(args.steps), "--batch",
                              str(args.batch), "--seq", str(args.seq), "--layers", args.layers],
                             capture_output=True, text=True, check=True)
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[method]
        print(f"  {method}: step {r['step_s_median']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    smf, ft = results["smf"], results["full_ft"]
    summary = {
        "batch": [args.batch, args.seq],
        "memory_layers": layers,
        "results": results,
        "smf_over_full_ft_step": smf["step_s_median"] / ft["step_s_median"],
        "smf_over_full_ft_peak_rss": smf["peak_rss_mb"] / ft["peak_rss_mb"],
        "lora_over_full_ft_step": results["lora"]["step_s_median"] / ft["step_s_median"],
        "targets": {"step": 0.6, "peak_rss": 0.5},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_methods.json").write_text(json.dumps(summary, indent=2))
    with (RESULTS / "bench_methods.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "step_s", "peak_rss_mb", "trainable_params", "step_vs_full_ft", "rss_vs_full_ft"])
        for m, r in results.items():
            w.writerow([m, f"{r['step_s_median']:.3f}", f"{r['peak_rss_mb']:.0f}", r["trainable_params"],
                        f"{r['step_s_median'] / ft['step_s_median']:.3f}", f"{r['peak_rss_mb'] / ft['peak_rss_mb']:.3f}"])
    print(f"\nSMF / full FT: step {summary['smf_over_full_ft_step']:.2f} (target <= 0.6), "
          f"peak RSS {summary['smf_over_full_ft_peak_rss']:.2f} (target <= 0.5)")
    print(f"wrote {RESULTS / 'bench_methods.json'} and .csv")


if __name__ == "__main__":
    main()
