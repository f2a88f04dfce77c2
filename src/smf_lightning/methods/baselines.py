"""Baselines under the very same data, loss and evaluation as SMF (Lin et al. 2025, §5):
full finetuning (every weight, AdamW) and LoRA (peft adapters, AdamW)."""

from __future__ import annotations

import torch

from .base import ContinualLM


class FullFinetune(ContinualLM):
    method_name = "full_ft"

    def __init__(self, model, method_cfg: dict):
        for p in model.parameters():
            p.requires_grad_(True)
        super().__init__(model, method_cfg)

    def configure_optimizers(self):
        return torch.optim.AdamW(
            self.trainable_parameters(),
            lr=float(self.mcfg["lr"]),
            betas=tuple(self.mcfg.get("betas", (0.9, 0.999))),
            eps=float(self.mcfg.get("eps", 1e-8)),
            weight_decay=float(self.mcfg.get("weight_decay", 0.0)),
        )


class LoRAFinetune(FullFinetune):
    """Low-rank adapters via ``peft`` (Hu et al. 2021); base weights frozen by peft."""

    method_name = "lora"

    def __init__(self, model, method_cfg: dict):
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=int(method_cfg["r"]),
            lora_alpha=float(method_cfg["alpha"]),
            lora_dropout=float(method_cfg.get("dropout", 0.0)),
            target_modules=list(method_cfg["target_modules"]),
            task_type="CAUSAL_LM",
        )
        wrapped = get_peft_model(model, cfg)
        ContinualLM.__init__(self, wrapped, method_cfg)  # keep peft's requires_grad flags
