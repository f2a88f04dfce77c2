"""The background corpus (docs/design.md §3, §9): QA facts about other questions than the
stream's and LAMBADA passages, which the background statistics, whitening, key init and the
read gate are fitted to.

:func:`background_items` picks the items. Every item is kept apart from what the run trains or
measures: synthetic facts follow the stream's in the generator's sequence, TriviaQA questions
come from the far end of the probe pool's seeded order, and LAMBADA / NQ-open items from the far
end of the held-out suite's seeded permutation (eval/suites.suite_subset_order), so neither ever
overlaps the other. :func:`encode_background` encodes them, :func:`collate_template_groups`
groups each question's sequences under every training template (zca_within whitening).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from smf_lightning.data.facts import (
    Fact,
    TrainingExample,
    collate_examples,
    qa_item_to_fact,
    seeded_order,
    synthetic_facts,
)
from smf_lightning.data.sources import PassageItem, load_source
from smf_lightning.eval.custom_suites import is_custom
from smf_lightning.eval.suites import suite_subset_order

BACKGROUND_SOURCES = ("lambada", "triviaqa", "nq_open", "synthetic")


def background_items(
    sizes: Mapping[str, int],
    *,
    stream_size: int,
    seed: int,
    suite_options: Mapping[str, Mapping],
    source: str = "auto",
    data_root: str | None = None,
) -> tuple[list[Fact], list[PassageItem]]:
    """(QA facts, LAMBADA passages) of a background of ``sizes`` (source -> count; a missing or
    zero count takes none) for a stream of ``stream_size`` facts, in order: synthetic, TriviaQA
    and NQ-open facts; ``suite_options`` are the run's held-out suites (data.suites)."""
    passages: list[PassageItem] = []
    facts: list[Fact] = []
    n_synthetic = sizes.get("synthetic", 0)
    if n_synthetic:
        # The generator is sequential: facts after the stream's first n_tasks*facts_per_task
        # are new inventions, never stream facts (whatever the fact source).
        facts += synthetic_facts(stream_size + n_synthetic, seed)[stream_size:]
    n_trivia = sizes.get("triviaqa", 0)
    if n_trivia:
        # The end of the probe pool's seeded order: never probed, never stream facts.
        data = load_source("triviaqa", source=source, data_root=data_root)
        order = seeded_order(len(data), seed, "triviaqa/pool")
        facts += [qa_item_to_fact(data.items[p]) for p in reversed(order[len(data) - n_trivia:])]
    n_lambada = sizes.get("lambada", 0)
    if n_lambada:
        data = load_source("lambada", source=source, data_root=data_root)
        order = background_order("lambada", len(data), n_lambada, seed, suite_options)
        passages = [data.items[i] for i in order]
    n_nq = sizes.get("nq_open", 0)
    if n_nq:
        data = load_source("nq_open", source=source, data_root=data_root)
        order = background_order("nq_open", len(data), n_nq, seed, suite_options)
        facts += [qa_item_to_fact(data.items[i]) for i in order]
    return facts, passages


def background_order(name: str, n_total: int, n_background: int, seed: int,
                     suite_options: Mapping[str, Mapping]) -> list[int]:
    """The last items of the suite's seeded permutation: disjoint from the suite's first items."""
    opts = suite_options.get(name, {})
    n_suite = 0 if is_custom(opts) else int(opts.get("n_items", 0))  # a suite of one's own reads other data
    if n_suite + n_background > n_total:
        raise ValueError(
            f"{name}: suite n_items ({n_suite}) + background ({n_background}) exceed the {n_total} items; lower one."
        )
    order = suite_subset_order(name, n_total, seed)
    return list(reversed(order[n_total - n_background:]))


def encode_background(facts: Sequence[Fact], passages: Sequence[PassageItem], *,
                        encode: Callable[[Fact, str], TrainingExample], templates: Sequence[str], tokenizer,
                        max_len: int, seed: int) -> list[TrainingExample]:
    """The corpus's sequences: QA text in the stream's *training* ``templates`` (in turn) but
    about other questions (so template tokens look ordinary, not fact-specific), plus LAMBADA
    passages, in a seeded shuffled order. loss_mask follows loss_on for QA text (``encode``) and
    covers every passage token for LAMBADA; sequences are truncated to ``max_len`` tokens."""
    examples = [encode(fact, templates[i % len(templates)]) for i, fact in enumerate(facts)]
    for passage in passages:
        ids = tokenizer(passage.text, add_special_tokens=True)["input_ids"]
        examples.append(TrainingExample(tuple(ids), (False,) + (True,) * (len(ids) - 1), f"lambada-{passage.id}", "passage"))
    examples = [
        TrainingExample(e.input_ids[:max_len], e.loss_mask[:max_len], e.fact_id, e.template)
        for e in examples
    ]
    order = seeded_order(len(examples), seed, "background")
    return [examples[i] for i in order]


def collate_background(examples: Sequence[TrainingExample], batch_size: int, pad_id: int,
                       sort_by_length: bool = False) -> list[dict]:
    """Collated background batches (same keys as training batches)."""
    if not examples:
        raise ValueError("The background corpus is empty: set at least one count in `background`.")
    if sort_by_length:
        # Batches of similar length (stable sort of the seeded order): short QA sequences are not
        # padded to the length of a LAMBADA passage (statistics over all batches do not need the
        # shuffled order; k-means key init, which may stop early, does).
        examples = sorted(examples, key=lambda e: len(e.input_ids))
    return [collate_examples(examples[i:i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]


def collate_template_groups(facts: Sequence[Fact], *, encode: Callable[[Fact, str], TrainingExample],
                           templates: Sequence[str], questions_per_batch: int, pad_id: int) -> list[dict]:
    """Background QA ``facts``, each under every *training* template, collated with ``groups``
    (the question's index per row): the corpus of the within-question covariance of
    ``model.memory.input_norm=zca_within`` (memory/whitening.py)."""
    if len(facts) < 2 or len(templates) < 2:
        raise ValueError(
            f"input_norm=zca_within needs >= 2 background questions and >= 2 training templates; got "
            f"{len(facts)} and {len(templates)} (data.background.triviaqa, data.templates)."
        )
    return collate_groups([[encode(f, name) for name in templates] for f in facts], questions_per_batch, pad_id)


def collate_groups(groups: Sequence[Sequence[TrainingExample]], questions_per_batch: int, pad_id: int) -> list[dict]:
    """Batches of ``questions_per_batch`` groups (one question's sequences each), with ``groups``:
    the group's index for every row."""
    batches = []
    for start in range(0, len(groups), questions_per_batch):
        chunk = groups[start:start + questions_per_batch]
        batch = collate_examples([e for g in chunk for e in g], pad_id)
        batch["groups"] = torch.tensor([start + q for q, g in enumerate(chunk) for _ in g])
        batches.append(batch)
    return batches
