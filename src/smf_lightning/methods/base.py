"""The LightningModule every method shares: forward, loss, manual optimisation, checkpoints.

Methods differ only in which parameters train and how the optimizer step is taken
(``smf.py``: selected memory rows; ``baselines.py``: full finetuning, LoRA). Everything
else — data, loss, evaluation, logging — is the same code, so comparisons are fair.

Optimisation is manual (``automatic_optimization = False``) because SMF must pick its slot
selection *between* backward and step, from the slots the forward pass read; baselines use
the same path so gradient accumulation and clipping mean the same for all methods.
"""

from __future__ import annotations

import contextlib

import lightning as L
import torch
from torch import nn


def next_token_nll(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """(sum of next-token NLL over tokens whose label is not -100, their number): the one
    causal-LM loss of every method and of healing; padding and prompt tokens carry -100.

    Only the columns that predict a labelled token go through the LM head (`logits_to_keep`):
    with answer-only loss that is a few columns of each sequence, and Qwen2.5's 151,936-word
    head is a quarter of the model's forward FLOPs. Models whose forward lacks
    `logits_to_keep` get full logits, sliced after the fact (same loss)."""
    device = next(model.parameters()).device
    labels = batch["labels"][:, 1:].to(device)  # column j's logits predict token j + 1
    keep = (labels != -100).any(0).nonzero().squeeze(1)  # columns some row needs, ascending
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    try:
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
    except TypeError:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, keep]
    targets = labels[:, keep]
    nll = nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return nll, int((targets != -100).sum())


class ContinualLM(L.LightningModule):
    method_name = "base"

    def __init__(self, model: nn.Module, method_cfg: dict):
        super().__init__()
        self.model = model
        self.mcfg = dict(method_cfg)
        self.automatic_optimization = False
        # Checkpoints hold only trainable weights (2.5 GB of frozen base per task is waste);
        # the frozen rest is rebuilt from the same config on resume, hence non-strict loading.
        self.strict_loading = False
        self.accumulate = int(self.mcfg.get("accumulate", 1) or 1)
        self.updated_params_history: list[int] = []
        self._micro = 0

    # ---- parameters -------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def trainable_param_count(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    # ---- forward / loss ---------------------------------------------------------------
    def forward(self, **batch):
        return self.model(**batch)

    def lm_loss(self, batch: dict) -> torch.Tensor:
        nll, n_tokens = next_token_nll(self.model, batch)
        return nll / max(n_tokens, 1)

    def training_step(self, batch: dict, batch_idx: int):
        opt = self.optimizers()
        if self._micro == 0:
            opt.zero_grad(set_to_none=True)
            self.on_accumulation_start()
        loss = self.lm_loss(batch)
        with self.backward_sync():
            self.manual_backward(loss / self.accumulate)
        self.after_backward(batch)
        self._micro += 1
        if self._micro == self.accumulate:
            self._micro = 0
            updated = self.take_optimizer_step(opt)
            self.updated_params_history.append(int(updated))
            self.log("train/updated_params", float(updated), on_step=True, prog_bar=False)
        self.log("train/loss", loss.detach(), on_step=True, prog_bar=True)
        return loss.detach()

    # hooks for subclasses
    def backward_sync(self):
        """Context of the backward: DDP's gradient all-reduce runs as usual (baselines). SMF blocks it
        and reduces only its selected rows itself (selection/distributed.py)."""
        return contextlib.nullcontext()

    def on_accumulation_start(self) -> None:
        pass

    def after_backward(self, batch: dict) -> None:
        pass

    def summary_extras(self) -> dict:
        """What this method adds to summary.json (SMF: the memory's capacity); none by default."""
        return {}

    def take_optimizer_step(self, opt) -> int:
        """Clip, step; return how many parameters this step may have changed."""
        clip = self.mcfg.get("grad_clip")
        if clip:
            torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), float(clip))
        opt.step()
        return self.trainable_param_count()

    # ---- checkpoints: trainable weights only ------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["updated_params_history"] = list(self.updated_params_history)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.updated_params_history = list(checkpoint.get("updated_params_history", []))
