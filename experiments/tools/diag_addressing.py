"""Do a fact's templates read the same slots? An addressing probe, no training.

With ZCA whitening (recipe v2) the answer positions of one fact under its different
templates read almost disjoint slot sets, so every template needs its own rows (top-300
per fact) and a held-out template reads rows nobody wrote (held-out recall 0.37). This
probe measures, for the stream's facts under every template, at the answer positions:

- ``same_fact``: Jaccard of two training templates' read sets of the same fact (want high);
- ``heldout_cover``: the share of the held-out template's read weight on slots some training
  template of the same fact read (the rows training could have written; want high);
- ``other_fact``: Jaccard of two different facts' read sets under one template (want ~0);

for ZCA (``alpha=inf``) and for *within-question whitening*: ``Z = (W + alpha C)^-1/2`` where
``C`` is the covariance of background answer positions (ZCA's) and ``W`` the covariance of
their deviations from the same question's mean over the training templates. Directions in
which templates of one question differ are damped, so what a position reads depends more on
the question than on the template (the within-class whitening of LDA / PLDA).

    python experiments/run.py diag addressing --facts 40 --alphas inf,1,0.3,0.1
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # diag_learning.py beside it

from diag_learning import build  # noqa: E402

from smf_lightning.memory import memory_layers  # noqa: E402
from smf_lightning.memory.whitening import inverse_sqrt  # noqa: E402
from smf_lightning.selection.selectors import loss_position_mask  # noqa: E402


class _Stop(Exception):
    pass


@torch.no_grad()
def answer_inputs(model, mem, dm, facts, template: str, batch_size: int = 32) -> list[torch.Tensor]:
    """Per fact: the memory layer's input at its answer positions [n_pos, d] under ``template``."""
    out = []
    grabbed = {}

    def grab(module, args):
        grabbed["x"] = args[0].double()
        raise _Stop

    hook = mem.register_forward_pre_hook(grab)
    try:
        for s in range(0, len(facts), batch_size):
            batch = dm.collate([dm._encode(f, template) for f in facts[s:s + batch_size]])
            try:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            except _Stop:
                pass
            mask = loss_position_mask(batch["labels"])
            out += [grabbed["x"][b][mask[b]] for b in range(mask.shape[0])]
    finally:
        hook.remove()
    return out


@torch.no_grad()
def read_sets(model, mem, dm, facts, template: str, batch_size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per fact: (slot ids, read weights) over its answer positions under ``template``."""
    out = []
    for s in range(0, len(facts), batch_size):
        batch = dm.collate([dm._encode(f, template) for f in facts[s:s + batch_size]])
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1)
        mask = loss_position_mask(batch["labels"])
        acc = mem.last_access
        for b in range(mask.shape[0]):
            out.append((acc.indices[b][mask[b]].reshape(-1), acc.weights[b][mask[b]].reshape(-1).float()))
    return out


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = set(a.tolist()), set(b.tolist())
    return len(a & b) / max(len(a | b), 1)


def within_question_stats(model, mem, dm, bg_facts, train_t, cache: str | None):
    """(mean, C, W) of the memory input at background answer positions: C the covariance of the
    positions, W that of their deviations from the same question's mean over the training
    templates (positions aligned by their index in the answer). Cached in ``cache`` if given."""
    if cache and Path(cache).is_file():
        return torch.load(cache)
    per_t = {t: answer_inputs(model, mem, dm, bg_facts, t) for t in train_t}
    samples, deviations = [], []
    for q in range(len(bg_facts)):
        n = min(per_t[t][q].shape[0] for t in train_t)
        stack = torch.stack([per_t[t][q][:n] for t in train_t])  # [templates, n, d]
        samples.append(stack.reshape(-1, stack.shape[-1]))
        deviations.append((stack - stack.mean(0, keepdim=True)).reshape(-1, stack.shape[-1]))
    x, dev = torch.cat(samples), torch.cat(deviations)
    C = torch.cov(x.T)
    W = dev.T @ dev / dev.shape[0] * len(train_t) / (len(train_t) - 1)
    print(f"background positions {x.shape[0]}; trace W / trace C = {float(W.trace() / C.trace()):.3f}", flush=True)
    if cache:
        torch.save((x.mean(0), C, W), cache)
    return x.mean(0), C, W


def whitening_matrix(spec: str, C: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``inf``: ZCA, C^-1/2; ``ALPHA``: (W + ALPHA C)^-1/2; ``ldaK@ALPHA``: the latter followed by
    the projection on its K directions of largest total variance (the K discriminant directions
    of LDA: most variance between questions per unit of variance between templates)."""
    k, _, a = spec.rpartition("@") if "@" in spec else ("", "", spec)
    alpha = float(a)
    if alpha == float("inf"):
        return inverse_sqrt(C)[0]
    M = inverse_sqrt(W + alpha * C)[0]
    if not k:
        return M
    evals, evecs = torch.linalg.eigh(M @ C @ M)
    U = evecs[:, -int(k.removeprefix("lda")):]
    return M @ U @ U.T


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", type=int, default=40)
    ap.add_argument("--background", type=int, default=600, help="background questions for W and C")
    ap.add_argument("--alphas", default="inf,1,0.3,0.1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the rows to this CSV")
    ap.add_argument("--stats-cache", default=None, help="save/load (mean, C, W) here (a .pt file)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.known, args.override = 0, []
    cfg, model, tok, dm, _ = build(args)
    model.eval()
    (idx, mem), = memory_layers(model).items()
    facts = list(dm.task_facts(0))
    train_t, held_t = list(dm.train_templates), list(dm.heldout_templates)

    bg_facts = dm._background_facts[: args.background]
    mean, C, W = within_question_stats(model, mem, dm, bg_facts, train_t, args.stats_cache)

    rows = []
    for a in args.alphas.split(","):
        Z = whitening_matrix(a, C, W)
        mem.in_mean.copy_(mean.to(mem.in_mean.dtype))
        mem.in_whiten.copy_(Z.to(mem.in_whiten.dtype))
        reads = {t: read_sets(model, mem, dm, facts, t) for t in train_t + held_t}
        same = [jaccard(reads[s][f][0], reads[t][f][0]) for s, t in itertools.combinations(train_t, 2) for f in range(len(facts))]
        other = [jaccard(reads[t][f][0], reads[t][g][0]) for t in train_t for f, g in zip(range(len(facts)), range(1, len(facts)))]
        cover = []
        for h in held_t:
            for f in range(len(facts)):
                union = torch.unique(torch.cat([reads[t][f][0] for t in train_t]))
                ids, w = reads[h][f]
                cover.append(float(w[torch.isin(ids, union)].sum() / w.sum()))
        distinct = sum(len(set(torch.cat([reads[t][f][0] for t in train_t]).tolist())) for f in range(len(facts))) / len(facts)
        mean_ = lambda v: round(sum(v) / len(v), 4)  # noqa: E731
        row = {"alpha": a, "same_fact": mean_(same), "heldout_cover": mean_(cover), "other_fact": mean_(other),
               "train_slots_per_fact": round(distinct, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        import csv

        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
