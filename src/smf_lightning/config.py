"""Validate a composed Hydra config before anything heavy (model, data) is loaded.

Hydra already rejects unknown group options (``method=foo``); this catches bad values
inside groups, each error naming the key, the value and what is allowed.
"""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

METHODS = ("smf", "full_ft", "lora")
SMF_OPTIMIZERS = ("adam", "sgd")
SOURCES = ("auto", "hub", "offline", "tiny")
MEMORY_MODES = ("additive", "replace")
SUITES_AT = ("every_task", "first_last")  # callbacks.suites_at: when the held-out suites run


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and the allowed values."""


def _need(cond: bool, key: str, value, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"bad config: {key}={value!r}; allowed: {allowed}. Fix it on the command line, e.g. `{key}=...`.")


def validate_config(cfg: DictConfig) -> None:
    from .selection.selectors import SELECTORS

    m = cfg.method
    _need(m.name in METHODS, "method.name", m.name, " | ".join(METHODS) + " (choose with method=NAME)")
    _need(float(m.lr) > 0, "method.lr", m.lr, "a positive number")
    _need(int(m.get("accumulate", 1)) >= 1, "method.accumulate", m.get("accumulate"), "an integer >= 1")
    clip = m.get("grad_clip")
    _need(clip is None or float(clip) > 0, "method.grad_clip", clip, "null or a positive number")
    if m.name == "smf":
        _need(m.selector in SELECTORS, "method.selector", m.selector, " | ".join(SELECTORS))
        if m.selector != "all":
            _need(m.top_t is not None and int(m.top_t) >= 1, "method.top_t", m.top_t, "an integer >= 1 (the slot budget per layer and step)")
        _need(m.optimizer in SMF_OPTIMIZERS, "method.optimizer", m.optimizer, " | ".join(SMF_OPTIMIZERS))
        _need(bool(m.retrofit), "method.retrofit", m.retrofit, "true for smf (SMF trains memory slots)")
        cache = m.get("prefix_cache", 0)
        _need(isinstance(cache, int) and not isinstance(cache, bool) and cache >= 0, "method.prefix_cache", cache,
              "an integer >= 0 (batches whose frozen-prefix states are kept; 0 = off)")
    if m.name == "lora":
        _need(int(m.r) >= 1, "method.r", m.r, "an integer >= 1")

    suites_at = cfg.get("callbacks", {}).get("suites_at", "every_task")
    _need(suites_at in SUITES_AT, "callbacks.suites_at", suites_at, " | ".join(SUITES_AT))

    model = cfg.model
    _need(model.source in SOURCES, "model.source", model.source, " | ".join(SOURCES))
    if m.get("retrofit"):
        mem = model.memory
        root = math.isqrt(int(mem.n_slots)) if int(mem.n_slots) > 0 else 0
        _need(root * root == int(mem.n_slots) and root > 0, "model.memory.n_slots", mem.n_slots, "a perfect square, e.g. 16384 (=128^2)")
        _need(1 <= int(mem.knn) <= root, "model.memory.knn", mem.knn, f"1..sqrt(n_slots)={root}")
        _need(mem.mode in MEMORY_MODES, "model.memory.mode", mem.mode, " | ".join(MEMORY_MODES))
        _need(mem.get("key_init", "random") in ("random", "kmeans"), "model.memory.key_init", mem.get("key_init"), "random | kmeans")
        _need(len(mem.layers) >= 1 and all(int(i) >= 0 for i in mem.layers), "model.memory.layers", OmegaConf.to_container(mem.layers), "a non-empty list of decoder layer indices >= 0")
        if m.name == "smf" and m.selector != "all":
            _need(int(m.top_t) <= int(mem.n_slots), "method.top_t", m.top_t, f"<= model.memory.n_slots={mem.n_slots}")

    d = cfg.data
    for key in ("n_tasks", "facts_per_task", "repeats_per_batch", "train_batch_size", "eval_batch_size"):
        if key in d:
            _need(int(d[key]) >= 1, f"data.{key}", d[key], "an integer >= 1")
    ckpt = cfg.get("ckpt_path")
    if ckpt and not Path(ckpt).is_file():
        raise ConfigError(
            f"bad config: ckpt_path={ckpt!r} does not exist. Pass the checkpoints/last.ckpt of the "
            f"interrupted run (with the same overrides as that run), or drop ckpt_path to start afresh."
        )
    w = cfg.logger.wandb
    _need(w.mode in ("offline", "online", "disabled"), "logger.wandb.mode", w.mode, "offline | online | disabled")
