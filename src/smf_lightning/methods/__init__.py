"""Continual-learning methods as LightningModules: SMF and the baselines it is compared with.

A method is a ``ContinualLM`` subclass named by ``_target_`` in ``conf/method/<name>.yaml``,
with a typed ``Config`` and the declarations the rest of the program reads (methods/base.py).
docs/extending.md shows how to add one."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError, target_class
from .base import ContinualLM, MethodConfig
from .baselines import FullFinetune, LoRAFinetune
from .smf import SparseMemoryFinetune

# The built-in methods by name: a method config without ``_target_`` (one saved by an older run,
# or a dict built in code) names one of these.
BUILTIN = {cls.method_name: cls for cls in (SparseMemoryFinetune, FullFinetune, LoRAFinetune)}


def method_class(method_cfg: Any) -> type[ContinualLM]:
    """The class of a method config (dict or DictConfig): its ``_target_``, else the built-in of its ``name``."""
    target = method_cfg.get("_target_")
    if target:
        return target_class("method", str(target), ContinualLM, prefix="bad config: ")
    name = method_cfg.get("name")
    if name not in BUILTIN:
        raise ConfigError(f"bad config: method.name={name!r} names no built-in method ({' | '.join(BUILTIN)}; choose "
                          f"with method=NAME) and method._target_ is not set (a ContinualLM class of your own).")
    return BUILTIN[name]


def method_config(method_cfg: Any) -> MethodConfig:
    """The typed, validated config of a method config (dict or DictConfig)."""
    return method_class(method_cfg).Config.from_mapping(method_cfg)


def build_method(method_cfg: dict, model, background=None, seed: int = 0) -> ContinualLM:
    """The method's LightningModule; ``background``: the slot statistics of a method that
    ``needs_background`` (None for the others), ``seed``: the run's seed."""
    return method_class(method_cfg)(model, method_cfg, background=background, seed=seed)


__all__ = ["BUILTIN", "ContinualLM", "FullFinetune", "LoRAFinetune", "MethodConfig", "SparseMemoryFinetune",
           "build_method", "method_class", "method_config"]
