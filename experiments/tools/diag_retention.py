"""Why are known facts lost? Retention probe of one task, many variants, one process.

Trains one task of unknown facts per variant (fresh values each time, as diag_learning.py)
and, after training, measures for every item of the known-facts suite whether it is still
answered and what its answer position reads: the share of its read weight on rows the task
wrote, and the read-weighted norm of those rows (the size of what the memory adds to the
residual stream there). Flipped and kept items are compared, so the mechanism of a loss is
measured, not guessed.

Before the first variant, the base model's logit margin along each known item's answer is
measured, so that the items a variant flips can be compared with the ones it keeps by how
close they were to flipping (``flipped_base_min_margin`` vs ``kept_base_min_margin``).

After each variant, the facts' held-out template is scored teacher-forced with the memory's
output kept everywhere, only at the prompt's positions before the answer, or only at the
answer's (``heldout_tf_memory_at_*``): which positions' reads carry what the task wrote.

Variants add two candidate levers to the recipe:
- ``stop=TAU``: a fact's rows are not updated in a step where that fact's mean answer loss in
  the batch is already below TAU (nats/token): rows stop growing once the fact is learned;
- ``maxnorm=C``: after every step each written row is scaled back to norm <= C;
- ``gate=TAU|none``: the read gate's threshold for this variant (memory/layer.py; the model
  must be built with one, ``--override model.memory.read_gate=0.3``), ``none`` turns it off.

    python experiments/run.py diag retention --facts 20 --variants base,stop=0.1,maxnorm=30
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # diag_learning.py beside it

from diag_learning import build, probe_arguments  # noqa: E402

from smf_lightning.eval.scoring import encode_context_continuation, pad_token_id  # noqa: E402
from smf_lightning.memory import memory_layers  # noqa: E402
from smf_lightning.methods import build_method  # noqa: E402
from smf_lightning.selection.selectors import loss_position_mask  # noqa: E402


def per_fact_loss(module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """(mean answer loss of the batch, fact id -> mean loss of its rows), one forward."""
    model = module.model
    labels = batch["labels"][:, 1:]
    keep = (labels != -100).any(0).nonzero().squeeze(1)
    with module.prefix_cache.reuse(batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    targets = labels[:, keep]
    nll = nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
    n = (targets != -100).sum(1).clamp(min=1)
    row_loss = nll.sum(1) / n
    loss = nll.sum() / n.sum()
    by_fact: dict[str, list[float]] = {}
    for fid, value in zip(batch["fact_ids"], row_loss.detach().tolist()):
        by_fact.setdefault(fid, []).append(value)
    return loss, {f: sum(v) / len(v) for f, v in by_fact.items()}


@torch.no_grad()
def known_reads(model, tok, suite, written: dict[int, torch.Tensor], batch_size: int = 32) -> list[dict]:
    """Per known item: read-weight share on written rows and the read-weighted written-row norm
    at the position that predicts the first answer token."""
    prompts = [suite.template.prompt(f.question) for f in suite.facts]
    rows, side = [], tok.padding_side
    tok.padding_side = "left"  # the last column is every row's answer-predicting position
    for s in range(0, len(prompts), batch_size):
        enc = tok(prompts[s:s + batch_size], return_tensors="pt", padding=True)
        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], logits_to_keep=1)
        real = enc["attention_mask"].bool()
        for b in range(enc["input_ids"].shape[0]):
            share, mag, prompt_share = 0.0, 0.0, 0.0
            for i, mem in memory_layers(model).items():
                ids = mem.last_access.indices[b, -1].reshape(-1)
                w = mem.last_access.weights[b, -1].reshape(-1).float()
                w = w / w.sum()
                hit = written[i][ids]
                share += float(w[hit].sum())
                mag += float((w * mem.values.weight[ids].norm(dim=1)).sum())
                # every real position of the prompt: the memory is read there too
                all_ids = mem.last_access.indices[b][real[b]].reshape(real[b].sum(), -1)
                all_w = mem.last_access.weights[b][real[b]].reshape(real[b].sum(), -1).float()
                all_w = all_w / all_w.sum(1, keepdim=True)
                prompt_share += float((all_w * written[i][all_ids]).sum(1).mean())
            rows.append({"share_written": share, "written_norm": mag, "prompt_share_written": prompt_share})
    tok.padding_side = side
    return rows


@torch.no_grad()
def answer_margins(model, tok, suite, batch_size: int = 16) -> list[dict]:
    """Per known item, with the model as it is: its greedy answer and, teacher-forced along
    that answer, the logit margin (answer token minus the best other token) at every answer
    token: the first token's margin and the smallest one. Run on the base model, this says
    how close each known answer was to flipping before any training."""
    suite.evaluate(model, tok, 64)
    answers = [p.split("\n", 1)[0] or " " for p in suite.last_items["prediction"]]
    prompts = [suite.template.prompt(f.question) for f in suite.facts]
    encoded = encode_context_continuation(tok, prompts, answers)
    pad, out = pad_token_id(tok), []
    for s in range(0, len(encoded), batch_size):
        chunk = encoded[s:s + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (seq, _) in enumerate(chunk):
            ids[r, :len(seq)] = torch.tensor(seq)
            mask[r, :len(seq)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        for r, (seq, n) in enumerate(chunk):
            pos = torch.arange(len(seq) - n - 1, len(seq) - 1)
            lg = logits[r, pos]
            target = torch.tensor(seq[-n:])
            own = lg.gather(1, target[:, None]).squeeze(1)
            other = lg.scatter(1, target[:, None], float("-inf")).max(1).values
            margin = own - other
            out.append({"first_margin": float(margin[0]), "min_margin": float(margin.min())})
    return out


@torch.no_grad()
def heldout_by_position(model, dm, facts, batch_size: int = 16) -> dict[str, float]:
    """Where does the held-out template's recall come from? Teacher-forced exact match (the
    argmax is the gold token at every answer token) of ``facts`` under the held-out
    template(s), with the memory's output kept at every position (``all``), only at the
    positions before the one that predicts the first answer token (``question``: the prompt's
    tokens, the question's among them), or only from that position on (``answer``)."""
    keep: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(module, args, out):  # the memory's output [B, T, D], zeroed where the mask is off
        mask = keep["mask"]
        return out if mask is None else out * mask.unsqueeze(-1).to(out.dtype)

    handles = [m.register_forward_hook(hook) for m in memory_layers(model).values()]
    examples = [dm._encode(f, name, loss_on="answer") for name in dm.heldout_templates for f in facts]
    hits = {"all": 0, "question": 0, "answer": 0}
    try:
        for s in range(0, len(examples), batch_size):
            batch = dm.collate(examples[s:s + batch_size])
            predicting = loss_position_mask(batch["labels"])  # positions whose output predicts an answer token
            first = predicting.float().argmax(1, keepdim=True)
            pos = torch.arange(predicting.shape[1]).unsqueeze(0)
            gold = batch["labels"][:, 1:]
            for name, mask in (("all", None), ("question", pos < first), ("answer", pos >= first)):
                keep["mask"] = mask
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                ok = ((logits.argmax(-1)[:, :-1] == gold) | (gold == -100)).all(1)
                hits[name] += int(ok.sum())
    finally:
        keep["mask"] = None
        for h in handles:
            h.remove()
    return {f"heldout_tf_memory_at_{k}": round(v / len(examples), 3) for k, v in hits.items()}


def margin_split(margins: list[dict], em: list) -> dict:
    """Base margins of the items a variant flipped vs kept, and the share flipped per quartile
    of the base's smallest margin (lowest first)."""
    mean = lambda xs: round(sum(xs) / len(xs), 3) if xs else None  # noqa: E731
    flipped = [m for m, e in zip(margins, em) if not e]
    kept = [m for m, e in zip(margins, em) if e]
    order = sorted(range(len(margins)), key=lambda i: margins[i]["min_margin"])
    q = max(1, len(order) // 4)
    quart = [order[i:i + q] for i in range(0, q * 4, q)]
    return {
        "flipped_base_min_margin": mean([m["min_margin"] for m in flipped]),
        "kept_base_min_margin": mean([m["min_margin"] for m in kept]),
        "flipped_base_first_margin": mean([m["first_margin"] for m in flipped]),
        "kept_base_first_margin": mean([m["first_margin"] for m in kept]),
        "flipped_share_by_margin_quartile": [round(sum(1 for i in g if not em[i]) / len(g), 3) for g in quart],
    }


def run_variant(spec: str, cfg, model, tok, dm, bg) -> dict:
    opts = dict(kv.split("=") for kv in spec.split("+")) if spec != "base" else {}
    stop = float(opts.pop("stop", "nan"))
    maxnorm = float(opts.pop("maxnorm", "nan"))
    gate = opts.pop("gate", None)  # read gate threshold for this variant ("none": off); needs a model built with one
    gates = {i: m.cfg.read_gate for i, m in memory_layers(model).items()}
    if gate is not None:
        if any(not hasattr(m, "write_keys") for m in memory_layers(model).values()):
            raise SystemExit("gate=... needs the model built with a read gate: --override model.memory.read_gate=0.3")
        for m in memory_layers(model).values():
            m.cfg.read_gate = None if gate == "none" else float(gate)
    mcfg = OmegaConf.to_container(cfg.method, resolve=True)
    data_over = {}
    for k, v in opts.items():  # method keys, or data.KEY (a datamodule attribute, e.g. epochs_per_task)
        v = json.loads(v) if v[:1].isdigit() or v[:1] in "-[{" else v
        if k.startswith("data."):
            data_over[k.removeprefix("data.")] = v
        else:
            mcfg[k] = v
    saved = {k: getattr(dm, k) for k in data_over}
    for k, v in data_over.items():
        setattr(dm, k, v)
    for mem in memory_layers(model).values():
        mem.values.weight.data.zero_()
        if mem.cfg.read_gate is not None:  # a fresh table has no write keys either
            mem.clear_writes()
    dm._train_examples = {}
    module = build_method(mcfg, model, background=bg, seed=int(cfg.seed))
    module.fact_slots = module.select_fact_slots(dm.training_examples(0), dm.collate)
    opt = module.configure_optimizers()
    wrap = SimpleNamespace(optimizer=opt, step=opt.step)
    batches = dm.train_batches(0)
    n_per_pass = max(1, len(batches) // dm.epochs_per_task)
    losses, skipped, t0 = [], 0, time.time()
    module.model.train()
    for b in batches:
        batch = dm.collate(b)
        opt.zero_grad(set_to_none=True)
        module.on_accumulation_start()
        loss, by_fact = per_fact_loss(module, batch)
        loss.backward()
        module.after_backward(batch)
        if stop == stop:  # not nan: drop learned facts from this step's update
            learned = {f for f, v in by_fact.items() if v < stop}
            skipped += len(learned)
            module._batch_facts = [f for f in module._batch_facts if f not in learned]
        module.take_optimizer_step(wrap)
        if maxnorm == maxnorm:
            for mem in memory_layers(model).values():
                w = mem.values.weight.data
                norms = w.norm(dim=1, keepdim=True)
                w.mul_(torch.clamp(maxnorm / norms.clamp(min=1e-12), max=1.0))
        losses.append(float(loss.detach()))
    secs = (time.time() - t0) / len(batches)
    module.model.eval()
    rec = dm.evaluate_recall(model, tok, [0])[0]
    suite = dm.heldout_suites()["triviaqa_known"]
    kept = suite.evaluate(model, tok, 64)["em"]
    em = suite.last_items["em"]
    written = {i: mem.values.weight.detach().abs().sum(1) > 0 for i, mem in memory_layers(model).items()}
    reads = known_reads(model, tok, suite, written)
    mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    flipped = [r for r, e in zip(reads, em) if not e]
    held = [r for r, e in zip(reads, em) if e]
    train_t = [t for t in rec if t not in dm.heldout_templates]
    norms = torch.cat([m.values.weight.detach().norm(dim=1)[written[i]] for i, m in memory_layers(model).items()])
    row = {
        "variant": spec, "whiten_override": getattr(run_variant, "whiten", None),
        "input_norm": cfg.model.memory.input_norm, "within_alpha": cfg.model.memory.get("within_alpha"),
        "n_slots": cfg.model.memory.n_slots, "read_gate": next(iter(memory_layers(model).values())).cfg.read_gate,
        "facts": len({ex.fact_id for ex in dm.training_examples(0)}),
        "loss_per_pass": [round(sum(losses[i:i + n_per_pass]) / n_per_pass, 3) for i in range(0, len(losses), n_per_pass)],
        "recall": round(sum(rec[t]["em"] for t in train_t) / len(train_t), 3),
        "heldout": round(sum(rec[t]["em"] for t in dm.heldout_templates) / len(dm.heldout_templates), 3),
        "known_kept": kept,
        "skipped_fact_updates": skipped,
        "written_rows": int(sum(int(w.sum()) for w in written.values())),
        "row_norm_mean": round(float(norms.mean()), 2), "row_norm_max": round(float(norms.max()), 2),
        "known_share_written": mean([r["share_written"] for r in reads]),
        "flipped_share_written": mean([r["share_written"] for r in flipped]),
        "kept_share_written": mean([r["share_written"] for r in held]),
        "flipped_prompt_share_written": mean([r["prompt_share_written"] for r in flipped]),
        "kept_prompt_share_written": mean([r["prompt_share_written"] for r in held]),
        "flipped_written_norm": mean([r["written_norm"] for r in flipped]),
        "kept_written_norm": mean([r["written_norm"] for r in held]),
        "steps": len(batches), "s_per_step": round(secs, 2),
    }
    row.update(heldout_by_position(model, dm, dm.task_facts(0)))
    if getattr(run_variant, "margins", None):
        row.update(margin_split(run_variant.margins, em))
    print(json.dumps(row), flush=True)
    for i, m in memory_layers(model).items():
        m.cfg.read_gate = gates[i]
    for k, v in saved.items():
        setattr(dm, k, v)
    dm._train_examples = {}
    return row


def main():
    ap = probe_arguments(__doc__)
    ap.add_argument("--whiten", default=None, help="whitening spec of diag_addressing.py (e.g. lda128@0.01)")
    ap.add_argument("--stats", default=None, help="diag_addressing.py --stats-cache file for --whiten")
    args = ap.parse_args()
    if args.known < 1:
        ap.error("--known must be >= 1: this probe measures the known facts kept")
    torch.set_num_threads(args.threads)
    cfg, model, tok, dm, bg = build(args)
    if args.whiten:
        # a whitening of diag_addressing.py (statistics from its --stats-cache file), then the
        # background statistics again: they depend on what the memory reads
        from diag_addressing import whitening_matrix

        from smf_lightning.models import build as M

        mean, C, W = torch.load(args.stats)
        for mem in memory_layers(model).values():
            mem.in_mean.copy_(mean.to(mem.in_mean.dtype))
            mem.in_whiten.copy_(whitening_matrix(args.whiten, C, W).to(mem.in_whiten.dtype))
        bg = M.background_stats(cfg, model, dm)
    run_variant.whiten = args.whiten
    for mem in memory_layers(model).values():
        mem.values.weight.data.zero_()
    run_variant.margins = answer_margins(model, tok, dm.heldout_suites()["triviaqa_known"])
    for spec in args.variants.split(","):
        row = run_variant(spec, cfg, model, tok, dm, bg)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
