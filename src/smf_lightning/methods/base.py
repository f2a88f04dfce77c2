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
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning as L
import torch
from torch import nn

from ..errors import ConfigError
from ..errors import need as _need


_CONFIG_CLASSES: list[type] = []  # every MethodConfig subclass defined (their keys are no typo)


def _coerce(value, annotation: str):
    """A number given as text ("3e-4": YAML 1.1 reads an exponent without a dot as a string) or an
    int where a float is declared, as the declared type; anything else unchanged (validate() judges)."""
    if value is None or isinstance(value, bool):
        return value
    try:
        if annotation.startswith("float") and isinstance(value, (int, str)):
            return float(value)
        if annotation.startswith("int") and isinstance(value, str):
            return int(value)
    except ValueError:
        pass
    return value


@dataclass
class MethodConfig:
    """The keys every method reads from ``conf/method/<name>.yaml``, typed and checked.

    A method subclasses this with its own keys (their defaults are the plain method; the YAML
    holds the project's recipe). ``from_mapping`` refuses a key the method does not know, so a
    typo (``method.top_k=...``) stops the run instead of being ignored."""

    name: str
    lr: float
    _target_: str | None = None  # the method's class (conf/method/*.yaml); None: the built-in of this name
    optimizer: str | None = None
    selector: str | None = None  # kept by every method, so summary.json has the same columns for all
    top_t: int | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float | None = None
    accumulate: int = 1
    retrofit: bool = False  # whether the run's model gets memory layers

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _CONFIG_CLASSES.append(cls)

    @classmethod
    def keys(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def is_other_methods_key(cls, key: str) -> bool:
        """Whether ``key`` is not this method's but some other method config's (no typo)."""
        return key not in cls.keys() and any(key in c.keys() for c in _CONFIG_CLASSES)

    @classmethod
    def from_mapping(cls, mapping: Any) -> MethodConfig:
        """The typed config of a ``cfg.method`` (a dict or DictConfig), validated."""
        from omegaconf import DictConfig, OmegaConf

        data = OmegaConf.to_container(mapping, resolve=True) if isinstance(mapping, DictConfig) else dict(mapping)
        known = cls.keys()
        # another method's keys (an experiment written for SMF run with method=lora keeps SMF's
        # settings in cfg.method) are not this method's to read: dropped (config.validate_config says so)
        data = {k: v for k, v in data.items() if k in known or not cls.is_other_methods_key(k)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"bad config: method.{unknown[0]} is not a key of method {data.get('name')!r} "
                              f"({cls.__name__}); its keys: {', '.join(sorted(known - {'_target_'}))}.")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in data]
        if missing:
            raise ConfigError(f"bad config: method.{missing[0]} is missing (method {data.get('name')!r} needs it).")
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        config = cls(**{k: _coerce(v, types[k]) for k, v in data.items()})
        if isinstance(config.betas, list):
            config.betas = tuple(config.betas)
        config.validate()
        return config

    def validate(self) -> None:
        _need(isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool) and self.lr > 0, "method.lr",
              self.lr, "a positive number")
        _need(isinstance(self.accumulate, int) and self.accumulate >= 1, "method.accumulate", self.accumulate,
              "an integer >= 1")
        _need(self.grad_clip is None or float(self.grad_clip) > 0, "method.grad_clip", self.grad_clip,
              "null or a positive number")


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
    """A method: which parameters train and how a step is taken. What the rest of the program
    needs to know about a method is declared here, never inferred from its name:

    - ``Config``: its typed config (``MethodConfig`` subclass);
    - ``needs_background``: it scores slots against background statistics (computed before it is built);
    - ``memory_only``: only memory value rows train, so everything below the lowest memory layer stays
      frozen (the evaluation may keep those layers' states between points) and the run writes slot
      statistics;
    - ``check_run_config(cfg)``: checks of the whole composed config that only this method needs;
    - ``run_label(config)``: the run's short name in loggers and sweep plots.
    """

    method_name = "base"
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    needs_background: ClassVar[bool] = False
    memory_only: ClassVar[bool] = False

    def __init__(self, model: nn.Module, method_cfg: dict, background: dict | None = None, seed: int = 0):
        super().__init__()
        self.model = model
        self.mcfg = dict(method_cfg)
        self.mcfg.setdefault("name", self.method_name)  # a config built in code may leave the class to name itself
        self.config = self.Config.from_mapping(self.mcfg)
        self.automatic_optimization = False
        # Checkpoints hold only trainable weights (2.5 GB of frozen base per task is waste);
        # the frozen rest is rebuilt from the same config on resume, hence non-strict loading.
        self.strict_loading = False
        self.accumulate = self.config.accumulate
        self.updated_params_history: list[int] = []
        self._micro = 0

    @classmethod
    def check_run_config(cls, cfg, config: MethodConfig) -> None:
        """Checks of the composed run config (model, data) this method needs; none by default."""

    @classmethod
    def run_label(cls, config: MethodConfig) -> str:
        return config.name

    @classmethod
    def retrofits(cls, config: MethodConfig) -> bool:
        """Whether the run's model gets memory layers before this method trains it."""
        return bool(config.retrofit)

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
        clip = self.config.grad_clip
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
