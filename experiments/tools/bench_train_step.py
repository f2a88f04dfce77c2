"""Benchmark: what the SMF training step costs with and without its two shortcuts.

One process, the offline Qwen2.5-class model with one memory layer at decoder layer 12
(N = 16,384), the real training batch of one fact (the 4 training templates of
conf/data/facts_triviaqa.yaml, answer-only loss), SMF with the KL-free `tf` selector at
t = 128. Three ways to compute the same loss, timed in turns (round-robin, so load changes
on a noisy machine hit all three alike):

- full_logits: every column through the LM head (what the loss did before);
- kept_logits: only columns that predict an answer token (`next_token_nll`, `logits_to_keep`);
- kept_logits+prefix_cache: the same, and the layers below 12 skipped when the batch
  repeats (`method.prefix_cache`); a fact is trained for `repeats` steps in a row
  (data.repeats_per_batch), so one step in `repeats` misses the cache. Its figure is the
  mean step over that cycle.

A step is forward + backward + slot selection + SlotAdam update. The three losses are also
compared on the same weights (they must agree to float rounding).

    python experiments/run.py bench train_step      # writes experiments/tools/results/bench_train_step.{json,csv}
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[2]


def full_logits_nll(model, batch):
    """The loss as it was computed before `logits_to_keep`: logits for every column."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                                            ignore_index=-100, reduction="sum")
    return nll, int((labels != -100).sum())


def fact_batch(tokenizer, question: str, answer: str) -> dict:
    from omegaconf import OmegaConf

    from smf_lightning.data.facts import collate_examples, encode_example, make_templates

    data = OmegaConf.load(ROOT / "conf" / "data" / "facts_triviaqa.yaml")
    templates = make_templates(OmegaConf.to_container(data.templates))
    train = [t for name, t in templates.items() if name not in data.heldout_templates]
    examples = [encode_example(tokenizer, t, question, answer, loss_on=data.loss_on) for t in train]
    return collate_examples(examples, tokenizer.pad_token_id)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=3, help="fact cycles timed per variant (after one warm-up cycle)")
    ap.add_argument("--repeats", type=int, default=5, help="steps per fact (data.repeats_per_batch of the report)")
    ap.add_argument("--layer", type=int, default=12)
    args = ap.parse_args()

    import torch

    from smf_lightning.memory import MemoryConfig, retrofit
    from smf_lightning.methods import build_method
    from smf_lightning.methods.base import next_token_nll
    from smf_lightning.methods.prefix_cache import FrozenPrefixCache
    from smf_lightning.models.loading import load_base_model

    torch.manual_seed(0)
    loaded = load_base_model("qwen2.5-0.5b-offline", source="offline")
    model, tok = loaded.model, loaded.tokenizer
    retrofit(model, MemoryConfig(layers=[args.layer], n_slots=16384, heads=4, knn=16, k_dim=256))
    module = build_method({"name": "smf", "selector": "tf", "top_t": 128, "optimizer": "adam", "lr": 1.0,
                           "accumulate": 1, "prefix_cache": 0}, model)
    opt = module.configure_optimizers()
    cache = FrozenPrefixCache(model, capacity=1)  # each fact's batch repeats in a row, then not again
    batches = [fact_batch(tok, q, a) for q, a in (
        ("Which river flows through Baghdad?", "Tigris"),
        ("Who painted the ceiling of the Sistine Chapel?", "Michelangelo"),
        ("What is the chemical symbol for tungsten?", "W"),
        ("In which year did the Berlin Wall fall?", "1989"),
    )]
    widths = [b["input_ids"].shape[1] for b in batches]
    kept = [int((b["labels"][:, 1:] != -100).any(0).sum()) for b in batches]
    print(f"batches: 4 sequences of {widths} tokens; columns through the LM head with kept logits: {kept}")

    def plain(batch):
        return next_token_nll(model, batch)

    def cached(batch):
        with cache.reuse(batch):
            return next_token_nll(model, batch)

    variants = {"full_logits": lambda b: full_logits_nll(model, b), "kept_logits": plain,
                "kept_logits+prefix_cache": cached}

    model.train()
    with torch.no_grad():  # same weights, three losses
        losses = {name: float(fn(batches[0])[0]) for name, fn in variants.items()}
    cache.entries.clear()
    cache.hits = cache.misses = 0
    print("loss (sum of answer-token NLL) on the same weights:", losses)

    class _Opt:  # the LightningOptimizer surface the methods use
        optimizer = opt

        def step(self):
            opt.step()

    def step(fn, batch) -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        module.on_accumulation_start()
        nll, n = fn(batch)
        (nll / max(n, 1)).backward()
        module.after_backward(batch)
        module.take_optimizer_step(_Opt())
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {name: [] for name in variants}
    for cycle in range(args.cycles + 1):  # cycle 0 warms up (allocations, Adam state)
        for name, fn in variants.items():
            batch = batches[cycle % len(batches)]
            per_step = [step(fn, batch) for _ in range(args.repeats)]
            if cycle:
                times[name].append(statistics.fmean(per_step))
            print(f"cycle {cycle} {name}: {statistics.fmean(per_step):.2f} s/step "
                  f"({', '.join(f'{t:.2f}' for t in per_step)})", flush=True)

    base = statistics.median(times["full_logits"])
    rows = [{"variant": name, "step_s": statistics.median(ts), "step_s_cycles": ts,
             "vs_full_logits": statistics.median(ts) / base} for name, ts in times.items()]
    summary = {"model": loaded.info.get("name"), "memory_layer": args.layer, "n_slots": 16384,
               "batch_widths": widths, "kept_columns": kept, "repeats_per_fact": args.repeats,
               "cycles": args.cycles, "losses_same_weights": losses,
               "cache_hits": cache.hits, "cache_misses": cache.misses, "threads": torch.get_num_threads(), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_train_step.json").write_text(json.dumps(summary, indent=2))
    with (RESULTS / "bench_train_step.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "step_s", "vs_full_logits"])
        for r in rows:
            w.writerow([r["variant"], f"{r['step_s']:.3f}", f"{r['vs_full_logits']:.3f}"])
    print("\n| variant | s/step (median of cycles) | vs full logits |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['step_s']:.2f} | {r['vs_full_logits']:.2f} |")
    print(f"wrote {RESULTS / 'bench_train_step.json'} and .csv")


if __name__ == "__main__":
    main()
