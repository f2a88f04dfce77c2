"""GPU check (docs/benchmarks.md): does the whole framework run on one CUDA GPU, how fast, in how much memory,
and with which recall / retention? Self-contained, sized for < 5 minutes on one modern GPU.

Two runs of the real CLI (``python -m smf_lightning.train``), each on ``trainer.accelerator=gpu
trainer.devices=1``, with every output file in experiments/runs/gpu_check/<run>/:

- ``quick``: ``experiment=facts_seq_quick`` (3 tasks x 10 unknown TriviaQA facts, small suites),
  once per ``--precision`` (default: 32-true and bf16-mixed, so the two can be compared);
- ``stream1000``: a 1,000-fact stream with the SMF recipe (conf/method/smf.yaml's defaults, the
  one-layer Qwen2.5-class model of the quick experiment): synthetic facts (invented entities, so no
  probe has to find 1,000 unknown TriviaQA facts), ``--stream-tasks`` tasks of 1000 / tasks facts,
  small suites before training and after the last task, at ``--stream-precision``.

For every run it prints and saves (experiments/tools/results/gpu_check/gpu_check.json) the optimizer
steps, seconds per step (CUDA-synchronised, callbacks/evaluation.py), peak GPU memory
(``torch.cuda.max_memory_allocated``), final fact recall (training and held-out template), and
each held-out suite's before / after / relative change, known-facts retention among them.

    python experiments/run.py check gpu                      # both runs
    python experiments/run.py check gpu --only quick --precision bf16-mixed
    python experiments/run.py check gpu --dry-run            # print the commands, run nothing (any machine)

Without a CUDA device it exits with status 2 and says so (``--dry-run`` excepted): numbers from a
CPU are not GPU numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results" / "gpu_check"
RUNS = ROOT / "experiments" / "runs" / "gpu_check"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("quick", "stream1000"), help="run one of the two checks only")
    p.add_argument("--precision", nargs="+", default=["32-true", "bf16-mixed"], choices=("32-true", "bf16-mixed"),
                   help="trainer.precision of the quick runs (one run each)")
    p.add_argument("--stream-precision", default="bf16-mixed", choices=("32-true", "bf16-mixed"))
    p.add_argument("--stream-facts", type=int, default=1000, help="facts in the stream (default 1,000)")
    p.add_argument("--stream-tasks", type=int, default=4, help="tasks the stream is split into (facts must divide)")
    p.add_argument("--timeout", type=int, default=240, help="seconds per run before it is stopped and reported as such")
    p.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    args = p.parse_args(argv)
    if args.stream_facts < 1 or args.stream_tasks < 1 or args.stream_facts % args.stream_tasks:
        p.error(f"--stream-facts {args.stream_facts} must be a positive multiple of --stream-tasks {args.stream_tasks}")
    return args


def runs(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(run name, CLI overrides) of every run of the check."""
    gpu = ["trainer.accelerator=gpu", "trainer.devices=1", "trainer.enable_progress_bar=false", "logger.wandb.mode=disabled"]
    out = []
    if args.only in (None, "quick"):
        for precision in args.precision:
            out.append((f"quick_{precision}", ["experiment=facts_seq_quick", *gpu, f"trainer.precision={precision}"]))
    if args.only in (None, "stream1000"):
        out.append((f"stream{args.stream_facts}_{args.stream_precision}", [
            "experiment=facts_seq_quick", "task_name=gpu_check_stream", "data=facts_synthetic", "data.source=offline",
            f"data.n_tasks={args.stream_tasks}", f"data.facts_per_task={args.stream_facts // args.stream_tasks}",
            *gpu, f"trainer.precision={args.stream_precision}",  # suites as small as the quick run's
        ]))
    return out


def figures(summary: dict) -> dict:
    """The figures the check reports, from a run's summary.json."""
    return {
        "steps": summary.get("steps"),
        "seconds_per_step": summary.get("seconds_per_step"),
        "peak_gpu_mb": summary.get("peak_gpu_mb"),
        "fact_recall": summary.get("fact_recall"),
        "fact_recall_heldout_template": summary.get("fact_recall_heldout_template"),
        "heldout": {name: {k: h.get(k) for k in ("metric", "before", "after", "rel_change")}
                    for name, h in (summary.get("heldout") or {}).items()},
        "eval_seconds": summary.get("eval_seconds"),
    }


def run_one(name: str, overrides: list[str], timeout: int) -> dict:
    run_dir = RUNS / name
    cmd = [sys.executable, "-m", "smf_lightning.train", *overrides, f"hydra.run.dir={run_dir}"]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                             env=dict(os.environ, WANDB_SILENT="true", PYTHONUNBUFFERED="1"))
        rc, tail = res.returncode, (res.stdout + res.stderr)[-2000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", str(e.stdout or "")[-2000:]
    out = {"run": name, "command": " ".join(cmd[1:]), "returncode": rc, "wall_seconds": time.perf_counter() - t0,
           "run_dir": str(run_dir)}
    summary = run_dir / "summary.json"
    if rc == 0 and summary.is_file():
        out.update(figures(json.loads(summary.read_text())))
    else:
        out["log_tail"] = tail
    return out


def show(r: dict) -> None:
    if r["returncode"] != 0:
        print(f"{r['run']}: FAILED ({r['returncode']}) after {r['wall_seconds']:.0f} s\n{r.get('log_tail', '')}")
        return
    print(f"{r['run']}: {r['steps']} steps, {r['seconds_per_step'] * 1000:.1f} ms/step, peak GPU memory "
          f"{r['peak_gpu_mb']:.0f} MB, recall {r['fact_recall']:.3f} (held-out template "
          f"{r['fact_recall_heldout_template']:.3f}), wall {r['wall_seconds']:.0f} s")
    for suite, h in r["heldout"].items():
        rel = "" if h["rel_change"] is None else f" ({100 * h['rel_change']:+.1f}%)"
        print(f"    {suite} {h['metric']}: {h['before']:.4g} -> {h['after']:.4g}{rel}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = runs(args)
    if args.dry_run:
        for name, overrides in plan:
            print(f"{name}: python -m smf_lightning.train {' '.join(overrides)} hydra.run.dir={RUNS / name}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible to torch (torch.cuda.is_available() is False; torch "
              f"{torch.__version__}, CUDA build {torch.version.cuda}). This check measures a GPU: run it on a "
              "machine with one, with a CUDA build of torch (Makefile: make setup TORCH_SPEC=... "
              "TORCH_PIP_ARGS='--index-url <CUDA wheel index>'). Nothing was run.", file=sys.stderr)
        return 2
    device = {"name": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
              "bf16_supported": torch.cuda.is_bf16_supported()}
    print(f"gpu_check on {device['name']} (torch {device['torch']}, CUDA {device['cuda']})")
    results = []
    for name, overrides in plan:
        results.append(run_one(name, overrides, args.timeout))
        show(results[-1])
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "gpu_check.json"
    path.write_text(json.dumps({"device": device, "runs": results}, indent=2))
    print(f"saved {path}")
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
