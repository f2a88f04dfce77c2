"""facts=file: a stream of the facts in a user's file (data/fact_file.py reads and checks it).

Valid records, then those that fit (max_answer_words, max_seq_len under every template and
question), with data.probe=true only those the model does not know (as for TriviaQA: the probe
prompt, then every template with probe_templates), split by the records' task labels or by
seed. Every count (read, skipped and why, filtered, known, used) goes to info["file"] and the log.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from smf_lightning.data.fact_file import FactFile, FactFileError, FactFileSpec, read_fact_file, stream_shortfall
from smf_lightning.data.facts import Fact, FactTemplate, seeded_order, split_into_tasks
from smf_lightning.data.sources import QAItem
from smf_lightning.streams.encoding import FactEncoder
from smf_lightning.streams.known import choose_file_known
from smf_lightning.streams.probing import Prober
from smf_lightning.streams.stream import Stream

log = logging.getLogger(__name__)


def file_stream(
    spec: FactFileSpec,
    *,
    n_tasks: int,
    facts_per_task: int,
    seed: int,
    encoder: FactEncoder,
    prober: Prober | None,
    pool_size: int,
    probe_templates: bool,
    known_items: int = 0,
) -> Stream:
    """The stream of the file ``spec``; ``prober`` None keeps the facts the model knows
    (data.probe=false). With ``known_items`` the probe also picks the file_known suite's facts."""
    ff = read_fact_file(spec)
    fits, filtered = [], {"answer_too_long": 0, "sequence_too_long": 0}
    for fact in ff.facts:
        reason = encoder.unfit_reason(fact)
        if reason:
            filtered[reason] += 1
        fits.append(reason is None)
    usable = FactFile(ff.location, ff.format, [f for f, ok in zip(ff.facts, fits) if ok],
                      [t for t, ok in zip(ff.tasks, fits) if ok], [w for w, ok in zip(ff.where, fits) if ok],
                      ff.n_read, ff.skipped)
    note = (f"; {filtered['answer_too_long']} with an answer over max_answer_words={encoder.max_answer_words}, "
            f"{filtered['sequence_too_long']} over max_seq_len={encoder.max_seq_len} tokens") if any(filtered.values()) else ""
    problem = stream_shortfall(usable, n_tasks, facts_per_task, note)
    if problem:
        raise FactFileError(problem)
    labels = usable.task_labels[:n_tasks] or [None]
    groups = {label: [f for f, t in zip(usable.facts, usable.tasks) if t == label] for label in labels}
    per_group = facts_per_task if labels != [None] else n_tasks * facts_per_task
    file_info = {**ff.counts(), "filtered": filtered, "usable": len(usable.facts)}
    known: list[Fact] = []
    if prober is not None:
        groups, file_info["probe"], known_all = _drop_known(
            groups, per_group, ff.digest(), spec.path, prober=prober, seed=seed, pool_size=pool_size,
            probe_templates=probe_templates, templates=encoder.templates)
        if known_items:
            known = choose_file_known(known_all, known_items, seed=seed, path=spec.path,
                                      n_probed=file_info["probe"]["probed"])
        log.info("Probe of the facts file: %s", file_info["probe"])
    if labels == [None]:
        tasks = split_into_tasks(groups[None], n_tasks, facts_per_task, seed)
    else:
        tasks = tuple(split_into_tasks(groups[label], 1, facts_per_task, seed)[0] for label in labels)
        file_info["task_labels"] = labels
    file_info["used"] = sum(len(t) for t in tasks)
    file_info["used_paraphrases"] = sum(len(f.paraphrases) for t in tasks for f in t)
    info = {"facts": "file", "facts_origin": f"file:{ff.location}", "file": file_info}
    probed = f", {file_info['probe']['known']} of {file_info['probe']['probed']} probed known" if prober is not None else ""
    log.info("Facts file %s: %d records read, %d skipped %s, %d valid, %d too long%s; %d used in the stream",
             ff.location, ff.n_read, file_info["skipped_total"], file_info["skipped"], len(ff.facts),
             sum(filtered.values()), probed, file_info["used"])
    return Stream(tasks, info, known=known)


def _drop_known(groups: dict, needed: int, digest: str, path: str, *, prober: Prober, seed: int, pool_size: int,
                probe_templates: bool, templates: Mapping[str, FactTemplate]) -> tuple[dict, dict, list[Fact]]:
    """(groups without the facts the model knows, probe counts, the facts it answers exactly).
    A group's facts are probed under the probe prompt (every fact of a task label; without labels
    a seeded pool of ``pool_size``), then, with ``probe_templates``, under every template until
    ``needed`` are kept. Probes are cached per file content (an edited file is probed afresh)."""
    fingerprint = prober.fingerprint()
    dataset = f"file-{digest}"
    by_id = {f.id: f for facts in groups.values() for f in facts}
    kept_groups, known_all, info = {}, [], {"probed": 0, "known": 0, "template_known": 0, "model_fingerprint": fingerprint}
    for label, facts in groups.items():
        if label is None:
            facts = [facts[i] for i in seeded_order(len(facts), seed, "file/pool")[:pool_size]]
        items = [QAItem(f.id, f.question, f.aliases) for f in facts]
        records, cache_file = prober.probe(items, dataset=dataset)
        misses = [it for it in items if not records[it.id].known]
        known_all += [by_id[it.id] for it in items if records[it.id].exact_match == 1.0]
        info["probed"] += len(items)
        info["known"] += len(items) - len(misses)
        info["cache_file"] = str(cache_file)
        if probe_templates:
            candidates = [misses[i] for i in seeded_order(len(misses), seed, f"stream/{label}")]
            kept, checked = prober.unknown_under_templates(candidates, needed, templates, dataset)
            info["template_known"] += checked - len(kept)
            misses = kept
        kept_groups[label] = [by_id[it.id] for it in misses]
        if len(misses) < needed:
            what = f"task {label!r}" if label is not None else "the stream"
            more = (f" raise data.probe_pool_size (probed {len(items)} of {len(groups[label])}),"
                    if len(items) < len(groups[label]) else "")
            raise FactFileError(
                f"facts file {path}: only {len(misses)} facts for {what} are unknown to the model "
                f"({len(items)} probed, {info['known']} known under the probe prompt, {info['template_known']} "
                f"under a template), {needed} needed;{more} add facts, lower data.facts_per_task / data.n_tasks, "
                f"or keep the facts the model knows with data.probe=false."
            )
    return kept_groups, info, known_all
