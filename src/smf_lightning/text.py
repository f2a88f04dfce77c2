"""SQuAD answer matching on plain strings (a leaf module: the data layer compares and filters
questions with it, evaluation scores answers with it; eval/metrics.py re-exports it).

Normalisation follows the SQuAD v1.1 evaluation script (Rajpurkar et al. 2016), which TriviaQA
and NaturalQuestions-open evaluation reuse: lower-case, drop punctuation, drop the articles
a/an/the, collapse whitespace; exact match takes the best score over the gold aliases.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0.

    Strict on purpose: a degenerate repeat such as "Niger Niger Niger" does not match
    "Niger" (docs/design.md §9: substring matching counted such repeats as correct).
    """
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def contains_answer(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if any normalised gold answer occurs as a whole-word span inside the normalised
    prediction. Lenient (counts "Niger Niger Niger" for "Niger"): report it next to
    exact_match, never instead of it. An empty gold never matches."""
    pred = f" {normalize_answer(prediction)} "
    for gold in golds:
        norm = normalize_answer(gold)
        if norm and f" {norm} " in pred:
            return 1.0
    return 0.0
