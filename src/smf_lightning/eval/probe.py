"""Probing the base model: which questions it already answers.

A fact stream keeps only facts the base model gets wrong (docs/design.md §6), and the
known-facts suites only facts it answers: both ask the model each question greedily under a
few-shot probe prompt and score the answer against the aliases (probe_model). Results are
cached per (model fingerprint, prompt, decoding length, dataset), so the runs of a sweep probe
once. The stream is assembled from the probe's results by streams/triviaqa_stream.py and streams/file_stream.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from smf_lightning.data.sources import QAItem
from smf_lightning.eval import scoring
from smf_lightning.text import contains_answer, exact_match

log = logging.getLogger(__name__)


DEFAULT_PROBE_PROMPT = (
    "Question: What is the capital of France?\nAnswer: Paris\n\n"
    "Question: Who wrote the play Romeo and Juliet?\nAnswer: William Shakespeare\n\n"
    "Question: {question}\nAnswer:"
)


@dataclass(frozen=True)
class ProbeRecord:
    prediction: str
    exact_match: float
    contains: float

    @property
    def known(self) -> bool:
        """Lenient on purpose: any alias anywhere in the answer counts as known, so the kept
        "misses" are facts the model really does not produce."""
        return self.exact_match > 0 or self.contains > 0


def model_fingerprint(model) -> str:
    """A content hash of a model: class, config, and a strided sample (<= 65,536 values) of
    every parameter tensor. Cheap (well under a second for 0.5B parameters) yet changes
    whenever the weights do. Probe the *base* model: retrofitted memory parameters are part
    of the hash."""
    digest = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        cfg = config.to_dict()
        for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
            cfg.pop(volatile, None)
        digest.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            stride = max(1, flat.numel() // 65536)
            sample = flat[::stride].to(torch.float32).cpu().contiguous()
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def probe_model(
    model,
    tokenizer,
    items: Sequence[QAItem],
    *,
    prompt: str = DEFAULT_PROBE_PROMPT,
    max_new_tokens: int = 12,
    batch_size: int = 32,
    cache_file: str | Path | None = None,
    fingerprint: str | None = None,
) -> dict[str, ProbeRecord]:
    """Greedy answers of `model` to `items` (batched), scored against their aliases.

    With `cache_file`, results are read from and merged into a JSON file that belongs to
    one (model fingerprint, prompt, max_new_tokens); only items not yet in it are probed.
    """
    if "{question}" not in prompt:
        raise ValueError(f"The probe prompt must contain {{question}}; got {prompt!r}")
    header = {"model_fingerprint": fingerprint, "prompt": prompt, "max_new_tokens": max_new_tokens}
    records: dict[str, ProbeRecord] = {}
    path = Path(cache_file) if cache_file is not None else None
    if path is not None and path.exists():
        stored = json.loads(path.read_text())
        if stored.get("header") == header:
            records = {k: ProbeRecord(**v) for k, v in stored["records"].items()}
    todo = [it for it in items if it.id not in records]
    if todo and model is None:
        raise ValueError(
            f"{len(todo)} of {len(items)} questions are not in the probe cache ({path}); pass the base model to probe them."
        )
    if todo:
        log.info("Probing the model on %d questions (%d cached)", len(todo), len(items) - len(todo))
        prompts = [prompt.replace("{question}", it.question) for it in todo]
        answers = scoring.generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size)  # looked up per call
        for it, pred in zip(todo, answers):
            records[it.id] = ProbeRecord(pred.strip(), exact_match(pred, it.answers), contains_answer(pred, it.answers))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():  # merge what another run added meanwhile (runs of a sweep share the cache)
                stored = json.loads(path.read_text())
                if stored.get("header") == header:
                    for k, v in stored["records"].items():
                        records.setdefault(k, ProbeRecord(**v))
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")  # one temp file per process
            tmp.write_text(json.dumps({"header": header, "records": {k: asdict(v) for k, v in records.items()}}))
            tmp.replace(path)  # atomic: a killed run never leaves half a cache
    return {it.id: records[it.id] for it in items}


def probe_cache_file(cache_dir: str | Path, fingerprint: str, prompt: str, max_new_tokens: int, dataset: str) -> Path:
    key = hashlib.sha256(json.dumps([prompt, max_new_tokens, dataset]).encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / f"probe-{dataset}-{fingerprint[:16]}-{key}.json"


def default_cache_dir() -> Path:
    """<project cache>/probes (the assets module's cache root: $SMF_CACHE or ~/.cache/smf_lightning)."""
    try:
        from smf_lightning.assets import cache_root

        return cache_root() / "probes"
    except ImportError:  # pragma: no cover
        return Path.home() / ".cache" / "smf_lightning" / "probes"
