"""Baselines under the very same data, loss and evaluation as SMF (Lin et al. 2025, §5):
full finetuning (every weight, AdamW) and LoRA (peft adapters, AdamW)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import ContinualLM, MethodConfig, _need


class FullFinetune(ContinualLM):
    method_name = "full_ft"

    def __init__(self, model, method_cfg: dict, background: dict | None = None, seed: int = 0):
        for p in model.parameters():
            p.requires_grad_(True)
        super().__init__(model, method_cfg)

    def configure_optimizers(self):
        return torch.optim.AdamW(
            self.trainable_parameters(),
            lr=self.config.lr,
            betas=tuple(self.config.betas),
            eps=self.config.eps,
            weight_decay=self.config.weight_decay,
        )


@dataclass
class LoRAConfig(MethodConfig):
    r: int = 16  # adapter rank
    alpha: float = 32.0  # scaling = alpha / r
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def validate(self) -> None:
        super().validate()
        _need(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r >= 1, "method.r", self.r,
              "an integer >= 1")
        _need(0.0 <= self.dropout < 1.0, "method.dropout", self.dropout, "a probability in [0, 1)")
        _need(len(self.target_modules) >= 1, "method.target_modules", self.target_modules,
              "a non-empty list of module names (e.g. [q_proj, v_proj])")


class LoRAFinetune(FullFinetune):
    """Low-rank adapters via ``peft`` (Hu et al. 2021); base weights frozen by peft."""

    method_name = "lora"
    Config = LoRAConfig

    def __init__(self, model, method_cfg: dict, background: dict | None = None, seed: int = 0):
        from peft import LoraConfig, get_peft_model

        ContinualLM.__init__(self, model, method_cfg)  # not FullFinetune's: peft sets requires_grad
        c = self.config
        self.model = get_peft_model(model, LoraConfig(r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout,
                                                      target_modules=list(c.target_modules), task_type="CAUSAL_LM"))
