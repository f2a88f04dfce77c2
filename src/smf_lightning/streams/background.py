"""The background corpus's items (docs/design.md §3, §9): QA facts about other questions than
the stream's and LAMBADA passages, which the background statistics, whitening, key init and the
read gate are fitted to (FactStreamDataModule.background_examples encodes them).

Every item is kept apart from what the run trains or measures: synthetic facts follow the
stream's in the generator's sequence, TriviaQA questions come from the far end of the probe
pool's seeded order, and LAMBADA / NQ-open items from the far end of the held-out suite's seeded
permutation (eval/suites.suite_subset_order), so neither ever overlaps the other.
"""

from __future__ import annotations

from collections.abc import Mapping

from smf_lightning.data.facts import Fact, qa_item_to_fact, seeded_order, synthetic_facts
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
