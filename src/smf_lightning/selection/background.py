"""Background statistics: how often the memory's slots are read on general text.

docs/design.md §3. Run the retrofitted model over a background corpus (text the model should
keep being good at) and keep, for every memory layer and slot, ``bg_count`` (total reads,
one per token × head × knn) and ``df`` (how many background *batches* read the slot at
least once), plus ``n_bg`` (number of batches). The ``kl`` selector uses ``bg_count``, the
``tfidf`` selector ``df`` and ``n_bg`` (selectors.py).

The statistics are cached on disk keyed by everything that changes them: the model weights
and memory config (:func:`fingerprint_model`, which lives in memory/fingerprint.py and is
re-exported here), the corpus and batch size (the caller's ``key``), and whether only
loss-carrying tokens were counted. A changed key recomputes; an unchanged key loads from
safetensors (never pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..memory.fingerprint import fingerprint_model  # re-exported: selection.background.fingerprint_model
from ..memory.positions import loss_position_mask
from ..memory.retrofit import memory_layers
from .selectors import slot_counts

CACHE_FORMAT = 1  # bump when the cache layout or the meaning of the statistics changes


@dataclass
class BackgroundStats:
    """One memory layer's background statistics (docs/design.md §3)."""

    bg_count: torch.Tensor  # LongTensor[N]: total reads of each slot over the background corpus
    df: torch.Tensor  # LongTensor[N]: number of background batches that read the slot
    n_bg: int  # number of background batches

    @property
    def n_slots(self) -> int:
        return self.bg_count.numel()

    @classmethod
    def empty(cls, n_slots: int) -> BackgroundStats:
        zeros = torch.zeros(n_slots, dtype=torch.long)
        return cls(bg_count=zeros, df=zeros.clone(), n_bg=0)

    def add_batch(self, counts: torch.Tensor) -> None:
        """Fold in one background batch's slot counts (LongTensor[N])."""
        counts = counts.to(self.bg_count.device)
        self.bg_count += counts
        self.df += (counts > 0).long()
        self.n_bg += 1


class _StopAfterLastMemory(Exception):
    """Raised by a forward hook once the last memory layer has run: nothing above it
    changes the statistics, so the remaining decoder layers and the LM head are skipped."""


@torch.no_grad()
def compute_background_stats(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    loss_tokens_only: bool = False,
    progress: bool = True,
    stop_after_last_memory: bool = True,
) -> dict[int, BackgroundStats]:
    """Background statistics per memory layer, keyed by decoder layer index.

    Args:
        model: a retrofitted model (``smf_lightning.memory.retrofit``); run in eval mode
            under ``torch.no_grad`` (its training flag is restored afterwards).
        batches: tokenized batches, dicts with ``input_ids`` and ``attention_mask``
            ([B, T]); padding (attention_mask 0) is never counted. With
            ``loss_tokens_only`` they also need ``labels`` (-100 = no loss) and only
            positions whose output is scored count (:func:`loss_position_mask`).
        progress: show a tqdm bar.
        stop_after_last_memory: skip the decoder layers above the highest memory layer
            and the LM head (they cannot change which slots were read). Same result, less time.
    """
    from tqdm.auto import tqdm

    layers = memory_layers(model)
    if not layers:
        raise ValueError(
            "model has no memory layers; retrofit it first (smf_lightning.memory.retrofit) "
            "before computing background statistics."
        )
    stats = {i: BackgroundStats.empty(mem.n_slots) for i, mem in layers.items()}
    device = next(model.parameters()).device
    hook = None
    if stop_after_last_memory:
        def _stop(module, args, output):
            raise _StopAfterLastMemory

        hook = layers[max(layers)].register_forward_hook(_stop)
    was_training = model.training
    model.eval()
    try:
        total = len(batches) if hasattr(batches, "__len__") else None
        for batch in tqdm(batches, total=total, desc="background stats", unit="batch", disable=not progress):
            if "input_ids" not in batch or "attention_mask" not in batch:
                raise ValueError(
                    f"background batches need 'input_ids' and 'attention_mask'; got keys {sorted(batch)}."
                )
            extra_mask = None
            if loss_tokens_only:
                if "labels" not in batch:
                    raise ValueError(
                        "loss_tokens_only=True needs 'labels' in each background batch (-100 = no loss)."
                    )
                extra_mask = loss_position_mask(batch["labels"]).to(device)
            for mem in layers.values():
                mem.last_access = None
            try:
                # logits_to_keep=1 would also work, but the hook skips the LM head entirely.
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            except _StopAfterLastMemory:
                pass
            for i, mem in layers.items():
                if mem.last_access is None:
                    raise RuntimeError(f"memory layer {i} did not run during the forward pass.")
                ids = mem.last_access.slot_ids(extra_mask)
                stats[i].add_batch(slot_counts(ids, mem.n_slots).cpu())
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
    return stats


def _cache_paths(cache_dir: Path, digest: str) -> tuple[Path, Path]:
    return cache_dir / f"bg_{digest}.safetensors", cache_dir / f"bg_{digest}.json"


def save_background_stats(stats: Mapping[int, BackgroundStats], path: str | Path, metadata: Mapping | None = None) -> None:
    """Write ``stats`` as one safetensors file (``layer{i}.bg_count``, ``layer{i}.df``;
    ``n_bg`` per layer in the header metadata). Atomic: written to a temp file, then renamed."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors, meta = {}, {"format": str(CACHE_FORMAT)}
    for i, s in stats.items():
        tensors[f"layer{i}.bg_count"] = s.bg_count.contiguous().cpu()
        tensors[f"layer{i}.df"] = s.df.contiguous().cpu()
        meta[f"layer{i}.n_bg"] = str(int(s.n_bg))
    if metadata:
        meta["key"] = json.dumps(metadata, sort_keys=True, default=str)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_background_stats(path: str | Path) -> dict[int, BackgroundStats]:
    """Read a file written by :func:`save_background_stats`."""
    from safetensors import safe_open

    out: dict[int, BackgroundStats] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        layers = sorted({int(k.split(".")[0][len("layer"):]) for k in f.keys()})
        for i in layers:
            out[i] = BackgroundStats(
                bg_count=f.get_tensor(f"layer{i}.bg_count"),
                df=f.get_tensor(f"layer{i}.df"),
                n_bg=int(meta[f"layer{i}.n_bg"]),
            )
    return out


def background_cache_key(model: nn.Module, key: Mapping, *, loss_tokens_only: bool) -> dict:
    """The full cache key: the caller's ``key`` plus what this module knows changes the stats."""
    return {
        "format": CACHE_FORMAT,
        "model_fingerprint": fingerprint_model(model),
        "loss_tokens_only": bool(loss_tokens_only),
        "user": dict(key),
    }


def load_or_compute_background_stats(
    model: nn.Module,
    batches_fn: Callable[[], Iterable[Mapping[str, torch.Tensor]]],
    cache_dir: str | Path,
    key: Mapping,
    *,
    loss_tokens_only: bool = False,
    progress: bool = True,
) -> dict[int, BackgroundStats]:
    """Background statistics from ``cache_dir`` if cached under the same key, else computed.

    ``key`` (JSON-serialisable) must name everything about the *corpus* that changes the
    statistics: e.g. ``{"corpus": "lambada", "corpus_fingerprint": <hash of the token ids
    or of name+split+n_docs+max_len>, "batch_size": 8}`` (``df`` counts batches, so the
    batch size matters). The model weights and memory config (incl. seed) are added
    automatically via :func:`fingerprint_model`, and so is ``loss_tokens_only``.
    ``batches_fn`` is only called on a cache miss, so tokenizing the corpus is skipped on
    a hit. Files: ``bg_<hash>.safetensors`` (statistics) and ``bg_<hash>.json`` (the key).
    """
    cache_dir = Path(cache_dir)
    full_key = background_cache_key(model, key, loss_tokens_only=loss_tokens_only)
    try:
        key_json = json.dumps(full_key, sort_keys=True)
    except TypeError as err:
        raise ValueError(f"background cache key must be JSON-serialisable: {err}. Key: {key!r}") from err
    digest = hashlib.blake2b(key_json.encode(), digest_size=12).hexdigest()
    st_path, json_path = _cache_paths(cache_dir, digest)
    if st_path.is_file() and json_path.is_file():
        if json.loads(json_path.read_text()) == json.loads(key_json):
            return load_background_stats(st_path)
    stats = compute_background_stats(model, batches_fn(), loss_tokens_only=loss_tokens_only, progress=progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_background_stats(stats, st_path, metadata=full_key)
    tmp = json_path.with_name(json_path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(full_key, indent=2, sort_keys=True))
    os.replace(tmp, json_path)
    return stats
