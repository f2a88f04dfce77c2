"""Healing's training loop: dense AdamW over the memory layers' parameters, everything else
frozen, held-out perplexity every ``eval_every`` steps, until a target perplexity or the step
budget (stages/heal.py runs it).

Value gradients are dense during healing: the design's sparse EmbeddingBag gradient exists
for SMF (few rows per step); healing updates every row a batch reads with AdamW, which has
no sparse-gradient support, and a dense N x v_dim gradient (59 MB for 16,384 x 896) is
cheap next to the LM head's logits. The layer's ``sparse`` flag is restored afterwards.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..memory import memory_layers
from ..methods.base import next_token_nll

MEMORY_PARAM_KINDS = ("query", "keys", "values", "gate", "out")  # every parameter of a memory layer


def _memory_param(memory, kind: str) -> nn.Parameter:
    obj = getattr(memory, kind)
    return obj.weight if isinstance(obj, nn.Module) else obj


def memory_parameters(model: nn.Module, kinds: Sequence[str] = MEMORY_PARAM_KINDS) -> list[nn.Parameter]:
    """The memory layers' parameters of the given kinds (default: all of query, keys, values, gate, out)."""
    unknown = [k for k in kinds if k not in MEMORY_PARAM_KINDS]
    if unknown or not kinds:
        raise ValueError(f"memory parameter kinds {list(kinds)}: choose a non-empty subset of {list(MEMORY_PARAM_KINDS)}.")
    params, seen = [], set()
    for mem in memory_layers(model).values():
        for kind in kinds:
            if getattr(mem, kind) is None:  # output="direct" has no gate / out projections
                continue
            p = _memory_param(mem, kind)
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def freeze_all_but_memory(model: nn.Module, kinds: Sequence[str] = MEMORY_PARAM_KINDS) -> list[nn.Parameter]:
    """requires_grad only on memory parameters of ``kinds`` (healing: all of them); returns those."""
    if not memory_layers(model):
        raise ValueError("the model has no memory layers to heal; retrofit it first (model.memory, method.retrofit=true).")
    params = memory_parameters(model, kinds)
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return params


@contextlib.contextmanager
def dense_value_grads(model: nn.Module):
    """Dense value-table gradients inside the block (AdamW cannot take sparse ones)."""
    mems = list(memory_layers(model).values())
    before = [m.values.sparse for m in mems]
    for m in mems:
        m.values.sparse = False
    try:
        yield
    finally:
        for m, sparse in zip(mems, before):
            m.values.sparse = sparse


lm_loss = next_token_nll  # (NLL sum, target tokens): the same loss the continual methods train


@torch.no_grad()
def perplexity(model: nn.Module, batches: Sequence[dict]) -> float:
    """Token-level perplexity exp(Σ NLL / Σ tokens) over ``batches`` (eval mode, restored after)."""
    was_training = model.training
    model.eval()
    try:
        total, n = 0.0, 0
        for batch in batches:
            nll, count = lm_loss(model, batch)
            total += float(nll)
            n += count
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("no target tokens in the held-out batches; every document was shorter than 2 tokens.")
    return math.exp(total / n)


@dataclass
class HealingResult:
    steps: int  # optimizer steps taken
    before_ppl: float  # held-out perplexity of the retrofitted model before healing
    final_ppl: float  # ... after the last step
    reached_target: bool  # stopped because held-out ppl <= target_ppl
    seconds: float  # training time (evaluations included)
    history: list[dict] = field(default_factory=list)  # {step, train_loss, heldout_ppl (None between evaluations)}


def heal_memory(
    model: nn.Module,
    train_batches: Iterator[dict],
    heldout_batches: Sequence[dict],
    *,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    grad_clip: float | None,
    max_steps: int,
    eval_every: int,
    target_ppl: float | None,
    trainable: Sequence[str] = MEMORY_PARAM_KINDS,
    progress: bool = True,
) -> HealingResult:
    """Train all memory parameters (everything else frozen) with AdamW on ``train_batches``.

    Evaluates held-out perplexity before the first step, every ``eval_every`` steps and after
    the last; stops early once it is ``<= target_ppl`` (``None``: run all ``max_steps``).
    Only memory parameters of the ``trainable`` kinds can change (default: all five; a subset
    is an ablation, e.g. without ``keys`` and ``query`` the routing of tokens to slots stays
    fixed): the others have ``requires_grad=False`` and are not given to the optimizer
    (tested bit for bit).
    """
    from tqdm.auto import tqdm

    if max_steps < 0 or eval_every < 1:
        raise ValueError(f"need max_steps >= 0 and eval_every >= 1; got {max_steps}, {eval_every}.")
    params = freeze_all_but_memory(model, trainable)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    start = time.perf_counter()
    ppl = perplexity(model, heldout_batches)
    before = ppl
    history = [{"step": 0, "train_loss": None, "heldout_ppl": ppl}]
    reached = target_ppl is not None and ppl <= target_ppl
    step = 0
    bar = tqdm(total=max_steps, desc="healing", unit="step", disable=not progress)
    model.train()
    with dense_value_grads(model):
        while step < max_steps and not reached:
            batch = next(train_batches)
            optimizer.zero_grad(set_to_none=True)
            nll, count = lm_loss(model, batch)
            loss = nll / max(count, 1)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            step += 1
            row = {"step": step, "train_loss": float(loss.detach()), "heldout_ppl": None}
            if step % eval_every == 0 or step == max_steps:
                ppl = perplexity(model, heldout_batches)
                row["heldout_ppl"] = ppl
                reached = target_ppl is not None and ppl <= target_ppl
            history.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", heldout_ppl=f"{ppl:.2f}")
    bar.close()
    model.eval()
    return HealingResult(steps=step, before_ppl=before, final_ppl=ppl, reached_target=reached,
                         seconds=time.perf_counter() - start, history=history)
