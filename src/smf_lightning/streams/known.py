"""The known-facts suites (locality): facts the base model answers exactly under the probe prompt,
so the suite scores 1.0 before training and measures what training takes away.

- ``triviaqa_known`` (data.suites.triviaqa_known): TriviaQA questions taken from the seeded order
  after the stream's probe pool and before the background's questions, disjoint from both;
- ``file_known`` (facts=file with data.known_items > 0): records of the facts file the probe of
  the file (file_stream.py) found answered exactly.

Both are asked under the probe prompt (:func:`known_template`), under which they were found known.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from smf_lightning.data.fact_file import FactFileError
from smf_lightning.data.facts import Fact, FactTemplate, qa_item_to_fact, seeded_order
from smf_lightning.data.sources import QAItem, load_source
from smf_lightning.eval.suites import FactRecallSuite
from smf_lightning.streams.probing import Prober

log = logging.getLogger(__name__)

KNOWN_SUITE = "triviaqa_known"
FILE_KNOWN_SUITE = "file_known"  # facts=file with known_items > 0: the file's records the model answers


def known_template(probe_prompt: str) -> FactTemplate:
    """The prompt of the known-facts suites: the probe prompt (few-shot "Question: ... Answer: ...")."""
    return FactTemplate("probe", probe_prompt + " {answer}\n")


def known_suite(name: str, facts: Sequence[Fact], where: str, *, probe_prompt: str, max_new_tokens: int,
                generation_batch_size: int) -> FactRecallSuite:
    """The suite ``name`` of ``facts`` (found known among ``where``'s) under the probe prompt."""
    return FactRecallSuite(facts, known_template(probe_prompt), max_new_tokens, generation_batch_size, name=name,
                           origin=f"{where} (answered exactly by the base model under the probe prompt)")


def known_triviaqa_facts(
    n_items: int,
    *,
    prober: Prober,
    eligible: Callable[[QAItem], bool],
    seed: int,
    pool_end: int,
    n_background: int,
    source: str = "auto",
    data_root: str | None = None,
) -> list[Fact]:
    """The triviaqa_known suite's facts: the first ``n_items`` eligible questions after position
    ``pool_end`` of the seeded order (where the stream's probe pool stopped) that the base model
    answers exactly. Known under *every* template as well would be stricter, but this model
    answers in the odd templates so rarely (1 of 82 probe hits was right under all five) that no
    suite of useful size exists."""
    data = load_source("triviaqa", source=source, data_root=data_root)
    order = seeded_order(len(data), seed, "triviaqa/pool")
    region = [data.items[p] for p in order[pool_end: len(data) - n_background]]
    prober.fingerprint()  # a missing model is reported before any chunk is read
    known: list[QAItem] = []
    checked, step = 0, 256
    while len(known) < n_items and checked < len(region):
        chunk = [it for it in region[checked: checked + step] if eligible(it)]
        checked += step
        records, _ = prober.probe(chunk)
        known += [it for it in chunk if records[it.id].exact_match == 1.0]
    if len(known) < n_items:
        raise ValueError(
            f"triviaqa_known: only {len(known)} TriviaQA questions are answered exactly by the model "
            f"(n_items={n_items} asked, {min(checked, len(region))} checked); lower data.suites.triviaqa_known.n_items."
        )
    log.info("Known-facts suite: %d TriviaQA facts the model answers (%d checked)", n_items, checked)
    return [qa_item_to_fact(it) for it in known[:n_items]]


def choose_file_known(known: Sequence[Fact], n_items: int, *, seed: int, path: str, n_probed: int) -> list[Fact]:
    """The file_known suite's facts: a seeded choice of ``n_items`` of the file's records the model
    answers exactly (``known``, in file order), kept in file order."""
    if len(known) < n_items:
        raise FactFileError(
            f"file_known: only {len(known)} records of {path} are answered exactly by the model "
            f"under the probe prompt ({n_probed} probed); lower data.known_items."
        )
    chosen = seeded_order(len(known), seed, "file_known")[:n_items]
    return [known[i] for i in sorted(chosen)]
