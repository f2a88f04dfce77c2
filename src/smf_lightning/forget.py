"""Forget taught facts: ``python -m smf_lightning.forget EXPORT FACT_ID [FACT_ID ...] --out OUT``.

The rows the facts own go back to their pre-stream content (values, write keys; product/edit.py),
the facts leave the ledger, and the result is written as a new export of the same kind to OUT;
EXPORT is never modified. Other facts that shared a restored row are listed with how many of their
rows were restored. An unknown fact id, a bad path or an OUT that is not new stops it with one
line and exit code 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import ConfigError


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m smf_lightning.forget", description=__doc__.split("\n\n")[0])
    ap.add_argument("export", type=Path, help="an export directory (python -m smf_lightning.export)")
    ap.add_argument("facts", nargs="+", metavar="FACT_ID", help="fact ids of the export's ledger.json")
    ap.add_argument("--out", type=Path, required=True, help="the new export to write (new or empty directory)")
    ap.add_argument("--base", default=None, help="a delta's base model, if not where the export records it")
    args = ap.parse_args(argv)
    from .product.base_model import build_start
    from .product.edit import forget
    from .product.exports import check_new_dir, read_export, write_export

    try:
        check_new_dir(args.out, args.export)
        export = read_export(args.export, args.base)
        report = forget(export.model, export.ledger, args.facts)
        meta = export.meta
        start = None
        if meta["kind"] == "delta":
            start, _ = build_start(meta["base"], meta["memory"], expected=meta["base"]["fingerprint"], base=args.base)
        write_export(args.out, export.model, export.tokenizer, export.ledger, export.config, meta["base"],
                     str(args.export), start)
    except ConfigError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the cause said
        raise SystemExit(2) from None
    rows = ", ".join(f"layer {i}: {n}" for i, n in report.restored.items()) or "none"
    print(f"forgot {', '.join(report.forgotten)}: rows restored to their pre-stream content ({rows}); "
          f"new {meta['kind']} export in {args.out}")
    for fact, (n, total) in report.shared.items():
        print(f"  {fact} shared {n} of its {total} rows with them: restored too")


if __name__ == "__main__":
    main()
