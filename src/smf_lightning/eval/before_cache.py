"""The "before" evaluation, computed once per base model and evaluation setup, shared by runs.

Every method that starts from the base *function* — SMF with an additive, zero-initialised
memory (its output is exactly 0, so every logit is the base model's to the last bit), LoRA
(B = 0), full finetuning — scores exactly the same numbers before training. A sweep of N jobs
would compute them N times (minutes each at 200 items per suite). They are cached on disk
keyed by everything that changes them: the base model's fingerprint, the fact stream, the
templates, every suite's options and items (by content: a suite's own file can change under
the same config), the batch sizes (padding changes the arithmetic
slightly), the dtype and ``EVAL_FORMAT`` (bumped whenever scoring code changes its numbers).
A replace-mode memory or an init checkpoint is not the base function: never cached.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

EVAL_FORMAT = 2  # 2: the cached point carries its per-item scores (items/, bootstrap intervals)


def starts_from_base(cfg) -> bool:
    """Whether the run's model before training computes exactly the base model's function."""
    if cfg.model.get("init_checkpoint"):
        return False
    from ..methods import method_class, method_config

    if method_class(cfg.method).retrofits(method_config(cfg.method)):
        return cfg.model.memory.mode == "additive"
    return True


def _fact_key(fact) -> list:
    return [fact.id, fact.question, fact.answer, list(fact.aliases)]


def _items_digest(items) -> str:
    # items are frozen dataclasses (QAItem, ChoiceItem, TextItem, ...): their repr holds every field
    return hashlib.blake2b(repr(list(items)).encode(), digest_size=12).hexdigest()


def before_eval_key(cfg, dm, base_fingerprint: str) -> dict:
    from omegaconf import OmegaConf

    # a datamodule stand-in without held-out suites (tests) has no items to key
    suites = dm.heldout_suites() if hasattr(dm, "heldout_suites") else {}
    rephrased = [[f.id, list(f.rephrased)] for t in range(dm.n_tasks) for f in dm.task_facts(t) if f.rephrased]
    # only when some fact has rephrasings: the keys (and cached points) of streams without them stay as they were
    asked = {"rephrased": rephrased, "rephrased_max_new_tokens": dm.rephrased_max_new_tokens,
             "rephrased_template": dm.templates[dm.train_templates[0]].text} if rephrased else {}

    return {
        "format": EVAL_FORMAT,
        "base_model": base_fingerprint,
        "model": {"name": str(cfg.model.name), "source": str(cfg.model.source), "dtype": str(cfg.model.dtype)},
        # facts by content, not only id: a user's fact file can change a record and keep its id
        "stream": [[_fact_key(f) for f in dm.task_facts(t)] for t in range(dm.n_tasks)],
        "templates": {n: t.text for n, t in dm.templates.items()},
        "heldout_templates": list(dm.heldout_templates),
        "suites": OmegaConf.to_container(cfg.data.suites, resolve=True) if "suites" in cfg.data else {},
        "suite_items": {name: _items_digest(suite.items) for name, suite in suites.items()},
        "known_facts": [_fact_key(f) for f in getattr(dm, "_known", [])],
        "probe_prompt": dm.probe_prompt,
        "seed": dm.seed,
        "data_source": dm.source,
        "recall_max_new_tokens": dm.recall_max_new_tokens,
        "eval_batch_size": dm.eval_batch_size,
        "generation_batch_size": dm.generation_batch_size,
        **asked,
    }


class BeforeEvalCache:
    def __init__(self, cache_dir: str | Path, key: dict):
        self.key = key
        digest = hashlib.blake2b(json.dumps(key, sort_keys=True, default=str).encode(), digest_size=12).hexdigest()
        self.path = Path(cache_dir) / f"before_{digest}.json"

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        stored = json.loads(self.path.read_text())
        same = json.loads(json.dumps(self.key, sort_keys=True, default=str))
        return stored["point"] if stored.get("key") == same else None

    def save(self, point: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": self.key, "point": point}, default=str))
        os.replace(tmp, self.path)
