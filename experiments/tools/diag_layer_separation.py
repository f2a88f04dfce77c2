"""At which depth does a question's answer position look like its other wordings and unlike other
questions? A probe of the base model, for choosing where a memory layer reads.

For a run's stream (its config: the facts, their training wordings — question, paraphrases and
rewordings — and their evaluation-only rephrasings) and its known-facts suite, the *base* model (no
memory layer) reads every question under the run's first training template. The hidden state at
the answer position (the prompt's last token: where the loss starts, so where SMF writes rows and
keys) is taken at every layer, centred (the mean over all probed prompts of that layer) and
normalised. Per layer:

- ``rephrased``: each rephrasing's best cosine with its own fact's training wordings (what a row
  keyed by those wordings would see);
- ``known``: each known question's best cosine with any stream fact's training wordings (what
  must stay below a gate for the known facts to be kept);
- ``auc``: P(rephrased > known) over all pairs, and ``pass_at_known99``: the share of rephrasings
  above the known questions' 99th percentile (a gate that lets 1% of known questions through).

A raw hidden state is not a memory query: the layer's whitening and query projection come after
it. So this ranks depths, it does not predict a row's recall.

    python experiments/run.py diag layer_separation RUN_DIR [--out FILE.json] [--plot FILE.png]

Nothing here trains or changes the run; it reads evaluation items, as evaluation does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F


@torch.no_grad()
def answer_states(model, tokenizer, prompts: list[str], batch_size: int = 16) -> torch.Tensor:
    """[len(prompts), layers + 1, hidden] float32: every layer's state at each prompt's last token."""
    out = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # the last token sits at the last position
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True)
            hs = model(**enc, output_hidden_states=True).hidden_states
            out.append(torch.stack([h[:, -1].float() for h in hs], 1))
    finally:
        tokenizer.padding_side = side
    return torch.cat(out)


def separation(pos: torch.Tensor, neg: torch.Tensor) -> dict[str, float]:
    """AUC P(pos > neg) (ties count half) and the share of pos above neg's 99th percentile."""
    greater = (pos.view(-1, 1) > neg.view(1, -1)).float().mean()
    ties = (pos.view(-1, 1) == neg.view(1, -1)).float().mean()
    q99 = torch.quantile(neg, 0.99)
    return {"auc": float(greater + ties / 2), "pass_at_known99": float((pos > q99).float().mean()),
            "rephrased_median": float(pos.median()), "known_median": float(neg.median()), "known_q99": float(q99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="PNG: AUC and pass share per layer")
    args = ap.parse_args()

    from omegaconf import OmegaConf

    from smf_lightning.models import build as M
    from smf_lightning.product.open import RUN_CONFIG
    from smf_lightning.stages.continual import build_datamodule

    cfg = OmegaConf.load(args.run / RUN_CONFIG)
    model, tok, _ = M.load_model(cfg)  # the base model: no memory layer is installed
    model.eval()
    dm = build_datamodule(cfg, model, tok)
    dm.setup()
    template = dm.templates[dm.train_templates[0]]
    facts = [f for j in range(dm.n_tasks) for f in dm.task_facts(j)]
    wordings: list[tuple[int, str]] = []  # (fact index, training question)
    for k, f in enumerate(facts):
        wordings += [(k, q) for q in dict.fromkeys(dm.training_questions(f))]
    rephrased = [(k, r) for k, f in enumerate(facts) for r in f.rephrased]
    known = dm.heldout_suites().get("triviaqa_known")
    if not rephrased or known is None:
        raise SystemExit(f"{args.run}: the probe needs rephrasings (data.rephrasings) and the known-facts suite "
                         "(data.suites.triviaqa_known)")
    known_q = [f.question for f in known.facts]
    prompts = [template.prompt(q) for _, q in wordings] + [template.prompt(q) for _, q in rephrased] \
        + [template.prompt(q) for q in known_q]
    print(f"probing {len(wordings)} training wordings of {len(facts)} facts, {len(rephrased)} rephrasings, "
          f"{len(known_q)} known questions", flush=True)
    states = answer_states(model, tok, prompts, dm.generation_batch_size)
    states = F.normalize(states - states.mean(0, keepdim=True), dim=-1)
    nw, nr = len(wordings), len(rephrased)
    W, R, K = states[:nw], states[nw:nw + nr], states[nw + nr:]
    owner = torch.tensor([k for k, _ in wordings])
    rows = []
    for layer in range(states.shape[1]):
        sim_r = R[:, layer] @ W[:, layer].T  # [nr, nw]
        own = owner.view(1, -1) == torch.tensor([k for k, _ in rephrased]).view(-1, 1)
        pos = sim_r.masked_fill(~own, -2.0).amax(1)
        neg = (K[:, layer] @ W[:, layer].T).amax(1)
        rows.append({"layer": layer, **separation(pos, neg)})
        print(json.dumps(rows[-1]), flush=True)
    result = {"run": str(args.run), "n_facts": len(facts), "n_wordings": nw, "n_rephrased": nr,
              "n_known": len(known_q), "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [r["layer"] for r in rows]
        ax.plot(xs, [r["auc"] for r in rows], marker="o", label="AUC: rephrasing vs known question")
        ax.plot(xs, [r["pass_at_known99"] for r in rows], marker="s", label="rephrasings above known 99th pct")
        ax.set_xlabel("layer (hidden state at the answer position; 0 = embeddings)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("where a fact's other wordings separate from other questions")
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
