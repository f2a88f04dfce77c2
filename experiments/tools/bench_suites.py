"""Benchmark: one evaluation of each held-out suite at full size on the offline Qwen2.5-class
model (the target: a 200-item suite fits in a few minutes on this CPU).

Same suite classes, subsets and batch sizes as a run (conf/data/facts_triviaqa.yaml):
NQ-open 200 (greedy answers + answer NLL), HellaSwag 200 (4 endings, shared context),
GSM8K 100 (gold solution NLL), LAMBADA 200 (last word and passage perplexity).

    python experiments/run.py bench suites                      # writes experiments/tools/results/bench_suites.{json,csv}
    python experiments/run.py bench suites --suites hellaswag --n 200
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
DEFAULT_N = {"nq_open": 200, "hellaswag": 200, "gsm8k": 100, "lambada": 200}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suites", nargs="+", default=list(DEFAULT_N), choices=list(DEFAULT_N))
    ap.add_argument("--n", type=int, default=None, help="items per suite (default: 200, GSM8K 100)")
    ap.add_argument("--batch-size", type=int, default=16, help="data.eval_batch_size of a run")
    args = ap.parse_args()

    from smf_lightning.eval.suites import build_suite
    from smf_lightning.models.loading import load_base_model

    loaded = load_base_model("qwen2.5-0.5b-offline", source="offline")
    model, tok = loaded.model, loaded.tokenizer
    rows = []
    for name in args.suites:
        n = args.n or DEFAULT_N[name]
        opts = {"max_new_tokens": 12, "generation_batch_size": 64} if name == "nq_open" else {}
        suite = build_suite(name, n, seed=0, source="offline", **opts)
        t0 = time.perf_counter()
        metrics = suite.evaluate(model, tok, args.batch_size)
        seconds = time.perf_counter() - t0
        rows.append({"suite": name, "n_items": n, "seconds": round(seconds, 1), "threads": torch.get_num_threads(),
                     "primary_metric": suite.primary_metric, "value": metrics[suite.primary_metric], "metrics": metrics})
        print(f"{name:10s} {n:4d} items  {seconds:6.1f} s  {suite.primary_metric} {metrics[suite.primary_metric]:.4g}",
              flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_suites.json").write_text(json.dumps({"model": loaded.info.get("asset"), "rows": rows}, indent=2))
    with (RESULTS / "bench_suites.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["suite", "n_items", "seconds", "threads", "primary_metric", "value"])
        w.writeheader()
        w.writerows([{k: r[k] for k in w.fieldnames} for r in rows])
    print(f"wrote {RESULTS / 'bench_suites.json'} and .csv")


if __name__ == "__main__":
    main()
