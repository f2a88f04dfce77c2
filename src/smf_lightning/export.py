"""Export a run's updated model: ``python -m smf_lightning.export RUN_DIR OUT_DIR [--delta]``.

A full export is the retrofitted model (safetensors), loadable on its own with
``smf_lightning.load(OUT_DIR)`` and continued from with ``model.init_checkpoint=OUT_DIR``; a delta
(``--delta``) holds only what the stream changed and is applied to its base model when loaded.
Both carry the tokenizer, the fact ledger and the run's config (product/exports.py). OUT_DIR
must be new or empty; nothing is written when anything is wrong (exit 2, one line saying why).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import ConfigError


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m smf_lightning.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a run directory (.hydra/config.yaml, checkpoints/last.ckpt)")
    ap.add_argument("out", type=Path, help="the export directory to write (new or empty)")
    ap.add_argument("--delta", action="store_true", help="only what the stream changed (applied to the base model on load)")
    args = ap.parse_args(argv)
    from .product.base_model import build_start
    from .product.exports import check_new_dir, write_export
    from .product.open import load_run

    try:
        check_new_dir(args.out, args.run)
        run = load_run(args.run)
        start = None
        if args.delta:
            from .methods import method_class

            if not method_class(run.config.method).memory_only:
                raise ConfigError(f"{args.run}: method {run.config.method.name} trains weights outside the memory, "
                                  "so a delta of memory rows cannot hold its changes; export it in full.")
            start, _ = build_start(run.base, run.model.memory_config.to_dict(), expected=run.base["fingerprint"])
        meta = write_export(args.out, run.model, run.tokenizer, run.ledger, run.config, run.base, str(args.run), start)
    except ConfigError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the cause said
        raise SystemExit(2) from None
    print(f"exported {meta['kind']} model of {args.run} to {args.out}: {meta['facts']} facts in the ledger")
    if meta["kind"] == "delta":
        rows = ", ".join(f"layer {i}: {n}" for i, n in meta["delta_rows"].items())
        print(f"delta: {_mb(meta['bytes'])}, {100 * meta['bytes'] / meta['full_bytes']:.2f}% of the full export's "
              f"{_mb(meta['full_bytes'])} (value rows changed: {rows})")
    else:
        print(f"weights: {_mb(meta['bytes'])}")


if __name__ == "__main__":
    main()
