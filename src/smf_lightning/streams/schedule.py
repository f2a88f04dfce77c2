"""The schedule of a task's training batches (data.schedule): which examples go together, in
which order, how many passes, how often each batch repeats.

- ``sequential``: consecutive chunks of train_batch_size examples in stream order (one fact
  after another, as in docs/design.md §9); epochs_per_task passes over them.
- ``interleaved``: the task's examples are shuffled once (seeded per task) into batches that mix
  facts, and each of the epochs_per_task passes visits all of those batches in a new seeded
  order, so every fact comes back once per pass (DOTS: batch 16, ~19 exposures per fact).
  Batches keep their composition across passes, so the frozen-prefix cache
  (method.prefix_cache >= batches per task) serves every pass after the first.

Either way each batch is repeated repeats_per_batch times in a row.
"""

from __future__ import annotations

from typing import TypeVar

from smf_lightning.data.facts import seeded_order

SCHEDULES = ("sequential", "interleaved")

T = TypeVar("T")


def task_batches(examples: list[T], task_index: int, *, schedule: str, batch_size: int, epochs: int,
                 repeats: int, order_seed: int) -> list[list[T]]:
    """The task's batches of ``examples``, in training order (``order_seed``: data.order_seed)."""
    if schedule == "interleaved":
        order = seeded_order(len(examples), order_seed, f"task{task_index}/batches")
        shuffled = [examples[i] for i in order]
        chunks = [shuffled[i:i + batch_size] for i in range(0, len(shuffled), batch_size)]
        batches = []
        for epoch in range(epochs):
            batches += [chunks[i] for i in seeded_order(len(chunks), order_seed, f"task{task_index}/pass{epoch}")]
    else:
        chunks = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
        batches = chunks * epochs
    return [chunk for chunk in batches for _ in range(repeats)]
