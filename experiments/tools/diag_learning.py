"""Why does SMF learn slowly? A loss-and-recall probe of one task, many variants, one process.

Loads the model, the stream, the whitening and the background once (through the same
builders as the continual stage, models/build.py), then for each variant rebuilds a fresh SMF module (values back to
zero), trains one task with the variant's settings and prints the training loss per pass,
recall on the training templates and coverage: the share of each answer-predicting
position's read weight that falls on rows the step may update (first answer token and
later ones separately). No held-out suites: this is a probe for choosing settings, the
study (smf_recipe.py) measures them.

    python experiments/run.py diag learning --facts 20 --variants base,all,lr3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from smf_lightning.models import build as M  # noqa: E402
from smf_lightning.stages.continual import build_datamodule  # noqa: E402
from smf_lightning.train import conf_dir  # noqa: E402
from smf_lightning.selection.selectors import loss_position_mask  # noqa: E402

# name -> (method overrides, data overrides)
VARIANTS = {
    "base": ({}, {}),
    "all": ({"selector": "all"}, {}),
    "nohub": ({"exclude_hubs": 0.0}, {}),
    "t100": ({"top_t": 100}, {}),
    "t300": ({"top_t": 300}, {}),
    "lr0.3": ({"lr": 0.3}, {}),
    "lr3": ({"lr": 3.0}, {}),
    "ep10": ({}, {"epochs_per_task": 10}),
    "suffix": ({}, {"loss_on": "answer_and_suffix"}),
}


def probe_arguments(doc: str) -> argparse.ArgumentParser:
    """The arguments of the one-task probes (this script, diag_retention.py): the stream, the
    known-facts suite, the variants, extra Hydra overrides and the JSONL output."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--known", type=int, default=100, help="known-facts suite size (0 = skip)")
    ap.add_argument("--variants", default="base")
    ap.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    ap.add_argument("--out", default=None, help="append rows to this JSONL file")
    return ap


def build(args):
    overrides = ["experiment=facts_seq_quick", "data.n_tasks=1", f"data.facts_per_task={args.facts}",
                 f"data.suites={{triviaqa_known:{{n_items:{args.known}}}}}" if args.known else "data.suites={}", f"trainer.threads={args.threads}", *args.override]
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        cfg = compose(config_name="train", overrides=overrides)
    model, tok, info = M.load_model(cfg)
    dm = build_datamodule(cfg, model, tok)
    model = M.maybe_retrofit(cfg, model, info)
    M.input_whitening(cfg, model, dm)
    bg = M.background_stats(cfg, model, dm)
    return cfg, model, tok, dm, bg


def coverage(module, dm, batch_examples) -> tuple[float, float]:
    """Mean share of read weight on updatable rows at first-answer and later-answer positions."""
    batch = dm.collate(batch_examples)
    with torch.no_grad():
        module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1)
    mask = loss_position_mask(batch["labels"])
    first, rest = [], []
    for mem_i, mem in module.memories.items():
        acc = mem.last_access
        for row, ex in enumerate(batch_examples):
            allowed = module.fact_slots.get(ex.fact_id, {}).get(mem_i) if module.select_per == "fact" else None
            pos = mask[row].nonzero().squeeze(1)
            for k, p in enumerate(pos.tolist()):
                ids, w = acc.indices[row, p].reshape(-1), acc.weights[row, p].reshape(-1)
                if allowed is None:
                    share = 1.0
                else:
                    share = float(w[torch.isin(ids, allowed)].sum() / w.sum())
                (first if k == 0 else rest).append(share)
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    return mean(first), mean(rest)


def run_variant(name, cfg, model, tok, dm, bg, method_over, data_over):
    from omegaconf import OmegaConf

    from smf_lightning.memory import memory_layers

    mem_over = {k.removeprefix("mem."): method_over.pop(k) for k in list(method_over) if k.startswith("mem.")}
    saved_mem = {}
    for mem in memory_layers(model).values():
        mem.values.weight.data.zero_()
        for k, v in mem_over.items():  # read-time settings only (score_scale): addressing ids are unchanged
            saved_mem[k] = getattr(mem.cfg, k)
            setattr(mem.cfg, k, v)
    mcfg = OmegaConf.to_container(cfg.method, resolve=True)
    mcfg.update(method_over)
    saved = {k: getattr(dm, k) for k in data_over}
    for k, v in data_over.items():
        setattr(dm, k, v)
    dm._train_examples = {}
    try:
        from smf_lightning.methods import build_method

        module = build_method(mcfg, model, background=bg, seed=int(cfg.seed))
        module.fact_slots = module.select_fact_slots(dm.training_examples(0), dm.collate) if module.select_per == "fact" else {}
        batches = dm.train_batches(0)
        cov = coverage(module, dm, batches[0])
        opt = module.configure_optimizers()
        wrap = SimpleNamespace(optimizer=opt, step=opt.step)
        n_per_pass = max(1, len(batches) // dm.epochs_per_task)
        losses, t0 = [], time.time()
        module.model.train()
        for b in batches:
            batch = dm.collate(b)
            opt.zero_grad(set_to_none=True)
            module.on_accumulation_start()
            loss = module.lm_loss(batch)
            loss.backward()
            module.after_backward(batch)
            module.take_optimizer_step(wrap)
            losses.append(float(loss.detach()))
        secs = (time.time() - t0) / len(batches)
        module.model.eval()
        rec = dm.evaluate_recall(model, tok, [0])[0]
        known = None
        if dm.suite_options:
            known = dm.heldout_suites()["triviaqa_known"].evaluate(model, tok, 64)["em"]
        passes = [round(sum(losses[i:i + n_per_pass]) / n_per_pass, 2) for i in range(0, len(losses), n_per_pass)]
        train_t = [t for t in rec if t not in dm.heldout_templates]
        row = {
            "variant": name,
            "coverage_first": round(cov[0], 3), "coverage_rest": round(cov[1], 3),
            "loss_per_pass": passes,
            "recall": round(sum(rec[t]["em"] for t in train_t) / len(train_t), 3),
            "recall_contains": round(sum(rec[t]["contains"] for t in train_t) / len(train_t), 3),
            "known_kept": known,
            "heldout": round(sum(rec[t]["em"] for t in dm.heldout_templates) / len(dm.heldout_templates), 3),
            "steps": len(batches), "s_per_step": round(secs, 2),
            "value_row_norm_max": round(float(max(m.values.weight.norm(dim=1).max() for m in memory_layers(model).values())), 2),
        }
        print(json.dumps(row), flush=True)
        return row
    finally:
        for mem in memory_layers(model).values():
            for k, v in saved_mem.items():
                setattr(mem.cfg, k, v)
        for k, v in saved.items():
            setattr(dm, k, v)
        dm._train_examples = {}


def main():
    ap = probe_arguments(__doc__)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg, model, tok, dm, bg = build(args)
    for spec in args.variants.split(","):
        # "name" from VARIANTS, or ad hoc "key=value+key=value" (method keys, or data.key)
        if spec in VARIANTS:
            m_over, d_over = VARIANTS[spec]
        else:
            m_over, d_over = {}, {}
            for kv in spec.split("+"):
                k, v = kv.split("=")
                v = json.loads(v) if v[:1].isdigit() or v[:1] in "-[{" or v in ("true", "false") else v
                (d_over if k.startswith("data.") else m_over)[k.removeprefix("data.")] = v
        row = run_variant(spec, cfg, model, tok, dm, bg, m_over, d_over)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
