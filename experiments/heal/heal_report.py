"""Healing and data-driven keys on the offline Qwen2.5-class model, at a CPU-sized budget.

Measures, on held-out LAMBADA passages (never trained on, disjoint from the lambada suite):
- token perplexity of the base model, of additive memory (values 0: must equal the base),
  of replace memory before healing, and after a few dozen healing steps;
- slot usage (touched share, top-1% hub share, effective share) of the memory with random
  keys and with k-means keys fitted on the healing training passages;
- the same on held-out HellaSwag text (another domain: healing trains on LAMBADA);
- variants (--runs): lower lr, keys and query frozen ("fixed routing"), k-means keys first.

    python experiments/heal/heal_report.py             # ~8 min on 2 busy CPU cores (~8 s per healing step)
    python experiments/heal/heal_report.py --runs replace,replace_lowlr,replace_fixed_routing,replace_kmeans_fixed_routing
    python experiments/heal/heal_report.py --steps 300 --batch-size 8 --max-len 128   # a real budget (GPU)

A forward pass of the 0.5B model costs ~35 ms per token on 2 shared CPU cores, so the
defaults are tiny: 30 steps of 4 x 32 tokens, 24 held-out passages of 32 tokens.

Writes results/heal_report.json, heal_ppl_curve.png and heal_slot_usage.png beside it (HEAL.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from smf_lightning.stages.heal import build_healing_corpus, heal_memory, make_batches, perplexity, training_batches
from smf_lightning.memory import MemoryConfig, retrofit
from smf_lightning.memory.key_init import init_keys_kmeans
from smf_lightning.models.loading import load_base_model
from smf_lightning.selection.stats import slot_usage_stats


# name -> (k-means keys first?, trainable memory parameters, lr multiplier)
ALL = ("query", "keys", "values", "gate", "out")
RUNS = {
    "replace": (False, ALL, 1.0),  # the seed's recipe: every memory parameter
    "replace_lowlr": (False, ALL, 0.1),
    "replace_fixed_routing": (False, ("values", "gate", "out"), 1.0),  # keys and query frozen
    "replace_kmeans": (True, ALL, 1.0),
    "replace_kmeans_fixed_routing": (True, ("values", "gate", "out"), 1.0),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-0.5b-offline")
    p.add_argument("--layer", type=int, default=12, help="decoder layer that gets the memory")
    p.add_argument("--n-slots", type=int, default=4096)
    p.add_argument("--steps", type=int, default=30, help="healing steps")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=32, help="tokens per passage")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-train", type=int, default=500, help="training passages")
    p.add_argument("--n-heldout", type=int, default=24, help="held-out passages")
    p.add_argument("--reserved", type=int, default=1000, help="suite items never used (heal.reserved_suite_items)")
    p.add_argument("--kmeans-tokens", type=int, default=4096, help="tokens k-means is fitted on (>= sqrt(N))")
    p.add_argument("--runs", default="replace", help="comma-separated healing runs: " + ", ".join(RUNS))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def fresh():
        return load_base_model(args.model, source="offline")

    loaded = fresh()
    tok = loaded.tokenizer
    corpus = build_healing_corpus(tok, {"lambada": args.n_train}, n_heldout=args.n_heldout, max_len=args.max_len,
                                  seed=0, reserved=args.reserved, source="offline")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    heldout = make_batches(corpus.heldout, 8, pad)
    fit = make_batches(corpus.train, args.batch_size, pad)
    # Healing trains on LAMBADA (books): held-out LAMBADA perplexity can then beat the base
    # model by in-domain adaptation. HellaSwag narratives (never trained on) check that the
    # model did not just specialise.
    other_corpus = build_healing_corpus(tok, {"hellaswag": 1}, n_heldout=args.n_heldout, max_len=args.max_len,
                                        seed=0, reserved=args.reserved, source="offline")
    other = make_batches(other_corpus.heldout, 8, pad)
    mem = dict(layers=[args.layer], n_slots=args.n_slots, heads=4, knn=16, k_dim=256)
    report = {"model": loaded.info, "args": vars(args), "corpus": corpus.info, "ppl": {}, "ppl_other_domain": {}, "slot_usage": {}, "healing": {}}

    base_ppl = perplexity(loaded.model, heldout)
    report["ppl"]["base"] = base_ppl
    report["ppl_other_domain"]["base"] = perplexity(loaded.model, other)
    print(f"base ppl {base_ppl:.3f}  ({time.perf_counter() - t0:.0f}s)", flush=True)

    # additive: values 0 -> the base model; slot usage with random keys, then with k-means keys
    model = retrofit(loaded.model, MemoryConfig(mode="additive", **mem))
    report["ppl"]["additive"] = perplexity(model, heldout)
    report["ppl_other_domain"]["additive"] = perplexity(model, other)
    report["slot_usage"]["random_keys"] = slot_usage_stats(model, heldout)[args.layer]
    report["kmeans"] = init_keys_kmeans(model, fit, seed=0, max_tokens=args.kmeans_tokens)[args.layer]
    report["slot_usage"]["kmeans_keys"] = slot_usage_stats(model, heldout)[args.layer]
    print("additive ppl", report["ppl"]["additive"], "usage", report["slot_usage"], f"({time.perf_counter() - t0:.0f}s)", flush=True)
    del model, loaded

    for name in args.runs.split(","):
        kmeans, trainable, lr_mult = RUNS[name]
        model = retrofit(fresh().model, MemoryConfig(mode="replace", **mem))
        if kmeans:
            init_keys_kmeans(model, fit, seed=0, max_tokens=args.kmeans_tokens)
        report["ppl_other_domain"][f"{name}_before_healing"] = perplexity(model, other)
        result = heal_memory(
            model, training_batches(corpus.train, args.batch_size, pad, seed=0), heldout,
            lr=args.lr * lr_mult, betas=(0.9, 0.999), weight_decay=0.0, grad_clip=1.0,
            max_steps=args.steps, eval_every=args.eval_every, target_ppl=None, trainable=trainable, progress=True,
        )
        report["ppl_other_domain"][f"{name}_after_healing"] = perplexity(model, other)
        report["ppl"][f"{name}_before_healing"] = result.before_ppl
        report["ppl"][f"{name}_after_healing"] = result.final_ppl
        report["healing"][name] = {"steps": result.steps, "seconds": result.seconds, "history": result.history}
        report["slot_usage"][f"{name}_after_healing"] = slot_usage_stats(model, heldout)[args.layer]
        print(name, f"ppl {result.before_ppl:.2f} -> {result.final_ppl:.2f} in {result.steps} steps ({result.seconds:.0f}s)", flush=True)
        del model

    report["seconds_total"] = time.perf_counter() - t0
    (out / "heal_report.json").write_text(json.dumps(report, indent=2, default=str))
    plot(report, out)
    print(json.dumps({k: report[k] for k in ("ppl", "ppl_other_domain")}, indent=2))


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, run in report["healing"].items():
        pts = [(r["step"], r["heldout_ppl"]) for r in run["history"] if r["heldout_ppl"] is not None]
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.axhline(report["ppl"]["base"], color="k", ls="--", lw=1, label=f"base / additive ({report['ppl']['base']:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("healing step")
    ax.set_ylabel("held-out LAMBADA perplexity")
    ax.set_title(f"healing replace memory (layer {report['args']['layer']}, N={report['args']['n_slots']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "heal_ppl_curve.png", dpi=110)
    plt.close(fig)

    usage = report["slot_usage"]
    metrics = ["touched_share", "effective_slots_share", "hub_share_top1pct"]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    width = 0.8 / len(usage)
    for k, (name, stats) in enumerate(usage.items()):
        ax.bar([i + k * width for i in range(len(metrics))], [stats[m] for m in metrics], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(metrics))], metrics, fontsize=8)
    ax.set_title("slot usage on held-out text", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "heal_slot_usage.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
