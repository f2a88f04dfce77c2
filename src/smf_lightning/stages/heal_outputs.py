"""The healing run's curves as files (stages/heal.py writes them next to heal_summary.json):
heal_metrics.csv (step, training loss, held-out perplexity) and heal_ppl.png."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path


def write_metrics_csv(history: Sequence[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "train_loss", "heldout_ppl"])
        writer.writeheader()
        for row in history:
            writer.writerow({k: ("" if row[k] is None else row[k]) for k in writer.fieldnames})
    return path


def plot_healing(history: Sequence[dict], base_ppl: float, target_ppl: float | None, path: Path) -> Path:
    """Held-out perplexity over healing steps against the base model (and the target)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    pts = [(r["step"], r["heldout_ppl"]) for r in history if r["heldout_ppl"] is not None]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(*zip(*pts), marker="o", label="retrofitted (healing)")
    ax.axhline(base_ppl, color="k", lw=1, ls="--", label=f"base model ({base_ppl:.2f})")
    if target_ppl is not None:
        ax.axhline(target_ppl, color="g", lw=1, ls=":", label=f"target ({target_ppl:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("healing step")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("healing: held-out perplexity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
