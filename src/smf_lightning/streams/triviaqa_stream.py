"""facts=triviaqa: a stream of TriviaQA facts the base model does not know.

A seeded pool of eligible questions (short answers, every template within max_seq_len) is probed
under the probe prompt and only the misses are kept; with probe_templates, candidates are also
probed under every template and dropped if any of them elicits an alias. The pool takes the
front of the seeded order; the triviaqa_known suite (known.py) scans on from where the pool
ended, and the background (background.py) takes its questions from the far end.

With ``data.lead_stream`` the stream opens with the facts of a shorter stream of the same seed, in
that stream's order (built exactly as a run of those options builds it), and continues with its
own: a longer stream whose first tasks are the dev stream's, whose facts carry the committed
evaluation-only rephrasings (experiments/scale/SCALE.md). Without it, a larger probe pool changes
the whole order: the seeded shuffles that pick and order the facts depend on how many were found.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from smf_lightning.data.facts import Fact, qa_item_to_fact, seeded_order, split_into_tasks
from smf_lightning.data.rephrasings import builtin_stream_ids, check_rephrasings, read_rephrasings
from smf_lightning.data.sources import load_source
from smf_lightning.errors import ConfigError
from smf_lightning.streams.encoding import FactEncoder
from smf_lightning.streams.probing import Prober
from smf_lightning.streams.stream import Stream

log = logging.getLogger(__name__)

LEAD_KEYS = ("probe_pool_size", "n_tasks", "facts_per_task")  # data.lead_stream: the lead's own stream options


def check_lead_stream(lead: Mapping | None, *, facts: str, pool_size: int, n_tasks: int, facts_per_task: int) -> None:
    """ConfigError unless ``lead`` (data.lead_stream) is null or a shorter TriviaQA stream of this
    seed whose probe pool lies inside this stream's (so the known-facts suite and the background,
    which start after and at the far end of this pool, never hold one of its facts)."""
    if not lead:
        return
    where = f"bad config: data.lead_stream={dict(lead)!r}"
    if facts != "triviaqa":
        raise ConfigError(f"{where}: a lead stream is a TriviaQA stream; data.facts={facts!r} has none (use null).")
    if set(lead) != set(LEAD_KEYS) or not all(isinstance(lead[k], int) and lead[k] >= 1 for k in LEAD_KEYS):
        raise ConfigError(f"{where}: give exactly {', '.join(LEAD_KEYS)}, each an integer >= 1 (the dev stream of "
                          "experiment=smf_recipe: {probe_pool_size: 600, n_tasks: 5, facts_per_task: 40}).")
    if lead["probe_pool_size"] > pool_size:
        raise ConfigError(f"{where}: its probe pool must lie inside this stream's: probe_pool_size "
                          f"{lead['probe_pool_size']} > data.probe_pool_size={pool_size}.")
    if lead["n_tasks"] * lead["facts_per_task"] >= n_tasks * facts_per_task:
        raise ConfigError(f"{where}: the lead's {lead['n_tasks'] * lead['facts_per_task']} facts must be fewer than "
                          f"the stream's {n_tasks} x {facts_per_task}.")


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
    lead_stream: Mapping | None = None,
) -> Stream:
    """The stream (data.probe_pool_size, data.probe_templates, data.exclude_streams,
    data.rephrasings, data.lead_stream); ``n_background`` questions at the far end of the order
    are the background's and never probed."""
    check_lead_stream(lead_stream, facts="triviaqa", pool_size=pool_size, n_tasks=n_tasks, facts_per_task=facts_per_task)
    lead: list[Fact] = []
    if lead_stream:  # the lead as a run of its options builds it (no exclusions), then this stream's own facts
        first = triviaqa_stream(n_tasks=int(lead_stream["n_tasks"]), facts_per_task=int(lead_stream["facts_per_task"]),
                                seed=seed, pool_size=int(lead_stream["probe_pool_size"]), n_background=n_background,
                                encoder=encoder, prober=prober, probe_templates=probe_templates, source=source,
                                data_root=data_root)
        lead = [f for task in first.tasks for f in task]
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
    if lead:  # the lead's facts are in this pool (same seed, a pool inside this one): not twice
        led = {f.id for f in lead}
        pool = [it for it in pool if it.id not in led]
    fingerprint = prober.fingerprint()
    records, cache_file = prober.probe(pool)
    misses = [it for it in pool if not records[it.id].known]
    probe_info = {"pool": len(pool), "known": len(pool) - len(misses), "unknown": len(misses),
                  "model_fingerprint": fingerprint, "cache_file": str(cache_file)}
    where = f" (the probe found {len(misses)} unknown among {len(pool)} probed TriviaQA questions"
    needed = n_tasks * facts_per_task - len(lead)
    if probe_templates:
        candidates = [misses[i] for i in seeded_order(len(misses), seed, "stream")]
        kept, checked = prober.unknown_under_templates(candidates, needed, encoder.templates)
        probe_info.update(template_checked=checked, template_known=checked - len(kept))
        where += f"; {len(kept)} of the {checked} checked were also unknown under every template"
        misses = kept
    info = {"facts": "triviaqa", "facts_origin": f"{data.origin}:{data.location}", "probe": probe_info}
    log.info("Probe: %d TriviaQA facts unknown to the model (%s)", len(misses), probe_info)
    if lead:
        info["lead_stream"] = {**dict(lead_stream), "facts": len(lead), "probe": first.info["probe"]}
        where += f"; after the lead stream's {len(lead)} facts"
        own = split_into_tasks([qa_item_to_fact(it) for it in misses], 1, needed, seed, where + ")")[0]
        chosen = (*lead, *own)
        tasks = tuple(chosen[t * facts_per_task:(t + 1) * facts_per_task] for t in range(n_tasks))
    else:
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
