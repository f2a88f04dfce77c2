"""95% intervals by bootstrap over items: one evaluation point, and the paired change between
two points that scored the same items.

At 16-200 items a suite's number moves in steps of one or two answers, so a difference between
methods means little without its interval. The percentile bootstrap (Efron & Tibshirani 1993,
ch. 13) resamples the *items* with replacement and recomputes the aggregate exactly as the point
estimate is computed (`metrics.Aggregate`: a mean of per-item scores, or a ratio of sums for
token-weighted NLLs and perplexities, never a mean of per-item perplexities).

The change since before training is *paired*: both points scored the same items, so one set of
resampled item indices is applied to both, and the item-to-item variation that the two points
share cancels (the paired interval is much narrower than two independent ones).

Our own seeded resampler instead of `torchmetrics.wrappers.BootStrapper`: BootStrapper draws
new poisson/multinomial weights at every `update` from the global torch RNG (resampling would
reseed or perturb training's random stream), keeps one metric copy per resample, and cannot
apply the same resample to two evaluation points, which the paired interval needs. Here a
private `numpy.random.Generator` draws the index matrix once, vectorised over resamples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from .metrics import Aggregate, aggregate

LEVEL = 0.95  # the summary's keys are named ci95


def resample_indices(n_items: int, n_resamples: int, seed: int | Sequence[int]) -> np.ndarray:
    """[n_resamples, n_items] item indices drawn with replacement, reproducible from `seed`."""
    if n_items < 1 or n_resamples < 1:
        raise ValueError(f"bootstrap needs at least one item and one resample; got {n_items} items, {n_resamples} resamples")
    return np.random.default_rng(seed).integers(0, n_items, size=(n_resamples, n_items))


def percentile_interval(stats: np.ndarray, level: float = LEVEL) -> tuple[float, float] | None:
    """Central `level` percentile interval of bootstrap statistics (linear interpolation between
    order statistics); resamples where the statistic is undefined or overflows (NaN, e.g. a
    relative change from 0; inf) are left out; None when none is left."""
    finite = stats[np.isfinite(stats)]
    if finite.size == 0:
        return None
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(finite, [tail, 1.0 - tail])
    return float(low), float(high)


def columns_array(columns: Mapping[str, Sequence], names: Sequence[str]) -> dict[str, np.ndarray]:
    return {n: np.asarray(columns[n], dtype=np.float64) for n in names}


def resampled(agg: Aggregate, columns: Mapping[str, Sequence], idx: np.ndarray) -> np.ndarray:
    """The aggregate of every resample (one row of `idx` each): [n_resamples]."""
    cols = columns_array(columns, agg.columns)
    num = cols[agg.num][idx]
    if agg.kind == "mean":
        return num.mean(axis=1)
    if agg.kind == "ppl_mean":
        return np.exp(-num.mean(axis=1))
    ratio = -num.sum(axis=1) / cols[agg.den][idx].sum(axis=1)
    if agg.kind == "nll_ratio":
        return ratio
    if agg.kind == "bits_ratio":
        return ratio / math.log(2)
    if agg.kind == "ppl_ratio":
        return np.exp(ratio)
    raise ValueError(f"unknown aggregate kind {agg.kind!r}")


def relative_changes(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """(after - before) / |before| per resample; NaN where before is 0 (metrics.relative_change)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(before == 0, np.nan, (after - before) / np.abs(before))


def point_interval(agg: Aggregate, columns: Mapping[str, Sequence], n_resamples: int, seed: int) -> tuple[float, float] | None:
    """95% interval of one evaluation point's metric."""
    idx = resample_indices(len(columns[agg.num]), n_resamples, seed)
    return percentile_interval(resampled(agg, columns, idx))


def paired_resampled(
    agg: Aggregate, before: Mapping[str, Sequence], after: Mapping[str, Sequence], n_resamples: int, seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(before, after) aggregates of the same resamples of the items scored at both points."""
    check_same_items(before, after)
    idx = resample_indices(len(before[agg.num]), n_resamples, seed)
    return resampled(agg, before, idx), resampled(agg, after, idx)


def paired_intervals(
    agg: Aggregate, before: Mapping[str, Sequence], after: Mapping[str, Sequence], n_resamples: int, seed: int,
) -> dict[str, tuple[float, float] | None]:
    """Paired 95% intervals of the change from `before` to `after` (the same items, same order):
    {"change": after - before, "rel_change": (after - before) / |before|}."""
    b, a = paired_resampled(agg, before, after, n_resamples, seed)
    return {"change": percentile_interval(a - b), "rel_change": percentile_interval(relative_changes(b, a))}


def check_same_items(before: Mapping[str, Sequence], after: Mapping[str, Sequence]) -> None:
    if "id" in before and "id" in after and list(before["id"]) != list(after["id"]):
        raise ValueError("a paired bootstrap needs the same items in the same order at both evaluation points")


# ----------------------------------------------------------------------------- fact recall
# Recall records of one evaluation point: columns "task", "template", "id", "prediction", "em",
# "contains", one row per (task, template, fact), facts in stream order within a task.


def recall_task_means(records: Mapping[str, Sequence], tasks: Sequence[int], templates: Sequence[str], score: str) -> dict[int, float]:
    """Task j's recall: the mean over `templates` of the mean over the task's facts of `score`
    (the accuracy matrix's entry), in exactly the arithmetic of FactRecallSuite.score_predictions.
    A fact with several rows under one template (its rephrasings) counts once, with the mean of
    its rows. Tasks without a row under some template are left out."""
    out = {}
    for j in tasks:
        columns = [_per_fact(records, j, t, score) for t in templates]
        if not all(columns):
            continue
        per_template = [aggregate(Aggregate("mean", score), {score: col}) for col in columns]
        out[j] = sum(per_template) / len(per_template)
    return out


def _select(records: Mapping[str, Sequence], task: int, template: str, column: str) -> list:
    return [v for j, t, v in zip(records["task"], records["template"], records[column]) if j == task and t == template]


def _per_fact(records: Mapping[str, Sequence], task: int, template: str, column: str) -> list:
    """`column` per fact of (task, template), in order of first appearance: the row itself when
    each fact has one row (every template), the mean of a fact's rows when it has several (the
    rephrasings of a fact: the fact, not the rephrasing, is the item)."""
    values = _select(records, task, template, column)
    if "id" not in records:
        return values
    ids = _select(records, task, template, "id")
    if len(set(ids)) == len(ids):
        return values
    grouped: dict[str, list] = {}
    for fact_id, v in zip(ids, values):
        grouped.setdefault(fact_id, []).append(v)
    return [sum(vs) / len(vs) for vs in grouped.values()]


def recall_resampled(
    records: Mapping[str, Sequence], tasks: Sequence[int], templates: Sequence[str], score: str, n_resamples: int, seed: int,
) -> dict[int, np.ndarray]:
    """Task j's recall in every resample: [n_resamples] per task. Facts are resampled *within*
    each task (the stream fixes how many facts a task has, and the bootstrap keeps that design),
    a fact's templates together (the fact is the item). Task j's indices depend only on (seed,
    j, its number of facts), the same at every evaluation point, so changes are paired."""
    out = {}
    for j in tasks:
        columns = [_per_fact(records, j, t, score) for t in templates]
        if not all(columns):
            continue
        scores = np.asarray(columns, dtype=np.float64)  # [templates, facts]
        idx = resample_indices(scores.shape[1], n_resamples, [seed, j])
        out[j] = scores[:, idx].mean(axis=2).mean(axis=0)  # [templates, B, facts] -> [B]
    return out
