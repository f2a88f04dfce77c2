"""Study material generated from a passage: self-posed questions, restatements, cloze items.

Training on a passage's tokens teaches a model to continue the passage, not to answer a
question about it (data=documents on the offline model: passages memorised, none of their
questions answered closed-book). Lin et al. (2025) and Active Reading (Lin et al., arXiv
2508.09494) train instead on material a model writes per passage: question/answer pairs the
passage answers, and the passage's content restated in other words. This module holds the
prompts, parses and filters what a generator wrote, and caches the generations;
streams/augmentation.py runs the generator and turns the kept items into training sequences.

Kinds (``data.augment.kinds``):

- ``qa``: the generator poses questions the passage answers, each with a short answer copied
  from it (few-shot, one greedy continuation per passage, parsed into pairs); trained as QA
  sequences under the stream's training templates, as facts are, so the answer position learns;
- ``paraphrase``: the generator restates each sentence of the passage, one per line; the kept
  restatements, joined, are trained as text, as the passage is;
- ``cloze``: no generator: a sentence of the passage with one name or number blanked out
  (``____``), answered by that span; trained as QA sequences.

Filters (every drop counted by reason, in the run's ``augmented/task_<k>.jsonl`` and
summary.json): a question must have >= 3 words, an answer that occurs in the passage
(normalised, text.contains_answer) and does not occur in the question, and fit the run
(answer words, sequence length); a restatement must have >= 4 words and differ from every
sentence of the passage (a copy restates nothing); empty items and repeats are dropped, and
at most ``per_passage`` items of a kind are kept.

Never the evaluation questions: the generator's prompt is built from the passage text alone
(:func:`build_prompt` takes nothing else), and an item that states one of the questions
attached to the passages (or their rephrasings) is dropped (``is_evaluation_question``).
Generations are cached per (generator fingerprint, kind, prompt, max_new_tokens) under
``$SMF_CACHE/augment``, keyed inside by passage content, and saved chunk by chunk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from smf_lightning.data.generation import generate_in_chunks, write_json_atomic
from smf_lightning.errors import ConfigError, need
from smf_lightning.text import contains_answer, normalize_answer

log = logging.getLogger(__name__)

KINDS = ("qa", "paraphrase", "cloze")  # data.augment.kinds
GENERATED_KINDS = ("qa", "paraphrase")  # written by the generator model (cloze is cut from the passage)
QA_KINDS = ("qa", "cloze")  # trained as question/answer sequences (paraphrase: as text)
DTYPES = ("float32", "bfloat16", "float16")
BLANK = "____"
MIN_QUESTION_WORDS = 3
MIN_RESTATEMENT_WORDS = 4

# Few-shot prompts, one continuation per passage; the example passage is invented for this
# purpose (no stream or evaluation passage). `{passage}` is the only field.
_EXAMPLE = ("The Harlow Bridge crosses the river Tamsin at Eastwick. It was designed by the engineer Mary Colton "
            "and opened in 1887. With a main span of 210 metres, it was the longest iron bridge in the region "
            "until 1931.")
PROMPTS: dict[str, str] = {
    "qa": (
        "Read the passage, then write questions that the passage answers, each followed by a short answer "
        "copied from the passage.\n\n"
        f"Passage: {_EXAMPLE}\n"
        "Question: Which river does the Harlow Bridge cross?\nAnswer: the river Tamsin\n"
        "Question: Who designed the Harlow Bridge?\nAnswer: Mary Colton\n"
        "Question: In what year did the Harlow Bridge open?\nAnswer: 1887\n"
        "Question: How long is the main span of the Harlow Bridge?\nAnswer: 210 metres\n"
        "Question: Until what year was the Harlow Bridge the longest iron bridge in its region?\nAnswer: 1931\n\n"
        "Passage: {passage}\nQuestion:"),
    "paraphrase": (
        "Read the passage, then restate each of its sentences in other words, one per line, keeping every "
        "name, number and date.\n\n"
        f"Passage: {_EXAMPLE}\n"
        "Restated:\n"
        "At Eastwick, the Harlow Bridge carries traffic over the river Tamsin.\n"
        "The engineer Mary Colton designed the bridge, which opened in 1887.\n"
        "Its main span measures 210 metres, and no iron bridge in the region was longer until 1931.\n\n"
        "Passage: {passage}\nRestated:\n"),
}


@dataclass(frozen=True)
class AugmentSpec:
    """The ``data.augment`` keys (conf/data/documents.yaml documents each), checked."""

    kinds: tuple[str, ...]
    include_passage: bool
    generator: str | None
    generator_dtype: str
    per_passage: Mapping[str, int]
    max_new_tokens: int
    prompts: Mapping[str, str | None]
    qa_loss_on: str

    KEYS = ("kinds", "include_passage", "generator", "generator_dtype", "per_passage", "max_new_tokens", "prompts",
            "qa_loss_on")

    @property
    def enabled(self) -> bool:
        return bool(self.kinds)

    def prompt(self, kind: str) -> str:
        """The kind's prompt: the override in data.augment.prompts, else the built-in one (PROMPTS)."""
        return self.prompts.get(kind) or PROMPTS[kind]

    def generated_kinds(self) -> list[str]:
        """The kinds the generator writes (and that keep at least one item)."""
        return [k for k in self.kinds if k in GENERATED_KINDS and self.per_passage[k] > 0]

    @classmethod
    def off(cls) -> AugmentSpec:
        return cls((), True, None, "float32", {k: 0 for k in KINDS}, 1, {}, "answer_and_suffix")

    @classmethod
    def from_mapping(cls, m: Mapping | None) -> AugmentSpec:
        """The spec of a ``data.augment`` mapping (None: off); ConfigError naming the key on a bad value."""
        from smf_lightning.data.facts import LOSS_ON

        if m is None:
            return cls.off()
        unknown = sorted(set(m) - set(cls.KEYS))
        missing = [k for k in cls.KEYS if k not in m]
        if unknown or missing:
            what = f"has no key {unknown[0]}" if unknown else f"lacks {missing[0]}"
            raise ConfigError(f"bad config: data.augment {what}; "
                              f"its keys are {', '.join(cls.KEYS)} (each commented in conf/data/documents.yaml).")
        kinds = m["kinds"]
        need(isinstance(kinds, list | tuple) and all(k in KINDS for k in kinds) and len(set(kinds)) == len(kinds),
             "data.augment.kinds", list(kinds) if isinstance(kinds, list | tuple) else kinds,
             f"a list of distinct kinds among {' | '.join(KINDS)} ([] = off)")
        need(isinstance(m["include_passage"], bool), "data.augment.include_passage", m["include_passage"], "true | false")
        need(m["include_passage"] or kinds, "data.augment.include_passage", m["include_passage"],
             "true when data.augment.kinds is empty (something must be trained)")
        generator = m["generator"]
        need(generator is None or (isinstance(generator, str) and generator.strip()), "data.augment.generator",
             generator, "null (the model being trained) | a local model directory | a hub id | an offline model name")
        need(m["generator_dtype"] in DTYPES, "data.augment.generator_dtype", m["generator_dtype"], " | ".join(DTYPES))
        per_passage = dict(m["per_passage"] or {})
        need(set(per_passage) <= set(KINDS), "data.augment.per_passage", sorted(per_passage),
             f"keys among {', '.join(KINDS)}")
        for kind in kinds:
            n = per_passage.get(kind)
            need(isinstance(n, int) and not isinstance(n, bool) and n >= 0, f"data.augment.per_passage.{kind}", n,
                 "an integer >= 0 (items of this kind kept per passage)")
        n_tokens = m["max_new_tokens"]
        need(isinstance(n_tokens, int) and not isinstance(n_tokens, bool) and n_tokens >= 1,
             "data.augment.max_new_tokens", n_tokens, "an integer >= 1")
        prompts = dict(m["prompts"] or {})
        need(set(prompts) <= set(GENERATED_KINDS), "data.augment.prompts", sorted(prompts),
             f"keys among {', '.join(GENERATED_KINDS)} (cloze needs no prompt)")
        for kind, text in prompts.items():
            need(text is None or (isinstance(text, str) and text.count("{passage}") == 1),
                 f"data.augment.prompts.{kind}", text, "null (the built-in prompt) or a prompt with exactly one {passage}")
        need(m["qa_loss_on"] in LOSS_ON, "data.augment.qa_loss_on", m["qa_loss_on"], " | ".join(LOSS_ON))
        return cls(tuple(kinds), m["include_passage"], generator, m["generator_dtype"],
                   {k: int(per_passage.get(k, 0)) for k in KINDS}, int(n_tokens), prompts, m["qa_loss_on"])


@dataclass(frozen=True)
class StudyItem:
    """One generated item of a passage: a question and answer (qa, cloze) or a text (paraphrase),
    kept (``reason`` None) or dropped, and why."""

    passage_id: str
    kind: str
    question: str = ""
    answer: str = ""
    text: str = ""
    reason: str | None = None

    @property
    def kept(self) -> bool:
        return self.reason is None

    def record(self) -> dict:
        """Its line in the run's augmented/task_<k>.jsonl."""
        what = {"question": self.question, "answer": self.answer} if self.kind in QA_KINDS else {"text": self.text}
        return {"passage_id": self.passage_id, "kind": self.kind, **what, "kept": self.kept, "reason": self.reason}


# -----------------------------------------------------------------------------
# Prompts and generation


def build_prompt(template: str, passage_text: str) -> str:
    """The generator's prompt for one passage: the passage text is all it is given."""
    return template.replace("{passage}", passage_text)


def passage_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def augment_cache_file(cache_dir: str | Path, fingerprint: str, kind: str, prompt: str, max_new_tokens: int) -> Path:
    """One file per (generator, kind, prompt, decoding length); inside, one entry per passage text."""
    key = hashlib.sha256(json.dumps([kind, prompt, max_new_tokens]).encode()).hexdigest()[:12]
    return Path(cache_dir).expanduser() / f"augment-{kind}-{fingerprint[:16]}-{key}.json"


def generate_material(model, tokenizer, texts: Sequence[str], prompt: str, max_new_tokens: int, batch_size: int,
                      cache_file: Path | None, *, generate: Callable, label: str = "") -> dict[str, str]:
    """passage text -> the generator's raw continuation of ``prompt`` for it (cached).
    ``generate(model, tokenizer, prompts, max_new_tokens, batch_size)`` decodes greedily, one
    string each (the caller passes eval/scoring.generate_greedy: the data layer runs no model)."""
    stored: dict[str, str] = {}
    if cache_file is not None and cache_file.is_file():
        stored = json.loads(cache_file.read_text())["outputs"]
    todo = [t for t in dict.fromkeys(texts) if passage_key(t) not in stored]
    if todo:
        if model is None:
            raise ValueError(f"{len(todo)} passages have no cached {label} material ({cache_file}); the generator "
                             "model is needed.")
        log.info("Augmenting %d passages (%s) with the generator model: %d to generate, %d cached", len(set(texts)),
                 label, len(todo), len(set(texts)) - len(todo))
        prompts = [build_prompt(prompt, t) for t in todo]
        for part, outputs in generate_in_chunks(model, tokenizer, prompts, max_new_tokens, batch_size, generate=generate):
            stored.update({passage_key(t): out for t, out in zip(todo[part], outputs)})
            if cache_file is not None:
                header = {"kind": label, "prompt": prompt, "max_new_tokens": max_new_tokens}
                write_json_atomic(cache_file, {"header": header, "outputs": stored})
            log.info("Augmenting (%s): %d of %d passages generated", label, part.stop, len(todo))
    return {t: stored[passage_key(t)] for t in texts}


# -----------------------------------------------------------------------------
# Parsing


def parse_qa(continuation: str, prompt: str = PROMPTS["qa"]) -> list[tuple[str, str]]:
    """(question, answer) pairs of a qa continuation: "Question: ..." / "Answer: ..." lines up to
    the first blank line or next "Passage:"; a question without an answer line keeps answer ""
    (an empty continuation has no pair)."""
    text = ("Question:" if prompt.rstrip().endswith("Question:") else "") + continuation.lstrip(" ")
    pairs, question = [], None
    for line in text.split("\n\n", 1)[0].splitlines():
        line = line.strip()
        if line.startswith("Passage:"):
            break
        if line.startswith("Question:"):
            if question is not None:
                pairs.append((question, ""))
            question = line.removeprefix("Question:").strip()
        elif line.startswith("Answer:") and question is not None:
            pairs.append((question, line.removeprefix("Answer:").strip()))
            question = None
    if question:  # cut off before its answer (an empty one is only the marker the prompt ended with)
        pairs.append((question, ""))
    return pairs


def parse_lines(continuation: str) -> list[str]:
    """The restatements of a paraphrase continuation: one per line, up to the first blank line or
    "Passage:"; list markers ("- ", "1. ") dropped."""
    lines = []
    for line in continuation.lstrip("\n").split("\n\n", 1)[0].splitlines():
        line = line.strip()
        if line.startswith("Passage:"):
            break
        lines.append(re.sub(r"^(?:[-*•]|\d+[.)])\s+", "", line))
    return lines


def sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])", text) if s.strip()]


# Capitalised words that name nothing by themselves (sentence openers, question words, articles):
# every other capitalised word and every number is a span a cloze item may blank out.
_NOT_NAMES = frozenset("a an the in on at of for by to from with this that these those it its he she they his her their "
                       "there when while after before during however although since many some most".split())
_WORD = re.compile(r"[A-Za-z0-9][\w'’\-]*(?:[.,]\d+)*")


def cloze_items(passage_text: str, max_answer_words: int = 5) -> list[tuple[str, str]]:
    """(question, answer) per sentence of the passage: the sentence's last name or number (a run of
    capitalised words or a number, not its first word) blanked out, answered by that span."""
    items = []
    for sentence in sentences(passage_text):
        words = list(_WORD.finditer(sentence))
        if len(words) < 6:
            continue
        spans, run = [], []
        for k, w in enumerate(words):
            token = w.group()
            name = k > 0 and token[0].isupper() and token.lower() not in _NOT_NAMES
            if any(c.isdigit() for c in token) or name:
                if run and sentence[run[-1].end():w.start()].strip():  # not adjacent: a new span
                    spans.append(run)
                    run = []
                run.append(w)
            elif run:
                spans.append(run)
                run = []
        spans += [run] if run else []
        spans = [s for s in spans if len(s) <= max_answer_words]
        if spans:
            start, end = spans[-1][0].start(), spans[-1][-1].end()
            items.append((f"Fill in the blank: {sentence[:start]}{BLANK}{sentence[end:]}", sentence[start:end]))
    return items


# -----------------------------------------------------------------------------
# Filters


def evaluation_questions(questions: Iterable[str]) -> frozenset[str]:
    """The normalised questions that measure the stream (and their rephrasings): never study material."""
    return frozenset(q for q in map(normalize_answer, questions) if q)


def _states_evaluation_question(text: str, evaluation: frozenset[str]) -> bool:
    norm = f" {normalize_answer(text)} "
    return any(f" {q} " in norm for q in evaluation)


def keep_qa(passage_id: str, passage_text: str, kind: str, pairs: Sequence[tuple[str, str]], *, per_passage: int,
            evaluation: frozenset[str], unfit: Callable[[str, str], str | None]) -> list[StudyItem]:
    """Every pair as a StudyItem, kept or dropped with its reason (the module docstring's filters, in
    this order); ``unfit(question, answer)`` says why a pair does not fit the run, or None."""
    items, seen, kept = [], set(), 0
    for question, answer in pairs:
        question, answer = question.strip(), answer.strip()
        norm = normalize_answer(question)
        reason = ("empty_question" if not norm else
                  "is_evaluation_question" if _states_evaluation_question(question, evaluation) else
                  "no_answer" if not normalize_answer(answer) else
                  "question_too_short" if len(norm.split()) < MIN_QUESTION_WORDS else
                  "answer_not_in_passage" if not contains_answer(passage_text, [answer]) else
                  "question_contains_answer" if contains_answer(question, [answer]) else
                  unfit(question, answer) or
                  ("duplicate" if norm in seen else "beyond_per_passage" if kept >= per_passage else None))
        if reason is None:
            seen.add(norm)
            kept += 1
        items.append(StudyItem(passage_id, kind, question=question, answer=answer, reason=reason))
    return items


def keep_restatements(passage_id: str, passage_text: str, lines: Sequence[str], *, per_passage: int,
                      evaluation: frozenset[str]) -> list[StudyItem]:
    """Every restatement as a StudyItem, kept or dropped with its reason."""
    own = {normalize_answer(s) for s in sentences(passage_text)}
    whole = f" {normalize_answer(passage_text)} "
    items, seen, kept = [], set(), 0
    for line in lines:
        line = line.strip()
        norm = normalize_answer(line)
        reason = ("empty" if not norm else
                  "is_evaluation_question" if _states_evaluation_question(line, evaluation) else
                  "too_short" if len(norm.split()) < MIN_RESTATEMENT_WORDS else
                  "same_as_passage" if norm in own or f" {norm} " in whole else
                  "duplicate" if norm in seen else
                  "beyond_per_passage" if kept >= per_passage else None)
        if reason is None:
            seen.add(norm)
            kept += 1
        items.append(StudyItem(passage_id, "paraphrase", text=line, reason=reason))
    return items


def study_items(passage_id: str, passage_text: str, spec: AugmentSpec, raw: Mapping[str, str], *,
                evaluation: frozenset[str], unfit: Callable[[str, str], str | None],
                max_answer_words: int) -> list[StudyItem]:
    """The passage's items of every kind of ``spec`` (``raw``: kind -> the generator's continuation)."""
    items = []
    for kind in spec.kinds:
        n = spec.per_passage[kind]
        if n == 0:
            continue
        if kind == "qa":
            items += keep_qa(passage_id, passage_text, kind, parse_qa(raw[kind], spec.prompt(kind)), per_passage=n,
                             evaluation=evaluation, unfit=unfit)
        elif kind == "cloze":
            items += keep_qa(passage_id, passage_text, kind, cloze_items(passage_text, max_answer_words),
                             per_passage=n, evaluation=evaluation, unfit=unfit)
        else:
            items += keep_restatements(passage_id, passage_text, parse_lines(raw[kind]), per_passage=n,
                                       evaluation=evaluation)
    return items
