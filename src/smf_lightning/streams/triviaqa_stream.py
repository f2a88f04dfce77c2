"""facts=triviaqa: a stream of TriviaQA facts the base model does not know.

A seeded pool of eligible questions (short answers, every template within max_seq_len) is probed
under the probe prompt and only the misses are kept; with probe_templates, candidates are also
probed under every template and dropped if any of them elicits an alias. The pool takes the
front of the seeded order; the triviaqa_known suite (known.py) scans on from where the pool
ended, and the background (background.py) takes its questions from the far end.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from smf_lightning.data.facts import Fact, qa_item_to_fact, seeded_order, split_into_tasks
from smf_lightning.data.rephrasings import builtin_stream_ids, check_rephrasings, read_rephrasings
from smf_lightning.data.sources import load_source
from smf_lightning.streams.encoding import FactEncoder
from smf_lightning.streams.probing import Prober
from smf_lightning.streams.stream import Stream

log = logging.getLogger(__name__)


def triviaqa_stream(
    *,
    n_tasks: int,
    facts_per_task: int,
    seed: int,
    pool_size: int,
    n_background: int,
    encoder: FactEncoder,
    prober: Prober,
    probe_templates: bool,
    exclude_streams: Sequence[str] = (),
    rephrasings: str | None = None,
    source: str = "auto",
    data_root: str | None = None,
) -> Stream:
    """The stream (data.probe_pool_size, data.probe_templates, data.exclude_streams,
    data.rephrasings); ``n_background`` questions at the far end of the order are the
    background's and never probed."""
    data = load_source("triviaqa", source=source, data_root=data_root)
    order = seeded_order(len(data), seed, "triviaqa/pool")
    if pool_size + n_background > len(data):
        raise ValueError(
            f"probe_pool_size ({pool_size}) + background triviaqa ({n_background}) exceed the "
            f"{len(data)} TriviaQA questions; lower one of them."
        )
    pool = []
    end = 0  # positions of the order examined for the pool
    for pos in order[: len(data) - n_background]:  # background QA takes questions from the other end
        if len(pool) == pool_size:
            break
        end += 1
        if encoder.eligible(data.items[pos]):
            pool.append(data.items[pos])
    if exclude_streams:  # facts of other built-in streams (the test stream never shares a fact with dev)
        excluded = builtin_stream_ids(exclude_streams)
        pool = [it for it in pool if it.id not in excluded]
    fingerprint = prober.fingerprint()
    records, cache_file = prober.probe(pool)
    misses = [it for it in pool if not records[it.id].known]
    probe_info = {"pool": len(pool), "known": len(pool) - len(misses), "unknown": len(misses),
                  "model_fingerprint": fingerprint, "cache_file": str(cache_file)}
    where = f" (the probe found {len(misses)} unknown among {len(pool)} probed TriviaQA questions"
    if probe_templates:
        needed = n_tasks * facts_per_task
        candidates = [misses[i] for i in seeded_order(len(misses), seed, "stream")]
        kept, checked = prober.unknown_under_templates(candidates, needed, encoder.templates)
        probe_info.update(template_checked=checked, template_known=checked - len(kept))
        where += f"; {len(kept)} of the {checked} checked were also unknown under every template"
        misses = kept
    info = {"facts": "triviaqa", "facts_origin": f"{data.origin}:{data.location}", "probe": probe_info}
    log.info("Probe: %d TriviaQA facts unknown to the model (%s)", len(misses), probe_info)
    tasks = split_into_tasks([qa_item_to_fact(it) for it in misses], n_tasks, facts_per_task, seed, where + ")")
    if rephrasings:
        tasks = attach_rephrasings(tasks, rephrasings)
    return Stream(tasks, info, pool_end=end)


def attach_rephrasings(tasks: Sequence[Sequence[Fact]], rephrasings: str) -> tuple[tuple[Fact, ...], ...]:
    """The stream's TriviaQA facts with their evaluation-only rephrasings (data.rephrasings:
    the package's own, or a JSONL file of {id, rephrased}); facts without one keep none."""
    table = read_rephrasings(rephrasings)
    out = []
    for task in tasks:
        facts = []
        for f in task:
            texts = table.get(f.id, ())
            facts.append(Fact(f.id, f.question, f.answer, f.aliases, f.paraphrases,
                              check_rephrasings(texts, f.training_questions(), f"{rephrasings}: {f.id}")))
        out.append(tuple(facts))
    return tuple(out)
