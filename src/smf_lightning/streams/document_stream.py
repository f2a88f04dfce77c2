"""facts=documents: a stream of a user's passages (data/documents.py reads and chunks them).

A task is passages_per_task passages, split by the records' task labels or by seed (optionally
from one half of the corpus, data.passage_split); its facts are the passages' questions (what
recall measures), its training examples the passages' chunks (data/documents.passage_examples;
fact_id = passage id, so slots are selected per passage) and, with data.augment, the study
material generated from them (augmentation.py).

With data.probe the base model is asked each question of a candidate passage closed-book first
(the probe prompt, then every template with probe_templates, as for facts): a question it
already answers measures nothing and is left out; a passage left with no question is passed
over for the next one in the seeded order. Both are counted (info["documents"]["probe"]).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from smf_lightning.data import documents
from smf_lightning.data.facts import FactTemplate, seeded_order
from smf_lightning.data.sources import QAItem
from smf_lightning.streams.probing import Prober
from smf_lightning.streams.stream import Stream

log = logging.getLogger(__name__)


def document_stream(spec: documents.DocumentSpec, *, n_tasks: int, facts_per_task: int, seed: int,
                    data_root: str | None, tokenizer, max_seq_len: int, chunk_overlap: int,
                    passage_split: str | None = None, prober: Prober | None = None,
                    probe_templates: Mapping[str, FactTemplate] | None = None) -> Stream:
    """The stream of the documents ``spec`` (facts_per_task counts passages); every task must have
    a question on some passage, or nothing would measure it. ``prober`` None keeps the questions
    the model already answers (data.probe=false); ``probe_templates`` are the templates it is
    also asked under (data.probe_templates)."""
    full = documents.read_documents(spec, data_root)
    df = documents.split_passages(full, passage_split)
    problem = documents.stream_shortfall(df, n_tasks, facts_per_task)
    if problem:
        raise documents.DocumentError(problem)
    labels = df.task_labels[:n_tasks]
    groups = ({label: [p for p, t in zip(df.passages, df.tasks) if t == label] for label in labels} if labels
              else {None: df.passages})
    needed = facts_per_task if labels else n_tasks * facts_per_task
    probe_info = {"probed": 0, "known": 0, "template_known": 0, "passages_all_known": []} if prober else None
    chosen = {}
    for label, group in groups.items():
        order = [group[i] for i in seeded_order(len(group), seed, "stream")]  # as data/facts.split_into_tasks
        chosen[label] = (order[:needed] if prober is None else
                         _unknown_passages(order, needed, prober, f"documents-{full.digest()}", probe_templates or {},
                                           probe_info, f"documents {df.location}" + (f", task {label}" if labels else "")))
    task_passages = (tuple(tuple(chosen[label]) for label in labels) if labels else
                     tuple(tuple(chosen[None][j * facts_per_task:(j + 1) * facts_per_task]) for j in range(n_tasks)))
    for j, passages in enumerate(task_passages):
        if not any(p.qa for p in passages):
            raise documents.DocumentError(
                f"documents {df.location}: task {labels[j] if labels else j} has no questions on any of its passages "
                f"({', '.join(p.id for p in passages)}), so nothing would measure it; attach qa pairs.")
    chunks = [sum(len(documents.passage_examples(tokenizer, p, max_seq_len, chunk_overlap)) for p in passages)
              for passages in task_passages]
    info = {**df.counts(), "passages_per_task": facts_per_task, "chunk_overlap": chunk_overlap,
            "max_seq_len": max_seq_len, "chunks_per_task": chunks,
            "qa_per_task": [sum(len(p.qa) for p in passages) for passages in task_passages],
            "task_passage_ids": [[p.id for p in passages] for passages in task_passages],
            **({"task_labels": labels} if labels else {}), **({"probe": probe_info} if probe_info else {})}
    log.info("Documents %s: %s; %d tasks x %d passages, %s chunks, %s questions per task", df.location,
             df.describe(), n_tasks, facts_per_task, chunks, info["qa_per_task"])
    if probe_info:
        log.info("Probe of the documents' questions: %d of %d already answered closed-book (%d under the probe prompt, "
                 "%d under a template), left out; %d passages with every question answered passed over%s",
                 probe_info["known"] + probe_info["template_known"], probe_info["probed"], probe_info["known"],
                 probe_info["template_known"], len(probe_info["passages_all_known"]),
                 f": {', '.join(probe_info['passages_all_known'][:20])}" if probe_info["passages_all_known"] else "")
    tasks = tuple(tuple(f for p in passages for f in p.qa) for passages in task_passages)
    # every question attached to any passage of the corpus (and its rephrasings): measures, never trains
    evaluation = tuple(q for p in full.passages for f in p.qa for q in (f.question, *f.rephrased))
    return Stream(tasks, {"facts": "documents", "facts_origin": f"documents:{df.location}", "documents": info},
                  task_passages=task_passages, evaluation_questions=evaluation)


def _unknown_passages(order: Sequence[documents.Passage], needed: int, prober: Prober, dataset: str,
                      templates: Mapping[str, FactTemplate], info: dict, where: str) -> list[documents.Passage]:
    """The first ``needed`` passages of ``order`` that keep a question the model does not answer,
    each with only such questions (a passage without questions, require_qa=false, is kept as is);
    probed in chunks, so only about the passages used are asked."""
    kept, checked = [], 0
    while len(kept) < needed and checked < len(order):
        chunk = order[checked: checked + (needed - len(kept)) * 5 // 4 + 4]
        checked += len(chunk)
        items = [QAItem(f.id, f.question, f.aliases) for p in chunk for f in p.qa]
        records, cache_file = prober.probe(items, dataset=dataset)
        known = {i for i, r in records.items() if r.known}
        info["probed"] += len(items)
        info["known"] += len(known)
        info["cache_file"] = str(cache_file)
        for template in templates.values():
            misses = [it for it in items if it.id not in known]
            if not misses:
                break
            recs, _ = prober.probe(misses, template.prompt("{question}"), dataset)
            hits = {i for i, r in recs.items() if r.known}
            info["template_known"] += len(hits)
            known |= hits
        for p in chunk:
            unknown = tuple(f for f in p.qa if f.id not in known)
            if len(kept) >= needed:
                break
            if p.qa and not unknown:
                info["passages_all_known"].append(p.id)
            else:
                kept.append(documents.Passage(p.id, p.text, unknown))
    if len(kept) < needed:
        raise documents.DocumentError(
            f"{where}: only {len(kept)} passages keep a question the model does not already answer ({info['probed']} "
            f"questions probed, {info['known'] + info['template_known']} answered; {len(info['passages_all_known'])} "
            f"passages with every question answered), {needed} needed; add passages, lower data.passages_per_task or "
            f"data.n_tasks, or keep the questions the model answers with data.probe=false.")
    return kept
