"""facts=documents: a stream of a user's passages (data/documents.py reads and chunks them).

A task is passages_per_task passages, split by the records' task labels or by seed; its facts
are the passages' questions (what recall measures), its training examples the passages' chunks
(data/documents.passage_examples; fact_id = passage id, so slots are selected per passage).
"""

from __future__ import annotations

import logging

from smf_lightning.data import documents
from smf_lightning.data.facts import split_into_tasks
from smf_lightning.streams.stream import Stream

log = logging.getLogger(__name__)


def document_stream(spec: documents.DocumentSpec, *, n_tasks: int, facts_per_task: int, seed: int,
                    data_root: str | None, tokenizer, max_seq_len: int, chunk_overlap: int) -> Stream:
    """The stream of the documents ``spec`` (facts_per_task counts passages); every task must have
    a question on some passage, or nothing would measure it."""
    df = documents.read_documents(spec, data_root)
    problem = documents.stream_shortfall(df, n_tasks, facts_per_task)
    if problem:
        raise documents.DocumentError(problem)
    labels = df.task_labels[:n_tasks]
    if labels:
        task_passages = tuple(
            split_into_tasks([p for p, t in zip(df.passages, df.tasks) if t == label], 1, facts_per_task, seed)[0]
            for label in labels)
    else:
        task_passages = split_into_tasks(df.passages, n_tasks, facts_per_task, seed)
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
            **({"task_labels": labels} if labels else {})}
    log.info("Documents %s: %s; %d tasks x %d passages, %s chunks, %s questions per task", df.location,
             df.describe(), n_tasks, facts_per_task, chunks, info["qa_per_task"])
    tasks = tuple(tuple(f for p in passages for f in p.qa) for passages in task_passages)
    return Stream(tasks, {"facts": "documents", "facts_origin": f"documents:{df.location}", "documents": info},
                  task_passages=task_passages)

