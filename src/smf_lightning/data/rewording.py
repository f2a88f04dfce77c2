"""Training-time rewordings of a fact's question, written by a language model.

A memory that is written only under the trained question string is read again only by
queries close to it: asked in other words, the answer position reads other rows and the
fact is not recalled (docs/design.md, "Rephrased questions"). Training each fact also under
a few rewordings spreads its writes over the queries that different wordings produce, as
paraphrase augmentation does for knowledge editors (e.g. WISE's random-prefix and
paraphrase training). The rewordings are generated automatically from the question alone,
so a user's file that brings only a question and an answer gets them too.

Each rewording comes from one few-shot prompt style (STYLES), decoded greedily by the
generator model (by default the base model being trained), then filtered: it must be a
different question (not the question or a paraphrase after normalisation, not a duplicate),
must not contain the answer (it would teach the answer as part of the question), must keep
every detail of the question (each number and capitalised name: a rewording that drops "in
1992" asks another question, and training the answer on it teaches something false), must have
at least three words, and must not coincide with one of the fact's evaluation-only
rephrasings (those never feed training; such a rewording is dropped and counted). The
generator never sees the rephrasings. Results are cached per (generator fingerprint,
prompts, decoding length) under ``$SMF_CACHE/rewordings``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from smf_lightning.data.facts import Fact
from smf_lightning.data.generation import generate_in_chunks, write_json_atomic
from smf_lightning.text import contains_answer, normalize_answer

log = logging.getLogger(__name__)

# Few-shot prompts, one rewording each; the examples are general knowledge the model knows,
# written for this purpose (no stream or evaluation question among them).
_HEADER = "Rewrite each question in other words. Keep every detail; do not answer it.\n\n"
STYLES: dict[str, str] = {
    "synonyms": _HEADER + (
        "Question: Who painted the ceiling of the Sistine Chapel?\n"
        "Rewritten: Which artist was responsible for painting the Sistine Chapel's ceiling?\n\n"
        "Question: In which year did the Berlin Wall fall?\n"
        "Rewritten: The Berlin Wall came down in what year?\n\n"
        "Question: {question}\nRewritten:"),
    "subject_first": _HEADER + (
        "Question: What is the capital city of Australia?\n"
        "Rewritten: Australia has which city as its capital?\n\n"
        "Question: Which planet is known as the Red Planet?\n"
        "Rewritten: The Red Planet is a nickname for which planet?\n\n"
        "Question: {question}\nRewritten:"),
    "name_the": _HEADER + (
        "Question: Who wrote the novel Pride and Prejudice?\n"
        "Rewritten: Name the author of the novel Pride and Prejudice.\n\n"
        "Question: What is the largest ocean on Earth?\n"
        "Rewritten: Name the ocean that is the largest on Earth.\n\n"
        "Question: {question}\nRewritten:"),
    "detail_first": _HEADER + (
        "Question: Who became President of the United States in 1961?\n"
        "Rewritten: In 1961, who became the President of the United States?\n\n"
        "Question: Which composer wrote the violin concertos called The Four Seasons?\n"
        "Rewritten: The Four Seasons, a set of violin concertos, was written by which composer?\n\n"
        "Question: {question}\nRewritten:"),
    "can_you_tell": _HEADER + (
        "Question: What is the tallest mountain in Africa?\n"
        "Rewritten: Can you tell me which mountain is the highest in Africa?\n\n"
        "Question: Who discovered penicillin?\n"
        "Rewritten: Do you know who made the discovery of penicillin?\n\n"
        "Question: {question}\nRewritten:"),
    "passive": _HEADER + (
        "Question: Which country hosted the 2016 Summer Olympics?\n"
        "Rewritten: By which country were the 2016 Summer Olympics hosted?\n\n"
        "Question: Who directed the film Jaws?\n"
        "Rewritten: The film Jaws was directed by whom?\n\n"
        "Question: {question}\nRewritten:"),
}


def reword_cache_file(cache_dir: str | Path, fingerprint: str, max_new_tokens: int) -> Path:
    """One file per generator and decoding length; inside, each rewording is stored under its
    style's key (style_key), so adding a style or editing one prompt keeps the others' entries."""
    return Path(cache_dir).expanduser() / f"rewordings-{fingerprint[:16]}-{max_new_tokens}.json"


def style_key(name: str) -> str:
    """A style's name and a hash of its prompt: an edited prompt is a new style."""
    return f"{name}-{hashlib.sha256(STYLES[name].encode()).hexdigest()[:8]}"


def generate_rewordings(model, tokenizer, questions: Sequence[str], n_styles: int, max_new_tokens: int,
                        batch_size: int, cache_file: Path | None, *, generate: Callable) -> dict[str, list[str]]:
    """question -> its raw rewordings, one per style of the first `n_styles` (cached).
    ``generate(model, tokenizer, prompts, max_new_tokens, batch_size)`` decodes the prompts greedily,
    one string each (eval/scoring.generate_greedy, which the datamodule passes: the data layer runs
    no model itself)."""
    styles = [style_key(name) for name in list(STYLES)[:n_styles]]
    prompts = {style_key(name): text for name, text in STYLES.items()}
    stored: dict[str, dict[str, str]] = {}
    if cache_file is not None and cache_file.is_file():
        stored = json.loads(cache_file.read_text())
    todo = [(q, s) for q in dict.fromkeys(questions) for s in styles if s not in stored.get(q, {})]
    if todo:
        if model is None:
            raise ValueError(f"{len(todo)} rewordings are not cached ({cache_file}); the generator model is needed.")
        log.info("Rewording %d questions x %d styles with the generator model (%d to generate)",
                 len(set(questions)), len(styles), len(todo))
        texts = [prompts[s].replace("{question}", q) for q, s in todo]
        for part, outputs in generate_in_chunks(model, tokenizer, texts, max_new_tokens, batch_size, generate=generate):
            for (q, s), text in zip(todo[part], outputs):
                stored.setdefault(q, {})[s] = text.strip()
            if cache_file is not None:
                write_json_atomic(cache_file, stored)
            if part.stop < len(todo) or part.start > 0:
                log.info("Rewordings: %d of %d generated", part.stop, len(todo))
    return {q: [stored[q][s] for s in styles] for q in dict.fromkeys(questions)}


# Capitalised words that are not details of the question (question words, articles, prepositions
# that start a sentence): every other capitalised word, and every token with a digit, is a detail
# that a rewording must keep ("In 1992", "Shoreham, New York").
_NOT_DETAILS = frozenset(
    "what which who whom whose where when why how name in on at of for by to from with the a an "
    "is was are were did does do this that these those known also according".split())


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.replace("’", "'"))


def question_details(question: str) -> set[str]:
    """The words that pin the answer down: tokens with a digit and capitalised words (lower-cased)."""
    return {t.lower() for t in _words(question)
            if any(c.isdigit() for c in t) or (t[0].isupper() and t.lower() not in _NOT_DETAILS)}


def keep_rewordings(fact: Fact, raw: Sequence[str], fits, counts: Counter) -> tuple[str, ...]:
    """The usable rewordings of `fact` from `raw` (see the module docstring), counting each
    drop by reason in `counts`; `fits(question)` says whether its training sequences fit."""
    seen = {normalize_answer(q) for q in fact.training_questions()}
    held_out = {normalize_answer(r) for r in fact.rephrased}
    details = question_details(fact.question)
    kept = []
    for text in raw:
        counts["generated"] += 1
        norm = normalize_answer(text)
        reason = ("empty" if not norm else
                  "too_short" if len(norm.split()) < 3 else
                  "same_as_trained" if norm in seen else
                  "is_evaluation_rephrasing" if norm in held_out else
                  "contains_answer" if contains_answer(text, fact.aliases) else
                  "lost_detail" if not details <= {t.lower() for t in _words(text)} else
                  "too_long" if not fits(text) else None)
        if reason:
            counts[f"dropped_{reason}"] += 1
            continue
        seen.add(norm)
        kept.append(text)
        counts["kept"] += 1
    return tuple(kept)
