"""PNG plots people would rather look at than read: R heatmap, forgetting curves,
slot statistics, and a sweep's learning-vs-forgetting (Pareto) plot."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy_matrix(R: list[list[float | None]], row_labels: list[str], path: Path, title: str) -> Path:
    """Heatmap of R (rows: evaluation points, columns: tasks); unseen cells blank."""
    arr = np.array([[np.nan if v is None else v for v in row] for row in R], dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * arr.shape[1], 1.0 + 0.5 * arr.shape[0]))
    im = ax.imshow(arr, vmin=0, vmax=1, cmap="viridis")
    for (i, j), v in np.ndenumerate(arr):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
    ax.set_xticks(range(arr.shape[1]), [f"task {j}" for j in range(arr.shape[1])])
    ax.set_yticks(range(arr.shape[0]), row_labels)
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after training")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def _yerr(values: list[float], intervals: list) -> np.ndarray:
    """Asymmetric error bars [2, n] from (low, high) intervals; 0 where a point has none."""
    err = np.zeros((2, len(values)))
    for i, (v, iv) in enumerate(zip(values, intervals)):
        if iv is not None and not np.isnan(v):
            err[:, i] = max(v - iv[0], 0.0), max(iv[1] - v, 0.0)
    return err


def plot_forgetting_curves(
    R: list[list[float | None]], heldout: dict[str, list[float]], row_labels: list[str], path: Path,
    R_ci: list[list] | None = None, heldout_rel_ci: dict[str, list] | None = None,
) -> Path:
    """Left: each task's recall over the sequence. Right: held-out suites' relative change.
    Error bars: 95% bootstrap intervals, `R_ci[point][task]` and (paired with before training)
    `heldout_rel_ci[suite][point]` as fractions; None where a point has none."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(R))
    for j in range(len(R[0]) if R else 0):
        ys = [row[j] if row[j] is not None else np.nan for row in R]
        ivs = [row[j] for row in R_ci] if R_ci else [None] * len(ys)
        a.errorbar(x, ys, yerr=_yerr(ys, ivs), marker="o", capsize=3, label=f"task {j}")
    a.set_xticks(x, row_labels, rotation=30)
    a.set_ylim(-0.02, 1.02)
    a.set_ylabel("fact recall (95% CI)")
    a.set_title("fact recall per task (forgetting curves)")
    a.legend(fontsize=7)
    for name, vals in heldout.items():
        base = vals[0]
        rel = [100.0 * (v - base) / abs(base) if base and v is not None else np.nan for v in vals]
        xs = [i for i, r in enumerate(rel) if not np.isnan(r)]  # points without suite results are skipped
        rel_ci = (heldout_rel_ci or {}).get(name) or [None] * len(vals)
        ivs = [None if rel_ci[i] is None else (100.0 * rel_ci[i][0], 100.0 * rel_ci[i][1]) for i in xs]
        ys = [rel[i] for i in xs]
        b.errorbar(xs, ys, yerr=_yerr(ys, ivs), marker="o", capsize=3, label=name)
    b.axhline(0, color="grey", lw=0.8)
    b.set_xticks(np.arange(len(row_labels)), row_labels, rotation=30)
    b.set_ylabel("% change vs before training (paired 95% CI)")
    b.set_title("held-out capabilities")
    b.legend(fontsize=7)
    return _save(fig, path)


def plot_slot_stats(rows: list[dict], path: Path) -> Path:
    """Per-step slot statistics for each memory layer (KL, selected, overlap, hub share)."""
    keys = [("kl", "KL(p_batch || p_bg)"), ("accessed", "accessed slots"), ("overlap", "Jaccard overlap with earlier tasks"), ("hub_share", "top-1% share of accesses")]
    layers = sorted({r["layer"] for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.3))
    for ax, (k, title) in zip(axes, keys):
        for layer in layers:
            pts = [(r["step"], r[k]) for r in rows if r["layer"] == layer and r.get(k) is not None]
            if pts:
                ax.plot(*zip(*pts), label=f"layer {layer}", lw=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_pareto(points: list[dict], path: Path) -> Path:
    """Learning (final fact recall) vs forgetting (held-out relative change), one dot per run;
    error bars where a point has `fact_recall_ci95` / `forgetting_pct_ci95` (low, high)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for p in points:
        x, y = p["forgetting_pct"], p["fact_recall"]
        ax.errorbar(x, y, xerr=_yerr([x], [p.get("forgetting_pct_ci95")]), yerr=_yerr([y], [p.get("fact_recall_ci95")]),
                    marker="o", ms=6, capsize=3)
        ax.annotate(p["label"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("held-out degradation, % (primary metric of each suite, averaged; lower is better)")
    ax.set_ylabel("final fact recall (higher is better)")
    ax.set_title("learning vs forgetting (95% CI)")
    ax.grid(alpha=0.3)
    return _save(fig, path)
