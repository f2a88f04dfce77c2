"""What building a fact stream yields (:class:`Stream`), and the simplest builder (synthetic facts).

One builder per ``data.facts`` kind, each a function returning a Stream:

- ``synthetic``: :func:`synthetic_stream` below (invented facts, unknown to any model);
- ``triviaqa``: triviaqa_stream.py (TriviaQA questions the probe finds the model does not know);
- ``file``: file_stream.py (a user's facts file, optionally probed the same way);
- ``documents``: document_stream.py (a user's passages; a task trains on their text).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from smf_lightning.data.documents import Passage
from smf_lightning.data.facts import Fact, split_into_tasks, synthetic_facts

FACT_SOURCES = ("triviaqa", "synthetic", "file", "documents")  # data.facts: one builder each


@dataclass
class Stream:
    tasks: tuple[tuple[Fact, ...], ...]  # the facts recall measures, task by task, in stream order
    info: dict  # how the stream was made (facts, facts_origin, and the builder's counts): summary.json's data
    task_passages: tuple[tuple[Passage, ...], ...] = ()  # facts=documents: each task's passages (its training text)
    known: list[Fact] = field(default_factory=list)  # facts=file, known_items > 0: the file_known suite's facts
    pool_end: int = 0  # facts=triviaqa: positions of the seeded TriviaQA order the probe pool examined
    # facts=documents: every question attached to a passage of the corpus, and its rephrasings: they
    # measure and never train (no study material states one; the encoder refuses to encode one)
    evaluation_questions: tuple[str, ...] = ()


def synthetic_stream(n_tasks: int, facts_per_task: int, seed: int) -> Stream:
    """Invented facts (data/facts.synthetic_facts): the generator's first n_tasks * facts_per_task."""
    candidates = synthetic_facts(n_tasks * facts_per_task, seed)
    tasks = split_into_tasks(candidates, n_tasks, facts_per_task, seed, " from the synthetic generator")
    return Stream(tasks, {"facts": "synthetic", "facts_origin": f"synthetic(seed={seed})"})
