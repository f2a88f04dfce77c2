"""Could a read be verified? Owner vs foreign query similarity on written rows, no training.

The memory's addressing is fixed during SMF (frozen layers below it, fixed keys and
whitening), so the query of every position of every prompt is fixed for the whole run. This
probe takes one task's facts, treats every slot their answer positions read (training
templates) as a row training would write, and gives each such row a *write key*: the
read-weighted mean of the normalised queries that read it. Then it compares, on those rows:

- owner reads: the training positions' own queries against the write key of each row they read;
- held-out template reads: the same facts under the held-out template (these reads should pass);
- known reads: the known-facts suite's answer positions (these reads are the interference).

For thresholds tau it prints the share of each group's read weight on written rows whose query
has cosine >= tau with the row's write key. If owner and held-out reads stay while known reads
go, a read gate on that cosine would cut interference without unlearning.

    python experiments/run.py diag gate --facts 100 --known 200
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # diag_learning.py beside it

from diag_learning import build, probe_arguments  # noqa: E402
from diag_rephrased import lookups  # noqa: E402

from smf_lightning.data.facts import encode_example  # noqa: E402
from smf_lightning.memory import memory_layers  # noqa: E402
from smf_lightning.selection.selectors import loss_position_mask  # noqa: E402

TAUS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


@torch.no_grad()
def reads(model, dm, examples, batch_size: int = 16) -> dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """memory layer -> [(normalised query [H, k_dim], slot ids [H*knn], weights [H*knn])] for every
    loss position of `examples`."""
    mems = memory_layers(model)
    out: dict[int, list] = {i: [] for i in mems}
    for s in range(0, len(examples), batch_size):
        batch = dm.collate(examples[s:s + batch_size])
        found = lookups(model, mems, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        positions = loss_position_mask(batch["labels"]).nonzero().tolist()
        for i, (idx, w, q) in found.items():
            for b, t in positions:
                out[i].append((q[b, t], idx[b, t].reshape(-1), w[b, t].reshape(-1).float()))
    return out


def write_keys(train_reads, n_slots: int, heads: int, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, H, k_dim] normalised read-weighted mean query per slot and [N] bool written."""
    k_dim = train_reads[0][0].shape[-1]
    keys = torch.zeros(n_slots, heads, k_dim)
    for q, ids, w in train_reads:
        head = torch.arange(heads).repeat_interleave(knn)
        keys.index_put_((ids, head), w[:, None] * q[head], accumulate=True)
    written = keys.flatten(1).norm(dim=1) > 0
    return torch.nn.functional.normalize(keys, dim=-1), written


def gate_table(group_reads, keys, written, heads: int, knn: int) -> dict:
    """Share of the group's total read weight on written rows, and of it what passes cos >= tau."""
    head = torch.arange(heads).repeat_interleave(knn)
    on_written, passes = 0.0, {t: 0.0 for t in TAUS}
    total, cosines = 0.0, []
    for q, ids, w in group_reads:
        w = w / w.sum()
        total += 1.0
        hit = written[ids]
        if not hit.any():
            continue
        cos = (keys[ids[hit], head[hit]] * q[head[hit]]).sum(-1)
        cosines.append(cos)
        on_written += float(w[hit].sum())
        for t in TAUS:
            passes[t] += float(w[hit][cos >= t].sum())
    c = torch.cat(cosines) if cosines else torch.zeros(1)
    return {
        "positions": int(total), "share_on_written": round(on_written / total, 4),
        "cos_q10_q50_q90": [round(float(c.quantile(p)), 3) for p in (0.1, 0.5, 0.9)],
        "passing_share_by_tau": {str(t): round(passes[t] / total, 4) for t in TAUS},
    }


def main():
    ap = probe_arguments(__doc__)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg, model, tok, dm, _ = build(args)
    mems = memory_layers(model)
    mem0 = next(iter(mems.values()))
    heads, knn = mem0.heads, mem0.knn
    facts = dm.task_facts(0)
    train = reads(model, dm, dm.training_examples(0))
    held = reads(model, dm, [dm._encode(f, name) for f in facts for name in dm.heldout_templates])
    suite = dm.heldout_suites().get("triviaqa_known")  # absent with --known 0
    known = reads(model, dm, [encode_example(tok, suite.template, f.question, f.answer, dm.loss_on, f.id)
                              for f in suite.facts]) if suite is not None else None
    for i, mem in mems.items():
        keys, written = write_keys(train[i], mem.n_slots, heads, knn)
        row = {"layer": i, "facts": len(facts), "written_rows": int(written.sum()), "input_norm": cfg.model.memory.input_norm,
               "owner": gate_table(train[i], keys, written, heads, knn),
               "heldout_template": gate_table(held[i], keys, written, heads, knn),
               "known": gate_table(known[i], keys, written, heads, knn) if known is not None else None}
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
