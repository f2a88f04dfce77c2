"""Fact-injection stream: facts the base model does not know, split into tasks.

docs/design.md §6: a continual-learning stream is a sequence of tasks, each a few facts the
base model gets wrong (probe it first, keep only misses). Every fact becomes several
training sequences from paraphrase templates; at least one template is held out of
training and only used to measure whether the learned fact generalises beyond the
surface forms it was trained on.

Facts come from TriviaQA (real questions, probed on the actual model), from a seeded
generator of fictional facts (invented entities: unknown to any model by construction), or
from a user's file or dataset (data/fact_file.py; probed or not).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from smf_lightning.data.sources import QAItem
from smf_lightning.eval.metrics import contains_answer, exact_match

log = logging.getLogger(__name__)

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
# Answer extraction and recall


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


# -----------------------------------------------------------------------------
# Training sequences


@dataclass(frozen=True)
class TrainingExample:
    """One tokenised training sequence; `loss_mask[t]` says whether token t is a target."""

    input_ids: tuple[int, ...]
    loss_mask: tuple[bool, ...]
    fact_id: str
    template: str


def encode_example(
    tokenizer, template: FactTemplate, question: str, answer: str, loss_on: str = "answer", fact_id: str = ""
) -> TrainingExample:
    """Tokenise prompt, answer and suffix separately (the same boundary evaluation scores)
    and mark the loss-carrying tokens: the answer (default), the answer and the template's
    suffix (teaches where the answer ends), or the whole sequence."""
    if loss_on not in LOSS_ON:
        raise ValueError(f"Unknown loss_on {loss_on!r}; use one of: {', '.join(LOSS_ON)}.")
    prompt, answer_text, suffix = template.render(question, answer)
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(answer_text, add_special_tokens=False)["input_ids"]
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
    if loss_on == "full":
        mask = [False] + [True] * (len(prompt_ids) + len(answer_ids) + len(suffix_ids) - 1)
    else:
        mask = [False] * len(prompt_ids) + [True] * len(answer_ids) + [loss_on == "answer_and_suffix"] * len(suffix_ids)
    return TrainingExample(tuple(prompt_ids + answer_ids + suffix_ids), tuple(mask), fact_id, template.name)


def collate_examples(examples: Sequence[TrainingExample], pad_id: int) -> dict:
    """Right-padded batch for causal-LM training.

    input_ids, attention_mask [B, T]; labels [B, T] (= input_ids on loss tokens, -100 on
    the rest and on padding; HF shifts them internally); loss_mask [B, T] bool (= labels
    != -100: the target tokens); loss_input_mask [B, T] bool (positions whose output
    predicts a target, i.e. loss_mask shifted left by one — the tokens whose memory
    accesses "carry loss" for slot statistics); fact_ids, templates (lists of str).
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
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "loss_mask": loss_mask,
        "loss_input_mask": loss_input_mask,
        "fact_ids": [e.fact_id for e in examples],
        "templates": [e.template for e in examples],
    }


# -----------------------------------------------------------------------------
# Probing the base model


DEFAULT_PROBE_PROMPT = (
    "Question: What is the capital of France?\nAnswer: Paris\n\n"
    "Question: Who wrote the play Romeo and Juliet?\nAnswer: William Shakespeare\n\n"
    "Question: {question}\nAnswer:"
)


@dataclass(frozen=True)
class ProbeRecord:
    prediction: str
    exact_match: float
    contains: float

    @property
    def known(self) -> bool:
        """Lenient on purpose: any alias anywhere in the answer counts as known, so the kept
        "misses" are facts the model really does not produce."""
        return self.exact_match > 0 or self.contains > 0


def model_fingerprint(model) -> str:
    """A content hash of a model: class, config, and a strided sample (<= 65,536 values) of
    every parameter tensor. Cheap (well under a second for 0.5B parameters) yet changes
    whenever the weights do. Probe the *base* model: retrofitted memory parameters are part
    of the hash."""
    digest = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        cfg = config.to_dict()
        for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
            cfg.pop(volatile, None)
        digest.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            stride = max(1, flat.numel() // 65536)
            sample = flat[::stride].to(torch.float32).cpu().contiguous()
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def probe_model(
    model,
    tokenizer,
    items: Sequence[QAItem],
    *,
    prompt: str = DEFAULT_PROBE_PROMPT,
    max_new_tokens: int = 12,
    batch_size: int = 32,
    cache_file: str | Path | None = None,
    fingerprint: str | None = None,
) -> dict[str, ProbeRecord]:
    """Greedy answers of `model` to `items` (batched), scored against their aliases.

    With `cache_file`, results are read from and merged into a JSON file that belongs to
    one (model fingerprint, prompt, max_new_tokens); only items not yet in it are probed.
    """
    from smf_lightning.eval.scoring import generate_greedy

    if "{question}" not in prompt:
        raise ValueError(f"The probe prompt must contain {{question}}; got {prompt!r}")
    header = {"model_fingerprint": fingerprint, "prompt": prompt, "max_new_tokens": max_new_tokens}
    records: dict[str, ProbeRecord] = {}
    path = Path(cache_file) if cache_file is not None else None
    if path is not None and path.exists():
        stored = json.loads(path.read_text())
        if stored.get("header") == header:
            records = {k: ProbeRecord(**v) for k, v in stored["records"].items()}
    todo = [it for it in items if it.id not in records]
    if todo and model is None:
        raise ValueError(
            f"{len(todo)} of {len(items)} questions are not in the probe cache ({path}); pass the base model to probe them."
        )
    if todo:
        log.info("Probing the model on %d questions (%d cached)", len(todo), len(items) - len(todo))
        prompts = [prompt.replace("{question}", it.question) for it in todo]
        answers = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size)
        for it, pred in zip(todo, answers):
            records[it.id] = ProbeRecord(pred.strip(), exact_match(pred, it.answers), contains_answer(pred, it.answers))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():  # merge what another run added meanwhile (runs of a sweep share the cache)
                stored = json.loads(path.read_text())
                if stored.get("header") == header:
                    for k, v in stored["records"].items():
                        records.setdefault(k, ProbeRecord(**v))
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")  # one temp file per process
            tmp.write_text(json.dumps({"header": header, "records": {k: asdict(v) for k, v in records.items()}}))
            tmp.replace(path)  # atomic: a killed run never leaves half a cache
    return {it.id: records[it.id] for it in items}


def probe_cache_file(cache_dir: str | Path, fingerprint: str, prompt: str, max_new_tokens: int, dataset: str) -> Path:
    key = hashlib.sha256(json.dumps([prompt, max_new_tokens, dataset]).encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / f"probe-{dataset}-{fingerprint[:16]}-{key}.json"


def default_cache_dir() -> Path:
    """<project cache>/probes (the assets module's cache root: $SMF_CACHE or ~/.cache/smf_lightning)."""
    try:
        from smf_lightning.assets import cache_root

        return cache_root() / "probes"
    except ImportError:  # pragma: no cover
        return Path.home() / ".cache" / "smf_lightning" / "probes"


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
