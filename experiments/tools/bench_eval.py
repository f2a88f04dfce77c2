"""Benchmark: one evaluation point of an SMF run with and without the kept frozen-prefix states
(the target: "an evaluation point of the four suites at 200 items (GSM8K 100) plus recall
of 200 facts in <= 0.5 x today's time"; docs/benchmarks.md, experiments/tools/BENCHMARKS.md).

The offline Qwen2.5-class model with the quickstart's memory (conf/experiment/facts_seq_quick.yaml:
one memory layer at decoder layer 15 of 24), memory values set to random non-zero rows (a trained
memory; the prefix below layer 15 is the base model's either way). The suites with a run's options
and batch sizes (conf/data/facts_triviaqa.yaml: NQ-open greedy answers + answer NLL, HellaSwag,
GSM8K, LAMBADA), and fact recall as a run measures it (datamodule.evaluate_recall, i.e.
eval/suites.evaluate_task_recall): the facts split into --tasks tasks, every fact under every
template (4 training + 1 held-out), one greedy pass per task (the point after the last task,
or the "before" point, sees all tasks; a point after task i reuses tasks 0..i alike). Four kinds of point, one
process, the same weights, so every point decodes the same tokens and their numbers must be equal:

- today: the evaluation before the speed-ups, the baseline of the target's "<= 0.5 x": no kept
  states, and greedy decoding as it was (every row decoded until all rows are done, the prompt's
  logits through a strided slice; eval/scoring._greedy_decode(legacy=True));
- uncached: without the kept states, greedy decoding as now (finished rows leave the batch down
  to 16 rows, the prompt's logits gathered contiguously): what LoRA or full finetuning pays;
- fill: the first point with callbacks.eval_prefix_cache (keeps every forward's prefix states);
- cached: any later point whose answers are the fill's (layers 0..14 skipped for every forward,
  the decoding steps included: they are kept keyed by the batch's tokens so far);
- redrawn: a later point after the memory values are drawn anew (--redrawn), with the same kept
  states, and its uncached twin: the decoding steps of a batch whose tokens differ from the
  fill's from some step on run in full from there (their share is printed), and the numbers
  must still equal the uncached point's.

Columns: cached/today is the target's ratio; uncached/today is what the decoding changes alone
give; cached/uncached what the kept states alone give. Scores come from the same code in every
mode (equal to the last bit); the decoding changes could only move a greedy text where two
logits tie within float rounding ("same as today" says whether any did).

A short warm-up runs first (one-time allocations would otherwise land on the first point); with
--rounds R the cached, uncached and today points alternate R times after the fill (load changes on
a shared machine then hit them alike) and each figure is the median.

    python experiments/run.py bench eval                       # 200 items (GSM8K 100), 200 facts
    python experiments/run.py bench eval --n 32 --facts 32     # a quick run (GSM8K n/2)
    nice -n 5 python experiments/run.py bench eval --n 32 --facts 40 --out bench_eval_n32   # what fits in ~30 min on 2 shared cores
    nice -n 15 python experiments/run.py bench eval --n 8 --facts 16 --tasks 1 --threads 1 --clock cpu --out bench_eval_n8_f16_cpu  # beside other jobs
    python experiments/run.py bench eval --lean --clock cpu --out bench_eval_n200_lean   # the target's size: today, fill, cached
Writes experiments/tools/results/bench_eval.{json,csv}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SUITES = ("nq_open", "hellaswag", "gsm8k", "lambada")


def build(args):
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from smf_lightning.models.build import load_model, maybe_retrofit
    from smf_lightning.train import conf_dir
    from smf_lightning.data.facts import Fact, make_templates, seeded_order
    from smf_lightning.data.sources import load_source
    from smf_lightning.eval.suites import FactRecallSuite, build_suite
    from smf_lightning.memory import memory_layers
    from smf_lightning.memory.retrofit import freeze_all_but_values

    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        cfg = compose(config_name="train", overrides=["experiment=facts_seq_quick", *args.override])
    model, tok, info = load_model(cfg)
    model = maybe_retrofit(cfg, model, info)
    freeze_all_but_values(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for mem in memory_layers(model).values():
            mem.values.weight.normal_(0, 0.02)  # a trained memory: non-zero rows
    suites = {}
    for name in SUITES:
        opts = OmegaConf.to_container(cfg.data.suites.get(name) or {}, resolve=True)
        opts.pop("n_items", None)
        if name == "nq_open":
            opts.setdefault("generation_batch_size", int(cfg.data.generation_batch_size))
        n = args.n_gsm8k if name == "gsm8k" else args.n
        suites[name] = build_suite(name, n, seed=0, source="offline", **opts)
    trivia = load_source("triviaqa", source="offline")
    order = seeded_order(len(trivia), 0, "bench_eval/facts")
    items = [trivia.items[i] for i in order if len(trivia.items[i].answers[0].split()) <= 5][: args.facts]
    facts = [Fact(it.id, it.question, it.answers[0], tuple(it.answers)) for it in items]
    templates = make_templates(OmegaConf.to_container(cfg.data.templates, resolve=True))
    per_task = -(-len(facts) // args.tasks)
    recall = {j: {name: FactRecallSuite(facts[j * per_task:(j + 1) * per_task], t, int(cfg.data.recall_max_new_tokens),
                                        name=f"task{j}/{name}") for name, t in templates.items()}
              for j in range(args.tasks)}
    return cfg, model, tok, suites, recall


def evaluate_point(cfg, model, tok, suites, recall, states, today: bool = False, clock=time.perf_counter
                   ) -> tuple[dict, dict]:
    """(seconds per part, results per part) of one evaluation point; `today`: with the greedy
    decoding loop from before the speed-ups (the baseline)."""
    import contextlib
    import functools
    from unittest import mock

    from smf_lightning.eval import scoring
    from smf_lightning.eval.suites import evaluate_task_recall

    seconds, results = {}, {}
    scope = (lambda name: states.scope(name)) if states is not None else (lambda name: contextlib.nullcontext())
    decoding = (mock.patch.object(scoring, "_greedy_decode", functools.partial(scoring._greedy_decode, legacy=True))
                if today else contextlib.nullcontext())
    with states.active(model) if states is not None else contextlib.nullcontext(), decoding:
        t0 = clock()
        with scope("fact_recall"):
            items: dict = {}
            evaluate_task_recall(model, tok, recall, int(cfg.data.generation_batch_size), items)
            results["fact_recall"] = items
        seconds["fact_recall"] = clock() - t0
        for name, suite in suites.items():
            t0 = clock()
            with scope(name):
                suite.evaluate(model, tok, int(cfg.data.eval_batch_size))
            seconds[name] = clock() - t0
            results[name] = dict(suite.last_items)
    return seconds, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="items of NQ-open, HellaSwag, LAMBADA")
    ap.add_argument("--n-gsm8k", type=int, default=None, help="GSM8K items (default: n / 2)")
    ap.add_argument("--facts", type=int, default=200, help="facts recalled (each under every template)")
    ap.add_argument("--tasks", type=int, default=5, help="tasks the facts are split into (recall batches per task)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed seconds; cpu: this process's CPU seconds (time.process_time), which a "
                         "machine shared with other jobs distorts far less; use it with --threads 1, or idle "
                         "worker threads spinning would count")
    ap.add_argument("--rounds", type=int, default=1, help="cached/uncached/today rounds after the fill (medians)")
    ap.add_argument("--lean", action="store_true",
                    help="three points only: today, fill, cached (the headline ratio at full size in about half the "
                         "time; the fill, which computes every layer while it keeps the states, is the reference)")
    ap.add_argument("--redrawn", action="store_true",
                    help="also a point after the memory values are drawn anew, cached and uncached")
    ap.add_argument("--out", default="bench_eval", help="results file stem under experiments/tools/results/")
    ap.add_argument("override", nargs="*", help="extra Hydra overrides (e.g. model.memory.layers=[12])")
    args = ap.parse_args()
    args.n_gsm8k = args.n_gsm8k or max(1, args.n // 2)

    import torch

    from smf_lightning.eval.prefix_states import EvalPrefixStates
    from smf_lightning.memory import memory_layers

    if args.threads:
        torch.set_num_threads(args.threads)
    from smf_lightning.eval.scoring import generate_greedy, score_continuations

    load_at_start = os.getloadavg()
    cfg, model, tok, suites, recall = build(args)
    prompts = [s.template.prompt(f.question) for task in recall.values() for s in task.values() for f in s.facts]
    generate_greedy(model, tok, prompts[:4], 2, 4)  # warm-up
    score_continuations(model, tok, prompts[:4], [" a"] * 4, 4)
    states = EvalPrefixStates()
    if args.lean:
        schedule = [("today", None), ("fill", states), ("cached", states)]
    else:
        schedule = [("today", None), ("uncached", None), ("fill", states)] + [
            ("cached", states), ("uncached", None), ("today", None)] * args.rounds
    labels = tuple(dict.fromkeys(label for label, _ in schedule))  # the points run, first-run order
    times: dict[str, list[dict]] = {k: [] for k in labels}
    results: dict[str, list] = {k: [] for k in labels}
    for label, st in schedule:
        seconds, res = evaluate_point(cfg, model, tok, suites, recall, st, today=label == "today",
                                      clock=time.process_time if args.clock == "cpu" else time.perf_counter)
        times[label].append(seconds)
        results[label].append(res)
        print(f"{label:9s} " + "  ".join(f"{k} {v:6.1f} s" for k, v in seconds.items()) + f"  total {sum(seconds.values()):7.1f} s",
              flush=True)
    redrawn = {}
    if args.redrawn:
        steps_before = (states.step_hits, states.step_misses)
        torch.manual_seed(1)
        with torch.no_grad():
            for mem in memory_layers(model).values():
                mem.values.weight.normal_(0, 0.02)
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        for label, st in (("redrawn", states), ("redrawn_uncached", None)):
            seconds, res = evaluate_point(cfg, model, tok, suites, recall, st, clock=clock)
            redrawn[label] = (seconds, res)
            print(f"{label:9s} " + "  ".join(f"{k} {v:6.1f} s" for k, v in seconds.items())
                  + f"  total {sum(seconds.values()):7.1f} s", flush=True)
        hits, misses = states.step_hits - steps_before[0], states.step_misses - steps_before[1]
        redrawn["steps"] = {"hits": hits, "misses": misses}
        redrawn["same_numbers"] = redrawn["redrawn"][1] == redrawn["redrawn_uncached"][1]
        redrawn["changed_vs_fill"] = redrawn["redrawn"][1] != results["fill"][0]
        print(f"redrawn memory: decoding steps kept {hits} of {hits + misses}; numbers equal to uncached: "
              f"{redrawn['same_numbers']}; anything changed vs the fill: {redrawn['changed_vs_fill']}")
    reference = results["fill" if args.lean else "uncached"][0]
    same = all(r == reference for label in labels if label != "today" for r in results[label])
    same_as_today = all(r == reference for r in results["today"])
    parts = ["fact_recall", *suites]
    sizes = {"fact_recall": f"{args.facts} facts x {len(prompts) // max(args.facts, 1)} templates, {args.tasks} tasks",
             **{n: len(s.items) for n, s in suites.items()}}
    rows = []
    for part in [*parts, "total"]:
        def get(label):
            if not times.get(label):
                return float("nan")  # --lean: no uncached point
            return statistics.median(sum(t.values()) if part == "total" else t[part] for t in times[label])
        t, u, f, c = (get(label) for label in ("today", "uncached", "fill", "cached"))
        rows.append({"part": part, "items": sizes.get(part, ""), "today_s": round(t, 2), "uncached_s": round(u, 2),
                     "fill_s": round(f, 2), "cached_s": round(c, 2), "cached_vs_today": round(c / t, 3),
                     "uncached_vs_today": round(u / t, 3), "cached_vs_uncached": round(c / u, 3),
                     "fill_vs_today": round(f / t, 3)})
    print(f"\n{'part':12s} {'items':>22s} {'today':>8s} {'uncached':>9s} {'fill':>8s} {'cached':>8s} "
          f"{'cached/today':>13s} {'uncached/today':>15s} {'cached/uncached':>16s} {'fill/today':>11s}")
    for r in rows:
        print(f"{r['part']:12s} {str(r['items']):>22s} {r['today_s']:8.1f} {r['uncached_s']:9.1f} {r['fill_s']:8.1f} "
              f"{r['cached_s']:8.1f} {r['cached_vs_today']:13.3f} {r['uncached_vs_today']:15.3f} "
              f"{r['cached_vs_uncached']:16.3f} {r['fill_vs_today']:11.3f}")
    for part in [*parts, "total"] if redrawn else ():
        def got(label, part=part):
            return sum(redrawn[label][0].values()) if part == "total" else redrawn[label][0][part]
        row = next(r for r in rows if r["part"] == part)
        row.update(redrawn_s=round(got("redrawn"), 2), redrawn_uncached_s=round(got("redrawn_uncached"), 2),
                   redrawn_vs_today=round(got("redrawn") / row["today_s"], 3) if row["today_s"] else None)
        print(f"{part:12s} redrawn {got('redrawn'):8.1f} s, uncached {got('redrawn_uncached'):8.1f} s, "
              f"redrawn/today {row['redrawn_vs_today']:.3f}")
    print(f"same numbers at every point: {same}; same as today (greedy texts too): {same_as_today}; kept {states.nbytes / 2**20:.0f} MB, {states.hits} hits, "
          f"{states.misses} misses; decoding steps {states.step_hits} hits, {states.step_misses} misses")
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"model": cfg.model.name, "load_average_at_start": load_at_start, "memory_layers": sorted(memory_layers(model)), "threads": torch.get_num_threads(),
            "load_average_at_end": os.getloadavg(), "n": args.n, "n_gsm8k": args.n_gsm8k, "facts": args.facts, "tasks": args.tasks,
            "prompts_recall": len(prompts), "eval_batch_size": int(cfg.data.eval_batch_size),
            "generation_batch_size": int(cfg.data.generation_batch_size), "same_numbers": same,
            "same_as_today": same_as_today,
            "rounds": args.rounds, "clock": args.clock, "points": {k: v for k, v in times.items()},
            "kept_mb": states.nbytes / 2**20, "hits": states.hits, "misses": states.misses,
            "step_hits": states.step_hits, "step_misses": states.step_misses,
            **({"redrawn": {"steps": redrawn["steps"], "same_numbers": redrawn["same_numbers"],
                            "changed_vs_fill": redrawn["changed_vs_fill"],
                            "points": {k: redrawn[k][0] for k in ("redrawn", "redrawn_uncached")}}} if redrawn else {})}
    (RESULTS / f"{args.out}.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    with (RESULTS / f"{args.out}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {RESULTS / args.out}.json and .csv")
    if not same or (redrawn and not redrawn["same_numbers"]):
        raise SystemExit("the cached points' numbers differ from the uncached point's")
    if not same_as_today:
        print("note: a greedy text differs from today's decoding loop (two logits tied within float rounding)")


if __name__ == "__main__":
    main()
