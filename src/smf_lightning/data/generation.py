"""Greedy generation that is saved as it goes, shared by the rewordings of questions
(data/rewording.py) and the study material of passages (data/augment.py): the prompts are
decoded a few batches at a time, and the caller stores and saves each chunk before the next one
is generated, so an interrupted generation keeps what it wrote. The decoding function is passed
in (eval/scoring.generate_greedy): the data layer runs no model itself."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

CHUNK_BATCHES = 4  # generation batches between two saves of the cache


def generate_in_chunks(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int, *,
                       generate: Callable) -> Iterator[tuple[slice, list[str]]]:
    """(the chunk's positions in ``prompts``, its outputs), one chunk of CHUNK_BATCHES batches at a
    time; ``generate(model, tokenizer, prompts, max_new_tokens, batch_size)`` returns one string each."""
    size = max(batch_size, 1) * CHUNK_BATCHES
    for start in range(0, len(prompts), size):
        part = slice(start, min(start + size, len(prompts)))
        yield part, generate(model, tokenizer, list(prompts[part]), max_new_tokens, batch_size)


def write_json_atomic(path: Path, obj) -> None:
    """``obj`` as JSON at ``path``, written to a temporary file first: a reader (or a run killed
    midway) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)
