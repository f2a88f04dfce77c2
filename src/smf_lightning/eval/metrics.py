"""Pure metric functions: answer matching, choice accuracy, continual-learning summaries.

Nothing here touches a model; everything takes plain Python values so it can be
checked against hand-computed cases (tests/test_eval.py).

Answer matching follows the SQuAD v1.1 evaluation script (Rajpurkar et al. 2016), which
TriviaQA and NaturalQuestions-open evaluation reuse: lower-case, drop punctuation, drop
the articles a/an/the, collapse whitespace; exact match and token-level F1 take the best
score over the gold aliases (normalize_answer, exact_match and contains_answer come from
smf_lightning/text.py). Fact recall cuts the answer out of a greedy continuation first
(extract_answer, recall_scores).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# normalisation, exact match and containment live in the leaf module text.py (the data layer
# filters questions with them too); they are part of this module's interface as before
from smf_lightning.text import contains_answer, exact_match, normalize_answer  # noqa: F401


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    """SQuAD token-level F1 (bag of normalised tokens), best over the gold answers."""
    pred_tokens = normalize_answer(prediction).split()
    best = 0.0
    for gold in golds:
        gold_tokens = normalize_answer(gold).split()
        if not pred_tokens or not gold_tokens:
            # SQuAD v2 convention: both empty -> 1, one empty -> 0.
            best = max(best, float(pred_tokens == gold_tokens))
            continue
        common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
        if common == 0:
            continue
        precision = common / len(pred_tokens)
        recall = common / len(gold_tokens)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def extract_answer(generated: str, suffix: str) -> str:
    """The answer part of a greedy continuation: first line, cut before the template's suffix
    (its first non-space character followed by whitespace or the end, e.g. ". " for a
    suffix "."). An answer that itself contains that character ("St. Louis") is cut too;
    fact_recall therefore also accepts an exact match of the whole first line."""
    line = generated.split("\n", 1)[0].strip()
    marker = suffix.strip()[:1]
    if marker:
        cut = re.search(re.escape(marker) + r"(\s|$)", line)
        if cut:
            line = line[: cut.start()]
    return line.strip()


def recall_scores(generated: str, suffix: str, aliases: Sequence[str]) -> tuple[float, float]:
    """(exact match, containment) of one greedy continuation against the aliases.

    Exact match (the primary recall metric) compares the extracted answer — or the whole
    first line — with each alias after SQuAD normalisation: "Niger Niger Niger" is not
    "Niger" (docs/design.md §9). Containment is the lenient variant and does count such repeats.
    """
    line = generated.split("\n", 1)[0]
    em = max(exact_match(extract_answer(generated, suffix), aliases), exact_match(line, aliases))
    return em, contains_answer(line, aliases)


def normalized_choice(logprob_sums: Sequence[float], lengths: Sequence[float]) -> int:
    """Index of the choice with the highest log-likelihood per unit of length.

    `lengths` is whatever unit normalises the choice (characters for HellaSwag here, as
    lm-evaluation-harness's acc_norm does, so the score does not depend on the tokenizer).
    Ties go to the lowest index.
    """
    if len(logprob_sums) != len(lengths) or not logprob_sums:
        raise ValueError(
            f"normalized_choice needs one length per choice and at least one choice; got "
            f"{len(logprob_sums)} log-likelihoods and {len(lengths)} lengths"
        )
    scores = [lp / max(float(n), 1.0) for lp, n in zip(logprob_sums, lengths)]
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def normalized_choice_accuracy(
    logprob_sums: Sequence[Sequence[float]],
    lengths: Sequence[Sequence[float]],
    labels: Sequence[int],
) -> float:
    """Fraction of items whose length-normalised best choice is the gold label."""
    if not labels:
        raise ValueError("normalized_choice_accuracy needs at least one item")
    hits = [normalized_choice(lp, n) == y for lp, n, y in zip(logprob_sums, lengths, labels, strict=True)]
    return sum(hits) / len(hits)


def continual_learning_metrics(after_task: Sequence[Sequence[float]]) -> dict[str, float]:
    """ACC, BWT and forgetting from an accuracy matrix (docs/design.md §7).

    `after_task[i][j]` is the recall on task j measured after training on task i
    (0-based, square T x T). Only the lower triangle (j <= i) is used; entries above
    the diagonal may be anything (e.g. NaN). Do not pass the pre-training row.

    - ACC = mean_j R[T-1][j]                                   (Lopez-Paz & Ranzato 2017)
    - BWT = mean_{j<T-1} (R[T-1][j] - R[j][j])                 (Lopez-Paz & Ranzato 2017)
    - forgetting = mean_{j<T-1} (max_{j<=l<T-1} R[l][j] - R[T-1][j])   (Chaudhry et al. 2018)

    With a single task BWT and forgetting are undefined and returned as NaN.
    """
    n_tasks = len(after_task)
    if n_tasks == 0 or any(len(row) != n_tasks for row in after_task):
        raise ValueError(
            "continual_learning_metrics needs a square T x T matrix (row i = after training task i); "
            f"got {n_tasks} rows of lengths {[len(r) for r in after_task]}"
        )
    final = after_task[-1]
    acc = sum(final) / n_tasks
    if n_tasks == 1:
        return {"acc": acc, "bwt": math.nan, "forgetting": math.nan}
    earlier = range(n_tasks - 1)
    bwt = sum(final[j] - after_task[j][j] for j in earlier) / (n_tasks - 1)
    forgetting = sum(
        max(after_task[l][j] for l in range(j, n_tasks - 1)) - final[j] for j in earlier
    ) / (n_tasks - 1)
    return {"acc": acc, "bwt": bwt, "forgetting": forgetting}


def degradation_pct(changes: Sequence[tuple[float | None, bool]]) -> float | None:
    """Mean over suites of how much worse the primary metric got, in % (positive = worse), from
    (relative change, higher_is_better) pairs; undefined changes (None/NaN) are left out."""
    vals = [-100.0 * rc if higher else 100.0 * rc for rc, higher in changes if rc is not None and not math.isnan(rc)]
    return sum(vals) / len(vals) if vals else None


def relative_change(before: float, after: float) -> float:
    """(after - before) / |before|; NaN when before is 0 (the change has no scale)."""
    if before == 0:
        return math.nan
    return (after - before) / abs(before)


# ----------------------------------------------------------------------------- aggregation


@dataclass(frozen=True)
class Aggregate:
    """How a suite's metric is computed from its per-item columns (items/<point>/<suite>.csv),
    so that the file recomputes the summary's number exactly and the bootstrap
    (eval/intervals.py) resamples items and recomputes it the same way.

    kind       value
    mean       mean(num)                          accuracies, EM, F1 (one score per item)
    ppl_mean   exp(-mean(num))                    LAMBADA last-word perplexity (num: item log-prob)
    nll_ratio  -sum(num) / sum(den)               token-weighted NLL (num: log-prob sum, den: tokens)
    bits_ratio -sum(num) / ln 2 / sum(den)        bits per byte (den: bytes)
    ppl_ratio  exp(-sum(num) / sum(den))          token perplexity of whole passages
    """

    kind: str
    num: str
    den: str | None = None

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.num,) if self.den is None else (self.num, self.den)


def aggregate(agg: Aggregate, columns: Mapping[str, Sequence[float]]) -> float:
    """The point estimate from per-item columns.

    Plain Python sums in item order, the arithmetic these metrics have always had (the numbers
    do not change; tests/test_intervals.py). torchmetrics' MeanMetric/SumMetric would hold
    float32 states by default and, even in float64, sum in tensor order (vectorised partial
    sums), which moves the last bits of F1 and NLL values away from the numbers recorded so
    far and from an exact recomputation out of the items file.
    """
    num = columns[agg.num]
    if not len(num):
        return math.nan
    if agg.kind == "mean":
        return sum(num) / len(num)
    if agg.kind == "ppl_mean":
        return math.exp(-(sum(num) / len(num)))
    den = columns[agg.den]
    if agg.kind == "nll_ratio":
        return -sum(num) / sum(den)
    if agg.kind == "bits_ratio":
        return -sum(num) / math.log(2) / sum(den)
    if agg.kind == "ppl_ratio":
        return math.exp(-sum(num) / sum(den))
    raise ValueError(f"unknown aggregate kind {agg.kind!r}; use mean, ppl_mean, nll_ratio, bits_ratio or ppl_ratio")


# ---------------------------------------------------------------- per-item files of a run
def items_folder(run_dir: Path, label: str) -> Path:
    """``<run>/items/<point>/``: where the per-item scores of one evaluation point are written
    ("before", "after task 3" -> ``after_task_3``)."""
    return Path(run_dir) / "items" / label.replace(" ", "_")


def item_points(run_dir: Path) -> list[str]:
    """The evaluation points with per-item files under ``<run>/items/``, in order: "before" (if
    written), then ``after_task_<k>`` by k (numerically: after_task_10 after after_task_9)."""
    items = Path(run_dir) / "items"
    after = sorted((p.name for p in items.glob("after_task_*") if p.name[len("after_task_"):].isdigit()),
                   key=lambda n: int(n[len("after_task_"):]))
    return [p for p in ("before", *after) if (items / p).is_dir()]


def last_task_point(run_dir: Path) -> str | None:
    """The last ``after_task_<k>`` folder under ``<run>/items/`` (None: no task finished its evaluation)."""
    points = [p for p in item_points(run_dir) if p != "before"]
    return points[-1] if points else None
