"""What would a stricter (or looser) read gate have given a trained run? Re-asks a finished run at
other read-gate thresholds, without training.

Loads a finished (or interrupted) run — its config, its checkpoint's value rows and write keys —
and, for every threshold tau of ``--gates`` (``off`` = no gate: every read of a written row
counts), sets ``read_gate=tau`` on every memory layer and scores, as the run's evaluation does:

- ``trained``: recall of every stream fact under the first training template (exact match);
- ``rephrased``: recall of the facts' evaluation-only rephrasings (exact match and "contains");
- ``known``: the known-facts suite (exact match: 1.00 before the stream by construction);
- with ``--suites``: every other held-out suite of the run (NQ, HellaSwag, GSM8K, LAMBADA, ...), its
  primary metric and its relative change from the run's own "before" point (heldout.csv).

``--keys writers`` asks what a different gate would do: a read of a written row is compared with
each query that wrote the row (rebuilt from the run's training sequences and fact ledger:
:class:`WriterKeys`) instead of the row's mean write key, and passes if the nearest is >= tau.

The run's own threshold is one row of the table, so its figures must reproduce the run's
``summary.json`` (printed beside them as a check). The write keys and values were trained under
the run's own gate, so another threshold here says which reads pass and what they carry, not
what training under that threshold would have written: a screen for which training rows to run,
never a result row.

    python experiments/run.py diag gate_sweep RUN_DIR --gates 0.5,0.6,0.7,0.8,off [--suites] [--out FILE.json]
    python experiments/run.py diag gate_sweep RUN_DIR --keys writers --gates 0.7,0.8,0.9   # nearest-writer gate
    python experiments/run.py diag gate_sweep --plot FRONTIER.png --from A.json [B.json ...]   # sweeps, one plot

Nothing here trains or changes the run; it reads evaluation items, as evaluation does.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path


def parse_gates(text: str) -> list[float | None]:
    """'0.5,0.7,off' -> [0.5, 0.7, None]; a value outside [-1, 1] is refused (a cosine)."""
    gates: list[float | None] = []
    for part in text.split(","):
        part = part.strip()
        if part in ("off", "null", "none"):
            gates.append(None)
            continue
        value = float(part)
        if not -1.0 <= value <= 1.0:
            raise SystemExit(f"--gates: {part} is not a cosine threshold in [-1, 1]")
        gates.append(value)
    return gates


def before_values(heldout_csv: Path) -> dict[tuple[str, str], float]:
    """(suite, metric) -> its value at the run's "before" evaluation point (heldout.csv); {} if none."""
    if not heldout_csv.is_file():
        return {}
    with open(heldout_csv) as fh:
        return {(r["suite"], r["metric"]): float(r["value"]) for r in csv.DictReader(fh) if r["label"] == "before"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, nargs="?")
    ap.add_argument("--gates", default="0.5,0.6,0.7,0.8,off", help="comma-separated thresholds; 'off' = no gate")
    ap.add_argument("--keys", choices=("mean", "writers"), default="mean",
                    help="what a read is compared with: the row's mean write key (the layer's gate) or, post hoc, "
                         "each query that wrote the row (WriterKeys: the nearest writer)")
    ap.add_argument("--suites", action="store_true", help="also the run's other held-out suites (minutes per gate)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="PNG: rephrased recall against known facts kept, per gate")
    ap.add_argument("--from", dest="sweeps", type=Path, nargs="+", default=None,
                    help="plot these sweeps' JSON files (--out of earlier runs) instead of running one")
    args = ap.parse_args()
    if args.sweeps:
        if not args.plot:
            raise SystemExit("--from plots earlier sweeps: give --plot FILE.png")
        plot_frontier([json.loads(p.read_text()) for p in args.sweeps], args.plot)
        return
    if args.run is None:
        raise SystemExit("give a run directory (or --from SWEEP.json ... --plot FILE.png)")
    gates = parse_gates(args.gates)

    from smf_lightning.memory import memory_layers
    from smf_lightning.product.open import load_run

    run = load_run(args.run)
    mems = memory_layers(run.model)
    own = {m.cfg.read_gate for m in mems.values()}
    serving = {m.cfg.serve_gate for m in mems.values()} - {None}
    if any(m.cfg.read_gate is None for m in mems.values()) and any(g is not None for g in gates):
        # without a gate the run kept no write keys: a threshold has nothing to compare with
        raise SystemExit(f"{args.run}: the run trained without a read gate (no write keys); only 'off' applies")
    dm = run.datamodule
    bs = dm.generation_batch_size
    tasks = range(dm.n_tasks)
    trained = [dm.recall_suites(j)[dm.train_templates[0]] for j in tasks]
    rephrased = [s for j in tasks if (s := dm.rephrased_suite(j)) is not None]
    known = dm.heldout_suites().get("triviaqa_known")
    others = {n: s for n, s in dm.heldout_suites().items() if s is not known} if args.suites else {}
    before = before_values(args.run / "heldout.csv")

    def mean_over(suites, key: str) -> float | None:
        values = [v for s in suites for v in s.last_items[key]]
        return sum(values) / len(values) if values else None

    if args.keys == "writers":
        t0 = time.perf_counter()
        writers = WriterKeys(run, {i: m for i, m in mems.items() if m.cfg.read_gate is not None})
        writers.install()
        print(f"writers' keys: {writers.n_pairs} (row, writing position) pairs per layer, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for gate in gates:
        for m in mems.values():  # the threshold the sweep asks at, in eval mode too (no serving gate)
            m.cfg.read_gate, m.cfg.serve_gate = gate, None
        t0 = time.perf_counter()
        for s in (*trained, *rephrased, *([known] if known is not None else [])):
            s.evaluate(run.model, run.tokenizer, bs)
        row = {"gate": gate, "trained_em": mean_over(trained, "em"), "rephrased_em": mean_over(rephrased, "em"),
               "rephrased_contains": mean_over(rephrased, "contains"),
               "known_em": mean_over([known], "em") if known is not None else None,
               "n_trained": sum(len(s.facts) for s in trained), "n_rephrased": sum(len(s.facts) for s in rephrased),
               "n_known": len(known.facts) if known is not None else 0}
        for name, suite in others.items():
            value = suite.evaluate(run.model, run.tokenizer, dm.eval_batch_size)[suite.primary_metric]
            base = before.get((name, suite.primary_metric))
            row[f"{name}/{suite.primary_metric}"] = value
            row[f"{name}/rel_change"] = None if not base else (value - base) / abs(base)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)

    summary_file = args.run / "summary.json"
    reported = {}
    if summary_file.is_file():
        s = json.loads(summary_file.read_text())
        reported = {k: s.get(k) for k in ("fact_recall", "fact_recall_rephrased", "fact_recall_rephrased_contains") if k in s}
    print(f"run {args.run}: trained with read_gate {sorted(own, key=str)}"
          + (f", answered with serve_gate {sorted(serving)}" if serving else "") + f"; its summary: {reported}")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    pct = lambda v: "-" if v is None else f"{100 * v:+.1f}%"  # noqa: E731
    print(f"{'gate':>6} {'trained':>8} {'rephrased':>10} {'(contains)':>11} {'known':>6}"
          + "".join(f" {n:>12}" for n in others))
    for r in rows:
        print(f"{str(r['gate']):>6} {fmt(r['trained_em']):>8} {fmt(r['rephrased_em']):>10} "
              f"{fmt(r['rephrased_contains']):>11} {fmt(r['known_em']):>6}"
              + "".join(f" {pct(r[f'{n}/rel_change']):>12}" for n in others))
    sweep = {"run": str(args.run), "keys": args.keys, "trained_gate": sorted(own, key=str), "rows": rows, "reported": reported}
    if args.out:
        args.out.write_text(json.dumps(sweep, indent=2))
    if args.plot:
        plot_frontier([sweep], args.plot)


def plot_frontier(sweeps: list[dict], out: Path) -> None:
    """One line per sweep: known facts kept (x) against rephrased recall (y), a point per gate,
    labelled with its threshold; the run's folder name in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for sweep in sweeps:
        rows = [r for r in sweep["rows"] if r.get("known_em") is not None and r.get("rephrased_em") is not None]
        rows.sort(key=lambda r: -1.0 if r["gate"] is None else r["gate"])
        xs, ys = [r["known_em"] for r in rows], [r["rephrased_em"] for r in rows]
        line, = ax.plot(xs, ys, marker="o", label=f"{Path(sweep['run']).name}{' (writers)' if sweep.get('keys') == 'writers' else ''} (n known {rows[0]['n_known'] if rows else 0})")
        for r, x, y in zip(rows, xs, ys):
            ax.annotate("off" if r["gate"] is None else f"{r['gate']:g}", (x, y), textcoords="offset points",
                        xytext=(4, 4), fontsize=8, color=line.get_color())
    ax.set_xlabel("known facts kept (exact match)")
    ax.set_ylabel("rephrased recall (exact match)")
    ax.set_title("read-gate threshold when answering: rephrased recall vs locality")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"wrote {out}")


# ---- writers' keys: a read passes if it is near one query that wrote the row -----------------
class WriterKeys:
    """Per memory layer, the normalised queries of the training positions that wrote each row,
    for a nearest-writer gate: a read of a written row passes if its cosine with *some* writing
    query of that row (not with the row's mean write key) is >= tau.

    Rebuilt post hoc from the run's own training sequences (every task's, as the data module builds
    them: every training template, paraphrase and rewording) and its fact ledger: the queries of a
    fact's loss positions (``loss_position_mask``, as SMF counts them; skipped frequent tokens are
    not removed) that read one of the rows the ledger says the fact was updated for, with a read weight >=
    ``min_weight``. The queries of a memory layer depend only on the layers below it, so with one
    memory layer they are exactly the queries training saw; rows another fact in the same batch
    wrote are not counted (per-owner keys). Rows with a write key but no writer here keep the mean
    key's test."""

    def __init__(self, run, mems: dict, min_weight: float = 1e-3, batch_size: int = 16):
        import torch

        from diag_rephrased import lookups

        from smf_lightning.memory.positions import loss_position_mask

        dm, ledger = run.datamodule, run.ledger
        self.mems = mems
        queries = {i: [] for i in mems}  # per layer: [P, heads, k_dim] blocks
        pairs = {i: [] for i in mems}    # per layer: (row * heads + head, position id) blocks
        count = {i: 0 for i in mems}
        own = {f: e.rows for f, e in ledger.facts.items()}
        for j in range(dm.n_tasks):
            examples = dm.training_examples(j)
            for start in range(0, len(examples), batch_size):
                chunk = examples[start:start + batch_size]
                batch = dm.collate(chunk)
                reads = lookups(run.model, mems, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                mask = loss_position_mask(batch["labels"])
                for i, (idx, w, qn) in reads.items():
                    for b, ex in enumerate(chunk):
                        rows = own.get(ex.fact_id, {}).get(i)
                        pos = torch.nonzero(mask[b]).squeeze(1)
                        if rows is None or rows.numel() == 0 or pos.numel() == 0:
                            continue
                        ids, ws = idx[b, pos], w[b, pos]  # [P, heads, knn]
                        hit = torch.isin(ids, rows) & (ws >= min_weight)
                        p_local, h, _ = torch.nonzero(hit, as_tuple=True)
                        if p_local.numel() == 0:
                            continue
                        queries[i].append(qn[b, pos])
                        key = ids[hit] * mems[i].heads + h
                        pairs[i].append(torch.stack([key, p_local + count[i]], 1))
                        count[i] += pos.numel()
        self.keys, self.starts, self.counts, self.pos, self.queries = {}, {}, {}, {}, {}
        for i in mems:
            if not pairs[i]:
                continue
            pr = torch.unique(torch.cat(pairs[i]), dim=0)  # sorted by key, then position
            ukeys, counts = torch.unique_consecutive(pr[:, 0], return_counts=True)
            self.keys[i], self.counts[i] = ukeys, counts
            self.starts[i] = torch.cumsum(counts, 0) - counts
            self.pos[i] = pr[:, 1]
            self.queries[i] = torch.cat(queries[i])  # [P, heads, k_dim]
        self.n_pairs = {i: int(self.pos[i].numel()) for i in self.pos}

    def install(self) -> None:
        """Make every memory layer's read gate the nearest-writer test (until ``remove``)."""
        for i, mem in self.mems.items():
            mem._read_gate = self._gate_for(i, mem)

    def remove(self) -> None:
        for mem in self.mems.values():
            mem.__dict__.pop("_read_gate", None)

    def _gate_for(self, i: int, mem):
        import torch

        mean_gate = type(mem)._read_gate.__get__(mem)
        if i not in self.keys:
            return mean_gate
        ukeys, starts, counts, pos, Q = self.keys[i], self.starts[i], self.counts[i], self.pos[i], self.queries[i]

        def gate(idx, q, tau):
            g = mean_gate(idx, q, tau)  # rows without writers here: the mean key's test
            head = torch.arange(mem.heads).view(1, 1, mem.heads, 1).expand_as(idx)
            key = (idx * mem.heads + head).reshape(-1)
            at = torch.searchsorted(ukeys, key).clamp(max=ukeys.numel() - 1)
            found = ukeys[at] == key
            if not bool(found.any()):
                return g
            reads = torch.nonzero(found).squeeze(1)
            n = counts[at[reads]]
            read_of = torch.repeat_interleave(torch.arange(reads.numel()), n)
            offset = torch.arange(int(n.sum())) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
            pair = starts[at[reads]][read_of] + offset
            h = (key[reads] % mem.heads)[read_of]
            reading = q.unsqueeze(3).expand(*idx.shape, q.shape[-1]).reshape(-1, q.shape[-1])[reads][read_of]
            cos = (reading * Q[pos[pair], h]).sum(-1)
            best = torch.full((reads.numel(),), -2.0).scatter_reduce(0, read_of, cos, reduce="amax")
            flat = g.reshape(-1).clone()
            flat[reads] = (best >= tau).float()
            return flat.view_as(g)

        return gate


if __name__ == "__main__":
    main()
