"""Whitening the memory input: the addressing lever of DOTS and of the 7B retrofit it cites.

The residual stream of a pretrained LM has a few outlier dimensions with values orders of
magnitude above the rest. A fixed random query projection ``W_q x`` is then dominated by
those dimensions: the queries of different entities point the same way (cosine ≈ 1 was
measured on Qwen2.5-7B) and read the same few *hub* slots, so facts collide there and
general text reads the slots a fact was written into. Whitening, ``(x - mean) / std`` per
dimension with the statistics of the background corpus, gives every dimension unit scale
before the projection, so queries spread over the slots by what the token means, not by
the outliers. ``input_norm="center"`` subtracts the mean only. ``input_norm="zca"`` whitens
fully, ``Z (x - mean)`` with ``Z = C^-1/2`` of the background covariance: diagonal whitening
leaves a direction shared by many tokens (at an answer position: the template, "Answer:")
as loud as it was, so every question's answer position still read the same hub slots
(measured on Qwen2.5-0.5B, layer 15: 76-88% of the first answer token's reads on the 10%
hub slots with diagonal whitening, 12% with ZCA from the answer positions).
``input_norm="zca_within"`` goes one step further, against the *template*: ZCA leaves the
directions in which one question's templates differ as loud as those in which questions
differ, so a fact's answer positions under different templates read nearly disjoint slots
(each template needs its own rows; a new template reads rows nobody wrote). It whitens with
``W + alpha C`` instead of ``C``, ``W`` the pooled covariance of background questions'
deviations from their own mean over the training templates (the within-class covariance of
LDA; ``alpha``: ``within_alpha``), which damps the template directions (experiments/recipe/RECIPE.md,
``experiments/tools/diag_addressing.py``: same-fact read overlap 0.11 -> 0.33, held-out template's
reads on rows a training template read 0.40 -> 0.65, at alpha 0.003).

The statistics are fitted once per (model, memory config, corpus) on the real tokens of
the background batches, lowest memory layer first (a lower layer's output can change what
a higher one sees), stored in the layer's ``in_mean`` / ``in_std`` buffers — so they are
saved with the retrofitted model — and cached on disk like the background statistics.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from .fingerprint import fingerprint_model
from .positions import loss_position_mask
from .retrofit import memory_layers

STD_FLOOR = 1e-6  # a dimension constant over the corpus is centred, not divided by ~0
# ZCA: eigenvalues below this share of the largest are raised to it, so directions the corpus
# (a few thousand answer positions for ~900 dimensions) barely spans are not blown up by noise.
ZCA_EIG_FLOOR = 1e-5
CACHE_FORMAT = 2  # 2: whiten_on=loss statistics from an unmasked forward (format 1 masked attention to the loss positions)


class _Stop(Exception):
    pass


def _statistics(mem) -> dict[str, torch.Tensor]:
    """A memory layer's fitted-statistics buffers by cache name (``whiten`` only with input_norm=zca)."""
    stats = {"mean": mem.in_mean, "std": mem.in_std}
    if hasattr(mem, "in_whiten"):
        stats["whiten"] = mem.in_whiten
    return stats


def inverse_sqrt(cov: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(C^-1/2 with eigenvalues floored at ZCA_EIG_FLOOR of the largest, how many were floored)."""
    evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)
    floor = float(evals.max()) * ZCA_EIG_FLOOR
    return (evecs * evals.clamp_min(floor).rsqrt()) @ evecs.T, int((evals < floor).sum())


def _within_question(x: torch.Tensor, keep: torch.Tensor, acc: dict) -> torch.Tensor:
    """input_norm=zca_within: the rows of one group are one question under different templates.
    Align their kept (answer) positions by index (the first n, n the shortest row's count), add
    the deviations from the group's mean per position to the pooled within-question scatter
    ``acc["dd"]`` (``acc["nd"]`` its degrees of freedom, sum of n * (rows - 1)) and return the
    aligned positions, the samples of the mean and the total covariance."""
    groups = acc["groups"].tolist()
    aligned = []
    for g in dict.fromkeys(groups):
        rows = [x[b][keep[b]] for b, gb in enumerate(groups) if gb == g]
        n = min(r.shape[0] for r in rows)
        if n == 0:
            continue
        stack = torch.stack([r[:n] for r in rows])  # [templates, n, d]
        dev = (stack - stack.mean(0, keepdim=True)).reshape(-1, x.shape[-1])
        acc["dd"] = dev.T @ dev if acc["dd"] is None else acc["dd"] + dev.T @ dev
        acc["nd"] += n * (len(rows) - 1)
        aligned.append(stack.reshape(-1, x.shape[-1]))
    return torch.cat(aligned) if aligned else x.new_zeros(0, x.shape[-1])


@torch.no_grad()
def fit_input_whitening(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *,
                        loss_tokens_only: bool = False, progress: bool = False) -> dict[int, dict]:
    """Set every memory layer's ``in_mean`` / ``in_std`` from the real tokens of ``batches``
    (each memory layer's input, i.e. the normalised MLP input of its decoder layer); with
    ``loss_tokens_only``, from the positions whose output carries loss only (``labels``), the
    positions SMF selects slots for: in QA text those are the answer positions, whose common
    template component then no longer decides which slots they read. Layers with
    ``input_norm="zca_within"`` need batches with ``groups`` (one id per row; a group's rows are
    one question under different templates) and fit mean, std, the total and the
    within-question covariance on the group-aligned positions. Returns per layer the token
    count and the largest std / median std ratio (how strong the outliers were)."""
    from tqdm.auto import tqdm

    batches = list(batches)
    mems = memory_layers(model)
    device = next(model.parameters()).device
    info: dict[int, dict] = {}
    was_training = model.training
    model.eval()
    try:
        for idx, mem in mems.items():  # lowest first
            within = mem.cfg.input_norm == "zca_within"
            zca = mem.cfg.input_norm == "zca" or within
            acc = {"s": None, "ss": None, "xx": None, "n": 0, "keep": None, "groups": None, "dd": None, "nd": 0}

            def grab(module, args):
                x = args[0].double()
                m = acc["keep"][:, -x.shape[1]:].bool()
                if within:
                    x = _within_question(x, m, acc)
                else:
                    x = x[m]
                acc["s"] = x.sum(0) if acc["s"] is None else acc["s"] + x.sum(0)
                acc["ss"] = (x * x).sum(0) if acc["ss"] is None else acc["ss"] + (x * x).sum(0)
                if zca:
                    acc["xx"] = x.T @ x if acc["xx"] is None else acc["xx"] + x.T @ x
                acc["n"] += x.shape[0]
                raise _Stop

            hook = mem.register_forward_pre_hook(grab)
            try:
                for batch in tqdm(batches, desc=f"whitening stats (layer {idx})", unit="batch", disable=not progress):
                    attention = batch["attention_mask"].to(device)
                    # the positions whose statistics count; the forward itself always sees every real token
                    acc["keep"] = attention.bool()
                    acc["groups"] = batch.get("groups")
                    if within and acc["groups"] is None:
                        raise ValueError("memory.input_norm=zca_within needs batches of background questions under "
                                         "every training template, with their 'groups' (FactStreamDataModule."
                                         "template_group_batches).")
                    if loss_tokens_only:
                        acc["keep"] = acc["keep"] & loss_position_mask(batch["labels"]).to(device)
                    try:
                        model(input_ids=batch["input_ids"].to(device), attention_mask=attention)
                    except _Stop:
                        pass
            finally:
                hook.remove()
            if acc["n"] < 2:
                raise ValueError("whitening needs background tokens; the background corpus is empty.")
            mean = acc["s"] / acc["n"]
            var = (acc["ss"] / acc["n"] - mean * mean).clamp_min(0)
            std = var.sqrt().clamp_min(STD_FLOOR)
            mem.in_mean.copy_(mean.to(mem.in_mean.dtype))
            mem.in_std.copy_(std.to(mem.in_std.dtype))
            info[idx] = {"tokens": int(acc["n"]), "max_over_median_std": float(std.max() / std.median())}
            if zca:
                cov = acc["xx"] / acc["n"] - torch.outer(mean, mean)
                if within:
                    if acc["nd"] < 1:
                        raise ValueError("memory.input_norm=zca_within needs questions under at least two templates.")
                    within_cov = acc["dd"] / acc["nd"]
                    info[idx]["within_over_total_variance"] = float(within_cov.trace() / cov.trace())
                    cov = within_cov + float(mem.cfg.within_alpha) * cov
                z, floored = inverse_sqrt(cov)
                mem.in_whiten.copy_(z.to(mem.in_whiten.dtype))
                info[idx]["eigenvalues_floored"] = floored
    finally:
        model.train(was_training)
    return info


@torch.no_grad()
def load_or_fit_input_whitening(model: nn.Module, batches_fn: Callable[[], Iterable], cache_dir: str | Path,
                                key: Mapping, *, loss_tokens_only: bool = False, progress: bool = False) -> dict[int, dict]:
    """:func:`fit_input_whitening`, cached under ``cache_dir`` by the model fingerprint (taken
    before fitting) and the corpus ``key``. A no-op for layers with ``input_norm="none"``."""
    from safetensors.torch import load_file, save_file

    mems = memory_layers(model)
    if all(m.cfg.input_norm == "none" for m in mems.values()):
        return {}
    for mem in mems.values():  # the key is the model without statistics: reset to identity first
        identity = {"mean": torch.zeros_like(mem.in_mean), "std": torch.ones_like(mem.in_std)}
        for name, buf in _statistics(mem).items():
            buf.copy_(identity.get(name, torch.eye(buf.shape[0])))
    full_key = {"format": CACHE_FORMAT, "model": fingerprint_model(model), "corpus": dict(key),
                "loss_tokens_only": bool(loss_tokens_only),
                "input_norm": {str(i): m.cfg.input_norm for i, m in mems.items()}}
    within = {str(i): float(m.cfg.within_alpha) for i, m in mems.items() if m.cfg.input_norm == "zca_within"}
    if within:  # only then: the keys (and cached files) of the other modes stay as they were
        full_key["within_alpha"] = within
    digest = hashlib.blake2b(json.dumps(full_key, sort_keys=True, default=str).encode(), digest_size=12).hexdigest()
    cache_dir = Path(cache_dir)
    st, js = cache_dir / f"white_{digest}.safetensors", cache_dir / f"white_{digest}.json"
    if st.is_file() and js.is_file():
        tensors = load_file(str(st))
        for idx, mem in mems.items():
            for name, buf in _statistics(mem).items():
                buf.copy_(tensors[f"layer{idx}.{name}"])
        return json.loads(js.read_text())["info"]
    info = fit_input_whitening(model, batches_fn(), loss_tokens_only=loss_tokens_only, progress=progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"layer{idx}.{name}": buf.detach().cpu().contiguous()
               for idx, mem in mems.items() for name, buf in _statistics(mem).items()}
    tmp = st.with_name(st.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp))
    os.replace(tmp, st)
    tmp = js.with_name(js.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"key": full_key, "info": {str(k): v for k, v in info.items()}}, indent=2, default=str))
    os.replace(tmp, js)
    return {str(k): v for k, v in info.items()}
