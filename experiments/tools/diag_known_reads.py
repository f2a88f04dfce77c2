"""Where do the known facts' reads of written rows pass the read gate? Position by position, token by token.

Loads a finished (or interrupted) run with a known-facts suite (``triviaqa_known``) and asks each
known question under the first training template, as the evaluation asks it. For every prompt
position it takes the read weight that lands on written rows and passes the gate (as the model
answers: the serving gate, if set), and splits the known facts into those the run lost (exact
match 0 at its last evaluation point, ``items/after_task_<last>/triviaqa_known.csv``) and those it
kept. Prints, per group: the passed weight per question by position kind (``question``: a token of
the question itself; ``template``: the template's tokens; ``answer``: the last position, which
predicts the answer), the tokens that carry most of it, and the strongest positions of the first
lost questions.

    python experiments/run.py diag known_reads RUN_DIR [--examples 12] [--out FILE.json]

Nothing here trains or changes the run; it reads evaluation items, as evaluation does.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter
from pathlib import Path

from diag_rephrased import load_run, prompt_reads

from smf_lightning.eval.metrics import items_folder, last_task_point


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--examples", type=int, default=12, help="lost questions printed with their strongest positions")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    last = last_task_point(args.run)
    known_csv = items_folder(args.run, last) / "triviaqa_known.csv" if last is not None else None
    if known_csv is None or not known_csv.is_file():
        raise SystemExit(f"{args.run}: no known-facts results at its last evaluation point "
                         "(items/after_task_<last>/triviaqa_known.csv); run it with data.suites.triviaqa_known")
    with open(known_csv) as fh:
        em = {r["id"]: float(r["em"]) for r in csv.DictReader(fh)}
    cfg, model, tok, dm, mems = load_run(args.run)
    layer = next(iter(mems))
    template = dm.templates[dm.train_templates[0]]
    known = dm.heldout_suites()["triviaqa_known"]
    by_token = {g: Counter() for g in ("lost", "kept")}
    by_kind = {g: Counter() for g in ("lost", "kept")}
    n = Counter()
    examples = []
    for f in known.facts:
        ids: list = []
        r = prompt_reads(model, tok, mems, template.prompt(f.question), ids)[layer]
        passed = (r["w"] * r["written"].float() * r["gate"]).sum((-1, -2)).tolist()  # per position
        group = "lost" if em.get(f.id, 1.0) == 0.0 else "kept"
        n[group] += 1
        tokens = [tok.decode([i]) for i in ids]
        own = set(tok(" " + f.question, add_special_tokens=False)["input_ids"])
        for p, (t, v) in enumerate(zip(tokens, passed)):
            if v <= 0:
                continue
            by_token[group][t] += v
            by_kind[group]["answer" if p == len(tokens) - 1 else "question" if ids[p] in own else "template"] += v
        if group == "lost" and len(examples) < args.examples:
            top = sorted(((v, t) for t, v in zip(tokens, passed) if v > 0), reverse=True)[:5]
            examples.append({"question": f.question, "top": [[t, round(v, 3)] for v, t in top]})
    report = {"run": str(args.run), "layer": layer, "facts": dict(n),
              "per_question_by_kind": {g: {k: v / max(n[g], 1) for k, v in by_kind[g].items()} for g in by_kind},
              "top_tokens": {g: [[t, v / max(n[g], 1)] for t, v in by_token[g].most_common(15)] for g in by_token},
              "lost_examples": examples}
    for g in ("lost", "kept"):
        kinds = {k: round(v, 3) for k, v in report["per_question_by_kind"][g].items()}
        print(f"{g.upper()} {n[g]} known facts; passed read weight on written rows per question, by position: {kinds}")
        print("  tokens carrying most of it:", [(t, round(v, 3)) for t, v in report["top_tokens"][g]])
    for e in examples:
        print(e["question"], [tuple(x) for x in e["top"]])
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
