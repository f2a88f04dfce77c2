"""Benchmark: one optimizer step of SMF vs LoRA vs full finetuning, each built as a run builds it.

Each method runs in its own process (so peak RSS is its own). The config is composed from conf/
with Hydra's compose API (``--experiment``, default facts_seq_quick: the recipe's memory of
conf/memory/recipe.yaml and SMF of conf/method/smf.yaml on the offline Qwen2.5-class model;
``method=lora`` / ``method=full_ft`` for the baselines; ``--override`` adds Hydra overrides, e.g.
``trainer.threads=1``), and the model and the method come from the continual stage's own
builders (models/build.py, stages/continual.py): the data module, the retrofit, the ZCA
whitening, the background statistics of the KL selector (with the hub mask), the slot budget
resolved for the stream, and the task's per-fact slot selection made at the start of the task
(methods/smf.py ``on_train_epoch_start``). Whitening and background statistics come from
$SMF_CACHE when a run has computed them. Every method then takes the same steps on the same
batch, the first training batch of task 0 (data.train_batch_size sequences), as the run's
``training_step`` takes them (zero_grad, loss, backward, counts, optimizer step).

Timed: a warm-up step (allocations, optimizer state), then ``--steps`` steps, medians; in elapsed
seconds, or with ``--clock cpu`` in the process's CPU seconds (steadier on a CPU shared with
other jobs). SMF is timed twice: with its frozen-prefix cache emptied before each step (``smf``:
every decoder layer runs, as for the baselines; a batch's first pass over the task) and with the
batch's states kept (``smf_seen_batch``: a later pass, the layers below the memory skipped).
Phases of a step: forward, backward, counts (slot counts and the read gate's queries),
selection, ledger (memory/ledger.py), optimizer, gate_keys (write keys of the updated rows),
other; and ``memory_read``, the part of forward spent in the memory layers themselves
(addressing, read gate, value gather). ``keyed_read_share``: the share of the batch's reads that
hit a row some earlier fact wrote (what the read gate checks), before the timed steps. Once per
task, not per step: ``task_start_s``, the task-start hook (SMF with ``select_per=fact``: the
per-fact selection, a forward over the task's training sequences and the scoring).

``--facts-seen 200,1000``: SMF alone, the cost of one step after the memory already owns the
rows of N facts, one process per N (and N = 0). What grows with the stream is filled in as the
method would have left it (``simulate_facts_seen``): N x b slots owned (b: the budget resolved
for a stream of those N facts and the experiment's own), drawn at random among the slots a fact
may select; the fact ledger's entries and pre-stream rows (recorded by the ledger's own
``record_step``); the owned rows' values and, with the read gate, their write keys; SlotAdam's
row state only under ``method.optimizer_state=carry`` (the recipe's ``fresh`` clears it at each
task). The task's per-fact selection is then made as a later task's would be (owned slots
excluded). Random ownership is an approximation: real facts own slots their questions read.

    python experiments/run.py bench methods --clock cpu --override trainer.threads=1
        # -> results/bench_methods.{json,csv}
    python experiments/run.py bench methods --clock cpu --override trainer.threads=1 --facts-seen 200,1000
        # -> results/bench_methods_facts_seen.{json,csv}
    python experiments/run.py bench methods --tiny --steps 1     # the tiny model, seconds (tests)

Targets (experiments/headline/REPORT.md, "Performance"): SMF step <= 0.6 x full finetuning's,
SMF peak memory <= 0.5 x. Last figures: experiments/tools/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
METHODS = ("smf", "lora", "full_ft")
# the tiny test model with the recipe's memory levers at its size (conf/experiment/tiny.yaml:
# two memory layers of 256 slots; method: conf/method/smf.yaml with top_t 16)
TINY = ["experiment=tiny", "model.memory.heads=1", "model.memory.input_norm=zca", "model.memory.whiten_on=loss",
        "model.memory.read_gate=0.5"]
PHASES = ("forward", "backward", "counts", "selection", "ledger", "optimizer", "gate_keys", "other")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: this process's CPU seconds (all its threads)
SUBPHASES = ("memory_read",)  # part of forward: the memory layers' own forward (addressing, read gate, value gather)


def compose(method: str, experiment: str, overrides: list[str], tiny: bool):
    """The run config of ``method`` as ``python -m smf_lightning.train`` would compose it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from smf_lightning.train import conf_dir

    head = TINY if tiny else [f"experiment={experiment}"]
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return hydra_compose("train", overrides=[*head, f"method={method}", *overrides])


class BenchTrainer:
    """What the methods' task hooks read of the Trainer (setup, on_train_epoch_start)."""

    precision = "32-true"

    def __init__(self, datamodule, optimizer, current_epoch: int = 0):
        self.datamodule, self.optimizers, self.current_epoch = datamodule, [optimizer], current_epoch


def rss_mb() -> tuple[float, float]:
    """(peak, current) resident set of this process in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return peak, current


def simulate_facts_seen(module, n_facts: int, facts_per_task: int, opt, seed: int = 0) -> dict:
    """The memory as SMF leaves it after ``n_facts`` facts (module doc): the slot budget of the
    longer stream, ownership, the ledger, the owned rows' values and write keys, carried row state."""
    import torch

    from smf_lightning.optim import SlotAdam

    tasks_before = math.ceil(n_facts / facts_per_task)
    dm = module.trainer.datamodule
    # the budget of a stream of the seen facts' tasks and the experiment's own (methods/smf.py setup)
    module.budget = module.resolve_budget(tasks_before + dm.n_tasks, dm.facts_per_task)
    module.top_t = per_fact = module.budget.top_t
    g = torch.Generator().manual_seed(seed)
    owned = {}
    for i, mem in module.memories.items():
        free = torch.nonzero(~(module.hub_mask[i] | module.owned[i])).squeeze(1)  # what a fact may select
        take = min(n_facts * per_fact, free.numel())
        owned[i] = free[torch.randperm(free.numel(), generator=g)[:take]]
    for f in range(n_facts):  # each fact's rows, recorded before they move (take_optimizer_step)
        fid, task = f"seen-{f}", f // facts_per_task
        module.ledger.describe(fid, task, f"simulated question {f}?", f"answer {f}")
        rows = {i: r[f * per_fact:(f + 1) * per_fact] for i, r in owned.items()}
        module.ledger.record_step(module.memories, rows, [fid], task)
    with torch.no_grad():
        for i, rows in owned.items():
            mem = module.memories[i]
            module.owned[i][rows] = True  # on_train_epoch_end of the tasks that took them
            mem.values.weight[rows] = torch.randn(rows.numel(), mem.v_dim, generator=g) * 0.02
            if i in module.gated:  # unit write keys, one read's mass each
                rows = rows.sort().values
                keys = torch.nn.functional.normalize(torch.randn(rows.numel(), mem.heads, mem.k_dim, generator=g), dim=-1)
                mem.add_writes(rows, keys, torch.ones(rows.numel(), mem.heads))
            if module.optimizer_state == "carry" and isinstance(opt, SlotAdam):
                opt._state_rows(mem.values.weight, rows)  # a state row for every slot selected before
    module.trainer.current_epoch = tasks_before  # the ledger numbers the task in progress after them
    return {"facts_seen": n_facts, "tasks_before": tasks_before, "slots_per_fact": per_fact,
            "budget": module.budget.to_dict(), "owned_slots": {str(i): int(r.numel()) for i, r in owned.items()}}


def keyed_read_share(module) -> dict:
    """Per gated memory layer, the share of the last forward's reads that hit a row with a write key."""
    import torch

    out = {}
    for i in module.gated:
        mem = module.memories[i]
        acc = mem.last_access
        idx = acc.indices[acc.mask()]  # [P, heads, knn]
        head = torch.arange(mem.heads).view(1, mem.heads, 1).expand_as(idx)
        out[str(i)] = float((mem.write_mass[idx, head] > 0).float().mean()) if idx.numel() else 0.0
    return out


def build(method: str, experiment: str, overrides: list[str], tiny: bool, facts_seen: int | None = None,
          clock=time.perf_counter):
    """(cfg, module, optimizer, data module, model info, simulated, task_start_s) of ``method``, built by
    the continual stage's own builders up to the start of task 0 (after ``facts_seen`` simulated facts,
    SMF); task_start_s: the task-start hook's seconds on ``clock`` (SMF: the per-fact selection)."""
    import lightning as L
    import torch

    from smf_lightning.methods import method_class
    from smf_lightning.models.build import background_stats, load_model, maybe_retrofit, prepare_memory
    from smf_lightning.stages.continual import build_datamodule, build_method
    from smf_lightning.train import check

    cfg = compose(method, experiment, overrides, tiny)
    check(cfg)  # what a run checks before loading anything (slot budget included)
    if cfg.trainer.get("threads"):
        torch.set_num_threads(int(cfg.trainer.threads))
    L.seed_everything(int(cfg.seed), verbose=False)
    # stages/continual.py ContinualRecipe.setup, without the evaluation, loggers, callbacks and Trainer
    model, tokenizer, info = load_model(cfg)
    dm = build_datamodule(cfg, model, tokenizer)
    model = maybe_retrofit(cfg, model, info)
    prepare_memory(cfg, model, info, dm)
    background = background_stats(cfg, model, dm) if method_class(cfg.method).needs_background else None
    module = build_method(cfg, model, background=background, dm=dm)
    opt = module.configure_optimizers()
    module.trainer = BenchTrainer(dm, opt)
    module.setup("fit")  # SMF: the slot budget of the stream
    simulated = simulate_facts_seen(module, facts_seen, dm.facts_per_task, opt) if facts_seen else None
    module.model.train()
    t = clock()
    module.on_train_epoch_start()  # SMF: fresh optimizer state, the task's facts in the ledger, per-fact slots
    return cfg, module, opt, dm, info, simulated, clock() - t


def one_method(method: str, experiment: str, overrides: list[str], tiny: bool, steps: int,
               facts_seen: int | None, clock_name: str = "wall") -> dict:
    """The timed steps of ``method`` (module doc): per variant, medians of the step and its phases."""
    import torch
    from omegaconf import OmegaConf

    clock = CLOCKS[clock_name]

    t0 = time.perf_counter()
    cfg, module, opt, dm, info, simulated, task_start_s = build(method, experiment, overrides, tiny, facts_seen, clock)
    build_s = time.perf_counter() - t0
    rss_built = rss_mb()
    batch = dm.collate(dm.train_batches(0)[0])
    smf = method == "smf"

    phase: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t = clock()
            try:
                return fn(*a, **k)
            finally:
                phase[name] = phase.get(name, 0.0) + clock() - t
        return wrapper

    if smf:  # instrument the method's own step (no copy of it): its parts' times
        module._step_selection = timed("selection", module._step_selection)
        module._write_keys = timed("gate_keys", module._write_keys)
        module.ledger.record_step = timed("ledger", module.ledger.record_step)
        started: dict = {}
        for mem in module.memories.values():
            mem.register_forward_pre_hook(lambda m, a: started.__setitem__(m, clock()))
            mem.register_forward_hook(lambda m, a, o: phase.__setitem__(
                "memory_read", phase.get("memory_read", 0.0) + clock() - started.pop(m)))

    class Opt:  # the LightningOptimizer surface the methods use
        optimizer = opt

        def step(self):
            (timed("optimizer", opt.step) if smf else opt.step)()  # baselines: their whole step is timed below

    def step() -> dict:
        phase.clear()
        t = clock()
        opt.zero_grad(set_to_none=True)
        module.on_accumulation_start()
        loss = timed("forward", module.lm_loss)(batch)
        timed("backward", loss.backward)()
        timed("counts" if smf else "other", module.after_backward)(batch)
        if smf:
            updated = module.take_optimizer_step(Opt())
        else:  # clipping and AdamW: the whole of the baselines' step
            updated = timed("optimizer", module.take_optimizer_step)(Opt())
        total = clock() - t
        out = {"step_s": total, **{p: phase.get(p, 0.0) for p in (*PHASES, *SUBPHASES) if p != "other"}}
        out["other"] = total - sum(out[p] for p in PHASES if p != "other")
        out["updated_params"] = int(updated)
        if smf:
            out["selected_rows"] = {str(i): int(s.numel()) for i, s in module.last_selection.items()}
        return out

    def clear_prefix():
        if smf:
            module.prefix_cache.entries.clear()

    variants = {method: clear_prefix}
    if smf and module.prefix_cache.enabled:
        variants["smf_seen_batch"] = lambda: None  # the states of this batch stay kept
    keyed_before = None
    if smf:  # the reads of this batch that hit rows earlier facts wrote (before this task's steps add its own)
        with torch.no_grad():
            module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1)
        keyed_before = keyed_read_share(module)
    step()  # warm-up: allocations, optimizer state, the prefix cache filled
    results = {}
    for name, before in variants.items():
        runs = []
        for _ in range(steps):
            before()
            runs.append(step())
        med = {k: statistics.median(r[k] for r in runs) for k in ("step_s", *PHASES, *SUBPHASES)}
        results[name] = {"method": name, "step_s_median": med["step_s"], "step_s_all": [r["step_s"] for r in runs],
                         "phases_s_median": {p: med[p] for p in (*PHASES, *SUBPHASES)},
                         "updated_params": runs[-1]["updated_params"]}
        if smf:
            results[name]["selected_rows"] = runs[-1]["selected_rows"]
            results[name]["keyed_read_share"] = keyed_before
            results[name]["keyed_read_share_after_steps"] = keyed_read_share(module)
    peak, current = rss_mb()
    common = {"peak_rss_mb": peak, "rss_mb_end": current, "rss_mb_built": rss_built[1], "peak_rss_mb_built": rss_built[0],
              "build_s": build_s, "task_start_s": task_start_s, "trainable_params": module.trainable_param_count(),
              "threads": torch.get_num_threads(), "clock": clock_name, "batch_shape": list(batch["input_ids"].shape),
              "loss_tokens": int((batch["labels"] != -100).sum()), "model": info.get("requested") or info.get("name"),
              "method_config": OmegaConf.to_container(cfg.method, resolve=True)}
    if smf:
        common["memory"] = {str(i): {"layer": i, "n_slots": m.n_slots, "heads": m.heads, "knn": m.knn,
                                     "input_norm": m.cfg.input_norm, "read_gate": m.cfg.read_gate}
                            for i, m in module.memories.items()}
        common["budget"] = module.budget.to_dict() if module.budget is not None else None
        common["ledger_facts"] = len(module.ledger.facts)
        common["owned_slots"] = {str(i): int(o.sum()) for i, o in module.owned.items()}
        common["simulated"] = simulated
    for r in results.values():
        r.update(common)
    return results


def child(method: str, args, facts_seen: int | None = None) -> dict:
    """``one_method`` in a fresh process (its own peak RSS); its JSON is the last stdout line."""
    cmd = [sys.executable, __file__, "--only", method, "--steps", str(args.steps), "--experiment", args.experiment,
           "--clock", args.clock]
    cmd += [a for o in args.override for a in ("--override", o)]
    if args.tiny:
        cmd.append("--tiny")
    if facts_seen is not None:
        cmd += ["--facts-seen", str(facts_seen)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"bench_methods: {method} failed (exit {out.returncode}); its stderr is above")
    return json.loads(out.stdout.strip().splitlines()[-1])


def phase_text(r: dict) -> str:
    ph = r["phases_s_median"]
    text = ", ".join(f"{p} {ph[p]:.3f}" for p in PHASES if ph[p] >= 0.0005)
    return text + (f"; memory layers' forward {ph['memory_read']:.3f}" if ph.get("memory_read") else "")


def compare(args, out_dir: Path) -> dict:
    results = {}
    for method in METHODS:
        print(f"running {method} ...", flush=True)
        for name, r in child(method, args).items():
            results[name] = r
            print(f"  {name}: step {r['step_s_median']:.2f} s ({phase_text(r)}), peak RSS {r['peak_rss_mb']:.0f} MB",
                  flush=True)
    ft = results["full_ft"]
    for r in results.values():
        r["step_vs_full_ft"] = r["step_s_median"] / ft["step_s_median"]
        r["peak_rss_vs_full_ft"] = r["peak_rss_mb"] / ft["peak_rss_mb"]
    summary = {
        "experiment": "tiny" if args.tiny else args.experiment, "overrides": args.override, "steps": args.steps,
        "clock": args.clock, "batch_shape": ft["batch_shape"], "results": results,
        "smf_over_full_ft_step": results["smf"]["step_vs_full_ft"],
        "smf_seen_batch_over_full_ft_step": results.get("smf_seen_batch", {}).get("step_vs_full_ft"),
        "smf_over_full_ft_peak_rss": results["smf"]["peak_rss_vs_full_ft"],
        "lora_over_full_ft_step": results["lora"]["step_vs_full_ft"],
        "lora_over_full_ft_peak_rss": results["lora"]["peak_rss_vs_full_ft"],
        "targets": {"step": 0.6, "peak_rss": 0.5},
    }
    name = args.out or "bench_methods"
    (out_dir / f"{name}.json").write_text(json.dumps(summary, indent=2))
    with (out_dir / f"{name}.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "step_s", "peak_rss_mb", "trainable_params", "step_vs_full_ft", "rss_vs_full_ft",
                    *(f"{p}_s" for p in (*PHASES, *SUBPHASES))])
        for m, r in results.items():
            w.writerow([m, f"{r['step_s_median']:.3f}", f"{r['peak_rss_mb']:.0f}", r["trainable_params"],
                        f"{r['step_vs_full_ft']:.3f}", f"{r['peak_rss_vs_full_ft']:.3f}",
                        *(f"{r['phases_s_median'][p]:.3f}" for p in (*PHASES, *SUBPHASES))])
    seen = summary["smf_seen_batch_over_full_ft_step"]
    print(f"\nbatch {ft['batch_shape']} ({ft['threads']} threads, {args.clock} seconds)\n"
          f"SMF / full FT: step {summary['smf_over_full_ft_step']:.2f}"
          + (f" ({seen:.2f} for a batch seen before)" if seen is not None else "")
          + f" (target <= 0.6), peak RSS {summary['smf_over_full_ft_peak_rss']:.2f} (target <= 0.5)\n"
          f"LoRA / full FT: step {summary['lora_over_full_ft_step']:.2f}, "
          f"peak RSS {summary['lora_over_full_ft_peak_rss']:.2f}")
    print(f"wrote {out_dir / name}.json and .csv")
    return summary


def facts_seen_profile(args, out_dir: Path) -> dict:
    ns = [0, *(int(n) for n in args.facts_seen.split(",") if int(n) > 0)]
    rows = []
    for n in ns:
        print(f"running smf after {n} facts ...", flush=True)
        for name, r in child("smf", args, facts_seen=n).items():
            r["facts_seen"] = n
            rows.append(r)
            print(f"  {name}: step {r['step_s_median']:.2f} s ({phase_text(r)}), task start {r['task_start_s']:.2f} s, "
                  f"selected rows {r['selected_rows']}, "
                  f"reads on keyed rows {r['keyed_read_share']}, owned {r['owned_slots']}, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    base = {r["method"]: r["step_s_median"] for r in rows if r["facts_seen"] == 0}
    for r in rows:
        r["step_vs_0_facts"] = r["step_s_median"] / base[r["method"]]
    summary = {"experiment": "tiny" if args.tiny else args.experiment, "overrides": args.override, "steps": args.steps,
               "clock": args.clock, "facts_seen": ns, "rows": rows}
    name = args.out or "bench_methods_facts_seen"
    (out_dir / f"{name}.json").write_text(json.dumps(summary, indent=2))
    with (out_dir / f"{name}.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["facts_seen", "variant", "slots_per_fact", "owned_slots", "task_start_s", "step_s", "step_vs_0_facts",
                    *(f"{p}_s" for p in (*PHASES, *SUBPHASES)), "selected_rows", "keyed_read_share", "ledger_facts",
                    "peak_rss_mb"])
        for r in rows:
            w.writerow([r["facts_seen"], r["method"], r["budget"]["top_t"] if r["budget"] else "",
                        max(r["owned_slots"].values()), f"{r['task_start_s']:.3f}", f"{r['step_s_median']:.3f}",
                        f"{r['step_vs_0_facts']:.3f}", *(f"{r['phases_s_median'][p]:.3f}" for p in (*PHASES, *SUBPHASES)),
                        sum(r["selected_rows"].values()),
                        f"{max(r['keyed_read_share'].values(), default=0.0):.4f}", r["ledger_facts"],
                        f"{r['peak_rss_mb']:.0f}"])
    print(f"wrote {out_dir / name}.json and .csv")
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    ap.add_argument("--experiment", default="facts_seq_quick", help="conf/experiment/ to compose (smf_recipe: the study's)")
    ap.add_argument("--override", action="append", default=[], help="extra Hydra override for every method (repeatable)")
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                    help="wall: elapsed seconds; cpu: the process's CPU seconds (steadier beside other jobs)")
    ap.add_argument("--tiny", action="store_true", help="the tiny test model with the recipe's memory levers (seconds)")
    ap.add_argument("--facts-seen", default=None,
                    help="comma-separated N: SMF alone, one step after the memory owns the rows of N facts (and of 0)")
    ap.add_argument("--out", default=None, help="results name (default bench_methods / bench_methods_facts_seen)")
    ap.add_argument("--results-dir", default=str(RESULTS), help=argparse.SUPPRESS)
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # child-process mode
    args = ap.parse_args(argv)
    if args.only:
        n = int(args.facts_seen) if args.facts_seen else None
        print(json.dumps(one_method(args.only, args.experiment, args.override, args.tiny, args.steps, n, args.clock)))
        return
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.facts_seen:
        facts_seen_profile(args, out_dir)
    else:
        compare(args, out_dir)


if __name__ == "__main__":
    main()
