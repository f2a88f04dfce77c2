"""Fact-injection stream: facts the base model does not know, split into tasks.

docs/design.md §6: a continual-learning stream is a sequence of tasks, each a few facts the
base model gets wrong (probe it first, keep only misses). Every fact becomes several
training sequences from paraphrase templates; at least one template is held out of
training and only used to measure whether the learned fact generalises beyond the
surface forms it was trained on.

Facts come from TriviaQA (real questions, probed on the actual model), from a seeded
generator of fictional facts (invented entities: unknown to any model by construction), or
from a user's file or dataset (data/fact_file.py; probed or not).

Nothing here runs or scores a model: probing the base model is eval/probe.py, scoring a
fact's recall eval/metrics.py (recall_scores) and eval/suites.py (FactRecallSuite); the
stream itself is assembled by streams/datamodule.py.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from smf_lightning.data.sources import QAItem

LOSS_ON = ("answer", "answer_and_suffix", "full")


@dataclass(frozen=True)
class Fact:
    """One question/answer fact; `answer` is what training teaches, `aliases` (which include
    `answer`) are what evaluation accepts. `paraphrases` are further questions with the same
    answer, trained like `question` but never evaluated: recall is measured once per fact, on
    `question` (facts from a file, data/fact_file.py). `rephrased` are the opposite: the same
    question in other words, used *only* for evaluation (recall on a wording never trained,
    docs/design.md "Rephrased questions"): never trained, probed, selected on or fitted to."""

    id: str
    question: str
    answer: str
    aliases: tuple[str, ...]
    paraphrases: tuple[str, ...] = ()
    rephrased: tuple[str, ...] = ()

    def training_questions(self) -> tuple[str, ...]:
        """The questions training sequences are made of: `question`, then each paraphrase."""
        return (self.question, *self.paraphrases)


# -----------------------------------------------------------------------------
# Templates


@dataclass(frozen=True)
class FactTemplate:
    """A paraphrase template with one `{question}` before one `{answer}`.

    Rendering splits it into the prompt (everything before the answer, trailing spaces
    moved into the answer so the answer tokens are the usual space-prefixed words), the
    answer text, and the suffix after the answer (e.g. "." in "... The answer is {answer}.").
    """

    name: str
    text: str

    def __post_init__(self):
        if self.text.count("{answer}") != 1 or self.text.count("{question}") != 1:
            raise ValueError(
                f"Template {self.name!r} must contain exactly one {{question}} and one {{answer}}; got {self.text!r}"
            )
        if self.text.index("{question}") > self.text.index("{answer}"):
            raise ValueError(f"Template {self.name!r}: {{question}} must come before {{answer}}; got {self.text!r}")
        stray = re.findall(r"\{(?!question\}|answer\})[^}]*\}", self.text)
        if stray:
            raise ValueError(f"Template {self.name!r} has unknown fields {stray}; only {{question}} and {{answer}} exist")

    def render(self, question: str, answer: str) -> tuple[str, str, str]:
        """(prompt, answer_text, suffix); prompt + answer_text + suffix is the full sequence."""
        head, suffix = self.text.split("{answer}")
        head = head.replace("{question}", question)
        prompt = head.rstrip(" ")
        return prompt, head[len(prompt):] + answer, suffix

    def prompt(self, question: str) -> str:
        return self.render(question, "")[0]


def make_templates(templates: Mapping[str, str]) -> dict[str, FactTemplate]:
    if not templates:
        raise ValueError("At least two fact templates are needed (one to train on, one held out); got none.")
    return {name: FactTemplate(name, text) for name, text in templates.items()}


def split_templates(templates: Mapping[str, FactTemplate], heldout: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(training template names, held-out template names), both non-empty and disjoint."""
    unknown = [h for h in heldout if h not in templates]
    if unknown:
        raise ValueError(f"Held-out template(s) {unknown} are not defined; defined templates: {', '.join(templates)}.")
    heldout_names = tuple(dict.fromkeys(heldout))
    train_names = tuple(n for n in templates if n not in heldout_names)
    if not heldout_names:
        raise ValueError("heldout_templates is empty: hold out at least one template to measure generalisation.")
    if not train_names:
        raise ValueError("Every template is held out; leave at least one template to train on.")
    return train_names, heldout_names


# -----------------------------------------------------------------------------
# Training sequences


@dataclass(frozen=True)
class TrainingExample:
    """One tokenised training sequence; `loss_mask[t]` says whether token t is a target. The first
    `prefix_len` tokens are a context prefix (data.prefixes): read through, never a target, and
    never a position that selects or keys the fact's slots (collate_examples: ``write_mask``)."""

    input_ids: tuple[int, ...]
    loss_mask: tuple[bool, ...]
    fact_id: str
    template: str
    prefix_len: int = 0


def encode_example(
    tokenizer, template: FactTemplate, question: str, answer: str, loss_on: str = "answer", fact_id: str = "",
    prefix: str = "",
) -> TrainingExample:
    """Tokenise prompt, answer and suffix separately (the same boundary evaluation scores)
    and mark the loss-carrying tokens: the answer (default), the answer and the template's
    suffix (teaches where the answer ends), or the whole sequence. A ``prefix`` (context text
    before the prompt, data.prefixes) is tokenised on its own, ahead of the prompt, and is never
    a target (not even with loss_on=full)."""
    if loss_on not in LOSS_ON:
        raise ValueError(f"Unknown loss_on {loss_on!r}; use one of: {', '.join(LOSS_ON)}.")
    prompt, answer_text, suffix = template.render(question, answer)
    prefix_ids = tokenizer(prefix, add_special_tokens=True)["input_ids"] if prefix else []
    prompt_ids = tokenizer(prompt, add_special_tokens=not prefix)["input_ids"]
    answer_ids = tokenizer(answer_text, add_special_tokens=False)["input_ids"]
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
    if loss_on == "full":
        mask = [False] + [True] * (len(prompt_ids) + len(answer_ids) + len(suffix_ids) - 1)
    else:
        mask = [False] * len(prompt_ids) + [True] * len(answer_ids) + [loss_on == "answer_and_suffix"] * len(suffix_ids)
    ids = prefix_ids + prompt_ids + answer_ids + suffix_ids
    return TrainingExample(tuple(ids), tuple([False] * len(prefix_ids) + mask), fact_id, template.name, len(prefix_ids))


def collate_examples(examples: Sequence[TrainingExample], pad_id: int) -> dict:
    """Right-padded batch for causal-LM training.

    input_ids, attention_mask [B, T]; labels [B, T] (= input_ids on loss tokens, -100 on
    the rest and on padding; HF shifts them internally); loss_mask [B, T] bool (= labels
    != -100: the target tokens); loss_input_mask [B, T] bool (positions whose output
    predicts a target, i.e. loss_mask shifted left by one — the tokens whose memory
    accesses "carry loss" for slot statistics); write_mask [B, T] bool, only when some example has a
    context prefix (the positions that may select and key a fact's slots: attention_mask less
    the prefixes);
    fact_ids, templates (lists of str).
    """
    width = max(len(e.input_ids) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    loss_mask = torch.zeros((n, width), dtype=torch.bool)
    for row, ex in enumerate(examples):
        length = len(ex.input_ids)
        input_ids[row, :length] = torch.as_tensor(ex.input_ids)
        attention_mask[row, :length] = 1
        loss_mask[row, :length] = torch.as_tensor(ex.loss_mask)
    labels = torch.where(loss_mask, input_ids, torch.full_like(input_ids, -100))
    loss_input_mask = torch.zeros_like(loss_mask)
    loss_input_mask[:, :-1] = loss_mask[:, 1:]
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "loss_mask": loss_mask,
        "loss_input_mask": loss_input_mask,
        "fact_ids": [e.fact_id for e in examples],
        "templates": [e.template for e in examples],
    }
    if any(e.prefix_len for e in examples):
        write_mask = attention_mask.bool()
        for row, ex in enumerate(examples):
            write_mask[row, :ex.prefix_len] = False
        out["write_mask"] = write_mask
    return out


# -----------------------------------------------------------------------------
# Streams


def seeded_order(n: int, seed: int, salt: str) -> list[int]:
    """A permutation of range(n) fixed by (seed, salt); string seeding of random.Random is
    stable across Python versions and platforms."""
    order = list(range(n))
    random.Random(f"{seed}/{salt}").shuffle(order)
    return order


def split_into_tasks(facts: Sequence[Fact], n_tasks: int, facts_per_task: int, seed: int, found_where: str = "") -> tuple[tuple[Fact, ...], ...]:
    """Seeded choice of n_tasks * facts_per_task facts, chunked into tasks in that order."""
    check_stream_size(n_tasks, facts_per_task)
    needed = n_tasks * facts_per_task
    if len(facts) < needed:
        raise ValueError(
            f"Only {len(facts)} usable facts{found_where}, but the stream needs n_tasks x facts_per_task = "
            f"{n_tasks} x {facts_per_task} = {needed}. Increase probe_pool_size (more questions probed), "
            "lower n_tasks or facts_per_task, or use facts=synthetic."
        )
    order = seeded_order(len(facts), seed, "stream")[:needed]
    chosen = [facts[i] for i in order]
    return tuple(tuple(chosen[t * facts_per_task:(t + 1) * facts_per_task]) for t in range(n_tasks))


def check_stream_size(n_tasks: int, facts_per_task: int) -> None:
    if n_tasks < 1 or facts_per_task < 1:
        raise ValueError(
            f"An empty stream: n_tasks={n_tasks}, facts_per_task={facts_per_task}; both must be >= 1."
        )


def qa_item_to_fact(item: QAItem) -> Fact:
    return Fact(item.id, item.question, item.answers[0], item.answers)


# -----------------------------------------------------------------------------
# Fictional facts


_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "k", "kl", "l", "m", "n", "p", "r", "s", "st", "t", "tr", "v", "z", "th", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ia", "ou"]
_CODAS = ["", "n", "r", "s", "l", "th", "k", "m", "x"]
_ANIMALS = ["otter", "heron", "lynx", "badger", "falcon", "ibex", "salamander", "tortoise", "jackal", "marten", "crane", "viper"]
_INSTRUMENTS = ["cello", "oboe", "harp", "bassoon", "viola", "trombone", "lute", "clarinet", "accordion", "sitar"]
_COLOURS = ["crimson", "teal", "amber", "violet", "olive", "indigo", "scarlet", "ochre", "silver", "turquoise"]

# (question pattern, answer kind); {x} is a freshly invented entity of the given kind.
_RELATIONS = [
    ("What is the capital of the country of {x}?", "country", "city"),
    ("Who wrote the novel {x}?", "title", "person"),
    ("In which year was the scientist {x} born?", "person", "year"),
    ("What is the national animal of {x}?", "country", "animal"),
    ("Which instrument does the musician {x} play?", "person", "instrument"),
    ("What colour is the flag of {x}?", "country", "colour"),
    ("Which element did the chemist {x} discover?", "person", "element"),
    ("Who founded the company {x}?", "company", "person"),
]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)).capitalize()


def _invent(kind: str, rng: random.Random) -> str:
    if kind == "country":
        return _word(rng, 2) + rng.choice(["ia", "land", "stan", "mora", ""])
    if kind == "city":
        return _word(rng, 2) + rng.choice(["burg", "ford", "port", "ville", ""])
    if kind == "person":
        return f"{_word(rng, 2)} {_word(rng, 2)}"
    if kind == "title":
        return f"The {_word(rng, 2)} of {_word(rng, 2)}"
    if kind == "company":
        return f"{_word(rng, 2)} {rng.choice(['Industries', 'Labs', 'Works', 'Systems'])}"
    if kind == "year":
        return str(rng.randint(1650, 1990))
    if kind == "animal":
        return rng.choice(_ANIMALS)
    if kind == "instrument":
        return rng.choice(_INSTRUMENTS)
    if kind == "colour":
        return rng.choice(_COLOURS)
    if kind == "element":
        return _word(rng, 2).lower() + "ium"
    raise AssertionError(kind)


def synthetic_facts(n: int, seed: int) -> list[Fact]:
    """`n` fictional facts about invented entities, deterministic for `seed`.

    Relations cycle through capitals, authors, birth years, national animals, instruments,
    flag colours, discovered elements and founders; every subject entity is unique, so no
    two facts ask the same question. No model can know these facts, so no probe is needed.
    """
    if n < 1:
        raise ValueError(f"synthetic_facts needs n >= 1, got {n}")
    rng = random.Random(f"{seed}/synthetic-facts")
    facts, subjects = [], set()
    while len(facts) < n:
        pattern, subject_kind, answer_kind = _RELATIONS[len(facts) % len(_RELATIONS)]
        subject = _invent(subject_kind, rng)
        if subject in subjects:
            continue
        subjects.add(subject)
        answer = _invent(answer_kind, rng)
        facts.append(Fact(f"synthetic-{seed}-{len(facts)}", pattern.format(x=subject), answer, (answer,)))
    return facts
