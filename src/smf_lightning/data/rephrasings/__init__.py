"""Evaluation-only rephrasings: a fact's question asked in other words.

A rephrasing measures whether a taught fact is recalled when the question is worded
differently from every question it was trained on (docs/design.md, "Rephrased questions").
It is held out by construction: it never enters a training sequence, the probe, slot
selection, whitening, background statistics or the read gate (FactStreamDataModule._encode
refuses it), and it must differ, after normalisation, from the fact's question and its
training paraphrases (rephrasing_problem).

Facts from a file carry theirs in a ``rephrased`` field (data/fact_file.py). The built-in
TriviaQA streams take theirs from ``triviaqa.jsonl`` beside this module (how they were
written: README.md here), one record per TriviaQA question id::

    {"id": "jp_981", "streams": ["quick", "dev"], "rephrased": ["...", "..."]}

``streams`` names the built-in streams the fact belongs to, so a stream can be kept apart
from another (``data.exclude_streams=[dev]``: the test stream never shares a fact with dev).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

from smf_lightning.errors import ConfigError
from smf_lightning.text import normalize_answer

BUILTIN = "builtin"
BUILTIN_FILE = Path(__file__).with_name("triviaqa.jsonl")


class RephrasingError(ConfigError):
    """A rephrasings file or record that cannot be used (exit code 2, one line)."""


def rephrasing_problem(rephrased: Sequence[str], trained: Sequence[str]) -> tuple[str, str] | None:
    """(reason, message) for the first unusable rephrasing, None if all are usable: an empty
    one, or one equal (after SQuAD normalisation) to a question the fact is trained on, which
    would not be held out."""
    trained_norm = {normalize_answer(q): q for q in trained}
    for i, text in enumerate(rephrased):
        if not isinstance(text, str):
            return "bad_type", f"rephrasing {i} must be text, got {type(text).__name__}."
        if not text.strip():
            return "empty_rephrased", f"rephrasing {i} is empty."
        same = trained_norm.get(normalize_answer(text))
        if same is not None:
            return ("rephrased_is_trained", f"rephrasing {i} {text!r} is the trained question {same!r} after "
                                            "normalisation; a rephrasing must change the wording, or it measures "
                                            "nothing held out.")
    return None


def check_rephrasings(rephrased: Sequence[str], trained: Sequence[str], where: str) -> tuple[str, ...]:
    """The usable rephrasings, stripped and deduplicated; RephrasingError naming `where` otherwise."""
    problem = rephrasing_problem(rephrased, trained)
    if problem is not None:
        raise RephrasingError(f"{where}: {problem[1]}")
    return tuple(dict.fromkeys(r.strip() for r in rephrased))


def read_rephrasings(spec: str) -> dict[str, tuple[str, ...]]:
    """id -> rephrasings from `spec`: ``builtin`` (the package's file) or a JSONL path of
    {"id": ..., "rephrased": [...]} records."""
    return {rid: texts for rid, (texts, _) in _records(_resolve(spec)).items()}


def builtin_stream_ids(streams: Iterable[str]) -> frozenset[str]:
    """The TriviaQA ids the package's file lists for any of `streams`."""
    records = _records(BUILTIN_FILE)
    known = sorted({s for _, tags in records.values() for s in tags})
    unknown = [s for s in streams if s not in known]
    if unknown:
        raise RephrasingError(f"bad config: data.exclude_streams names {unknown}; the built-in streams are "
                              f"{', '.join(known)}.")
    wanted = set(streams)
    return frozenset(rid for rid, (_, tags) in records.items() if wanted & set(tags))


def _resolve(spec: str) -> Path:
    if spec == BUILTIN:
        return BUILTIN_FILE
    path = Path(spec).expanduser()
    if not path.is_file():
        raise RephrasingError(f"rephrasings file {spec} does not exist (data.rephrasings); give a JSONL file of "
                              f'{{"id": ..., "rephrased": [...]}} records, {BUILTIN!r}, or null for none.')
    return path


@lru_cache(maxsize=8)
def _records(path: Path) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    out: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        at = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise RephrasingError(f"{at}: not valid JSON ({e.msg}).") from None
        rid, texts = record.get("id") if isinstance(record, dict) else None, record.get("rephrased") if isinstance(record, dict) else None
        if not isinstance(rid, str) or not isinstance(texts, list) or not texts:
            raise RephrasingError(f"{at}: a record needs an \"id\" (text) and \"rephrased\" (a non-empty list of texts).")
        if rid in out:
            raise RephrasingError(f"{at}: duplicate id {rid!r}.")
        problem = rephrasing_problem(texts, ())
        if problem is not None:
            raise RephrasingError(f"{at}: {problem[1]}")
        out[rid] = (tuple(t.strip() for t in texts), tuple(record.get("streams") or ()))
    return out
