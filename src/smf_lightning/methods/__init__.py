"""Continual-learning methods as LightningModules: SMF and the baselines it is compared with."""

from .base import ContinualLM
from .baselines import FullFinetune, LoRAFinetune
from .smf import SparseMemoryFinetune


def build_method(method_cfg: dict, model, background=None, seed: int = 0) -> ContinualLM:
    name = method_cfg["name"]
    if name == "smf":
        return SparseMemoryFinetune(model, method_cfg, background=background, seed=seed)
    if name == "full_ft":
        return FullFinetune(model, method_cfg)
    if name == "lora":
        return LoRAFinetune(model, method_cfg)
    raise ValueError(f"unknown method {name!r}; allowed: smf | full_ft | lora")


__all__ = ["ContinualLM", "FullFinetune", "LoRAFinetune", "SparseMemoryFinetune", "build_method"]
