"""Ask an updated model: ``python -m smf_lightning.ask PATH "question" ["question" ...]``.

PATH is a run directory or an export. Each question is asked as the evaluation asks a fact: under
the run's first training template (``--template NAME`` another, ``--raw`` the bare text), greedily,
for the evaluation's number of tokens (``--max-new-tokens``); one answer per line. Without
questions, one is read per line from stdin (``> `` when it is a terminal). ``--explain`` adds,
under each answer, the taught facts whose memory rows the prompt read and the share of its read
weight they carried (top 5; over every position of the prompt, or with ``--explain-at answer``
its last position only; product/answer.py). ``--json`` prints one JSON
object per question instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ConfigError


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m smf_lightning.ask", description=__doc__.split("\n\n")[0])
    ap.add_argument("path", type=Path, help="a run directory or an export")
    ap.add_argument("questions", nargs="*", help="questions (none: one per line from stdin)")
    ap.add_argument("--template", default=None, help="the run's template to ask under (default: its first training template)")
    ap.add_argument("--raw", action="store_true", help="the question is the whole prompt (no template)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="greedy tokens (default: the run's fact recall)")
    ap.add_argument("--explain", action="store_true", help="which taught facts' rows each answer read")
    ap.add_argument("--explain-at", choices=("prompt", "answer"), default="prompt",
                    help="--explain over every position of the prompt (default) or its last (answer) position only")
    ap.add_argument("--json", action="store_true", help="one JSON object per question")
    ap.add_argument("--base", default=None, help="a delta export's base model, if not where the export records it")
    args = ap.parse_args(argv)
    from .product.answer import AskSettings, Explainer, answers
    from .product.open import open_model

    try:
        if args.raw and args.template:
            raise ConfigError("--raw asks the bare question; it takes no --template.")
        if args.max_new_tokens is not None and args.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens={args.max_new_tokens}; give a number >= 1.")
        opened = open_model(args.path, args.base)
        if opened.config is None and not (args.raw and args.max_new_tokens):
            raise ConfigError(f"{args.path} has no run config (templates, answer length): ask with --raw --max-new-tokens N.")
        settings = AskSettings.from_config(opened.config) if opened.config is not None else None
        template = None if args.raw else settings.template(args.template)
    except ConfigError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the cause said
        raise SystemExit(2) from None
    max_new = args.max_new_tokens or settings.max_new_tokens
    explain = Explainer(opened.model, opened.tokenizer, opened.ledger, args.explain_at) if args.explain else None

    def reply(questions: list[str]) -> None:
        prompts = [q if template is None else template.prompt(q) for q in questions]
        # the run's fact-recall batches (the same batches give the same answers); without a run config, one batch
        batch_size = settings.batch_size if settings is not None else len(prompts)
        for q, p, a in zip(questions, prompts, answers(opened.model, opened.tokenizer, prompts, max_new, batch_size)):
            readings = explain(p) if explain is not None else []
            if args.json:
                facts = [{"fact": r.fact, "share": r.share, "task": opened.ledger.facts[r.fact].task,
                          "question": opened.ledger.facts[r.fact].question, "answer": opened.ledger.facts[r.fact].answer}
                         for r in readings]
                print(json.dumps({"question": q, "prompt": p, "answer": a, **({"explain": facts} if explain else {})}))
            else:
                print(a.strip())
                for r in readings:
                    e = opened.ledger.facts[r.fact]
                    print(f"    {r.share:6.1%}  {r.fact}" + (f"  ({e.question} -> {e.answer})" if e.question else ""))
                if explain is not None and not readings:
                    print("    (no taught fact's rows read)")
            sys.stdout.flush()

    if args.questions:
        reply(args.questions)
    elif sys.stdin.isatty():
        while True:
            try:
                line = input("> ").strip()
            except EOFError:
                break
            if line:
                reply([line])
    else:
        reply([line.strip() for line in sys.stdin if line.strip()])


if __name__ == "__main__":
    main()
