"""Why is a rephrased question not recalled? Reads of a trained run's memory, question by question.

Loads a finished (or interrupted) run — its config, its checkpoint's value rows and write keys —
and asks every stream fact three ways under the first training template: the trained question,
each of its evaluation-only rephrasings, and (for contrast) the known-facts suite's questions.
For every prompt it records the memory reads *before* the read gate and whether the gate lets
each read through, and prints, per group:

- ``answer_written``: share of the answer position's read weight that lands on written rows
  (rows some training step updated), before the gate;
- ``answer_passed``: the same after the gate (what actually reaches the residual stream);
- ``prompt_written`` / ``prompt_passed``: the same over every position of the prompt (the
  recipe writes from every position of a fact's sequences, so subject tokens carry the fact too);
- ``slot_jaccard``: for a rephrasing, the Jaccard overlap of the written rows its prompt reads
  (passed reads) with those the trained question's prompt reads;
- ``answer_query_cos``: cosine of the rephrasing's answer-position query with the trained
  question's (the addressing input after whitening; 1 = same query);
- ``shared_tokens_passed`` / ``other_tokens_passed``: for a rephrasing, the passed read weight on
  written rows at its positions whose token also occurs in the trained question (the words a
  rewording keeps, e.g. the subject) and at its other positions (answer position excluded), as
  shares of the prompt's read weight.

    python experiments/run.py diag rephrased outputs/facts_seq_quick/<date>/<time> [--out FILE.json]

Nothing here trains or changes the run; it reads evaluation items, as evaluation does.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F


def load_run(run_dir: Path):
    """The run's config, model (as after its last task), tokenizer, data module and memory layers
    (smf_lightning.product.open.load_run: what every product command opens a run with)."""
    from smf_lightning.memory import memory_layers
    from smf_lightning.product.open import load_run as open_run

    run = open_run(run_dir)
    return run.config, run.model, run.tokenizer, run.datamodule, memory_layers(run.model)


@torch.no_grad()
def lookups(model, mems, **inputs) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Run ``model(**inputs)`` (logits of the last position only) and return, per memory layer of
    ``mems``, what it addressed before any read gate: slot ids and softmax weights [B, T, heads,
    knn] and the normalised queries [B, T, heads, k_dim]."""
    captured = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, i=i: captured.__setitem__(i, a[0].detach()))
             for i, m in mems.items()]
    try:
        model(**inputs, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for i, mem in mems.items():
        idx, w, q = mem._lookup(captured[i].float())
        B, T = idx.shape[:2]
        out[i] = (idx, w, F.normalize(q.reshape(B, T, mem.heads, mem.k_dim), dim=-1))
    return out


@torch.no_grad()
def prompt_reads(model, tok, mems, prompt: str, token_ids: list | None = None) -> dict:
    """Per memory layer: pre-gate slot ids / weights, gate, normalised queries of every position."""
    ids = tok(prompt, return_tensors="pt")
    if token_ids is not None:
        token_ids.extend(ids["input_ids"][0].tolist())
    out = {}
    for i, (idx, w, queries) in lookups(model, mems, **ids).items():
        mem = mems[i]
        tau = mem.gate_threshold()  # as the model answers (eval mode: the serving gate, if set)
        gate = mem._read_gate(idx, queries, tau) if tau is not None else torch.ones_like(w)
        head = torch.arange(mem.heads).view(1, 1, mem.heads, 1).expand_as(idx)
        written = mem.write_mass[idx, head] > 0 if mem.cfg.read_gate is not None else mem.values.weight[idx].abs().sum(-1) > 0
        out[i] = {"idx": idx[0], "w": w[0], "gate": gate[0], "written": written[0], "q": queries[0]}
    return out


def shares(r: dict, positions: slice) -> tuple[float, float]:
    w, written, gate = r["w"][positions], r["written"][positions].float(), r["gate"][positions]
    total = float(w.sum())
    return float((w * written).sum()) / total, float((w * written * gate).sum()) / total


def passed_written(r: dict) -> set[int]:
    keep = (r["written"] & (r["gate"] > 0))
    return set(r["idx"][keep].tolist())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--known", type=int, default=50, help="known-suite questions for contrast")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    cfg, model, tok, dm, mems = load_run(args.run)
    template = dm.templates[dm.train_templates[0]]
    layer = next(iter(mems))
    groups: dict[str, dict[str, list[float]]] = {g: {} for g in ("trained", "rephrased", "known")}

    def add(group: str, key: str, value: float) -> None:
        groups[group].setdefault(key, []).append(value)

    facts = [f for j in range(dm.n_tasks) for f in dm.task_facts(j)]
    for f in facts:
        base_ids: list = []
        base = prompt_reads(model, tok, mems, template.prompt(f.question), base_ids)[layer]
        question_ids = set(tok(" " + f.question, add_special_tokens=False)["input_ids"])
        rephrased = []
        for q in f.rephrased:
            ids: list = []
            rephrased.append(prompt_reads(model, tok, mems, template.prompt(q), ids)[layer])
            shared = torch.tensor([i in question_ids for i in ids])
            shared[-1] = False  # the answer position apart
            r = rephrased[-1]
            passed = (r["w"] * r["written"].float() * r["gate"]).sum((-1, -2))  # per position
            total = float(r["w"].sum())
            other = ~shared
            other[-1] = False
            add("rephrased", "shared_tokens_passed", float(passed[shared].sum()) / total)
            add("rephrased", "other_tokens_passed", float(passed[other].sum()) / total)
            add("rephrased", "shared_token_share", float(shared.float().mean()))
        for group, r in [("trained", base)] + [("rephrased", r) for r in rephrased]:
            a_w, a_p = shares(r, slice(-1, None))
            p_w, p_p = shares(r, slice(None))
            add(group, "answer_written", a_w)
            add(group, "answer_passed", a_p)
            add(group, "prompt_written", p_w)
            add(group, "prompt_passed", p_p)
            if group == "rephrased":
                mine, theirs = passed_written(base), passed_written(r)
                add(group, "slot_jaccard", len(mine & theirs) / max(len(mine | theirs), 1))
                add(group, "answer_query_cos", float((base["q"][-1] * r["q"][-1]).sum(-1).mean()))
    known = dm.heldout_suites().get("triviaqa_known")
    for f in (known.facts[: args.known] if known is not None else []):
        r = prompt_reads(model, tok, mems, template.prompt(f.question))[layer]
        for key, value in zip(("answer_written", "answer_passed"), shares(r, slice(-1, None))):
            add("known", key, value)
        for key, value in zip(("prompt_written", "prompt_passed"), shares(r, slice(None))):
            add("known", key, value)
    table = {g: {k: {"mean": statistics.fmean(v), "median": statistics.median(v), "n": len(v)} for k, v in d.items()}
             for g, d in groups.items() if d}
    print(f"run {args.run}  memory layer {layer}  read gate {mems[layer].cfg.read_gate}")
    for g, d in table.items():
        print(f"{g:10s} " + "  ".join(f"{k} {m['mean']:.3f} (median {m['median']:.3f}, n={m['n']})" for k, m in d.items()))
    if args.out:
        args.out.write_text(json.dumps({"run": str(args.run), "layer": layer, "groups": table}, indent=2))


if __name__ == "__main__":
    main()
