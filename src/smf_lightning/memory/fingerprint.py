"""The model fingerprint: a cheap hash of everything that decides which memory slots a forward reads.

It keys the on-disk caches of what is fitted or counted on a background corpus: the input
whitening statistics (memory/whitening.py) and the background slot statistics
(selection/background.py). It lives with the memory layers because it reads nothing but the
model and its memory layers, so both may import it (selection imports memory, never the
reverse). **What is hashed must not change**: every cached file is keyed by these digests.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from .retrofit import memory_layers


def tensor_digest(h, t: torch.Tensor) -> None:
    """Feed ``t`` (dtype, shape and every byte) into the hashlib object ``h``."""
    t = t.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        # reinterpret as bytes (bf16 has no numpy dtype); hashed without a copy
        h.update(t.reshape(-1).view(torch.uint8).numpy())


def fingerprint_model(model: nn.Module, base_samples_per_tensor: int = 64) -> str:
    """A cheap hex fingerprint of what decides which memory slots a forward reads.

    Covers: the model class and HF config; the memory config (incl. its seed) and the
    decoder layer indices of the memory layers; **every byte** of every memory-layer
    parameter and buffer (query, keys, gate, out, values, input statistics — values matter because earlier memory
    layers' outputs feed later ones, and sparse training changes only a few rows, which a
    sample would miss); and, for every other parameter and buffer, its name, dtype, shape
    and ``base_samples_per_tensor`` evenly strided elements. Base weights are frozen under
    SMF, so the sample distinguishes different checkpoints without reading ~2 GB; an
    edit to a few base weights that the sample misses is *not* detected. Cost: hashing
    the memory layers, ~0.2 s for the seed paper's 3 layers of 16,384 × 896 (about 4 s for
    one N = 1M × 1024 layer).
    """
    h = hashlib.sha256()  # hardware-accelerated on x86/ARM: ~1 GB/s, ~0.2 s for 3 layers of N=16,384 x 896
    h.update(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string(use_diff=False).encode())
    mems = memory_layers(model)
    # A read gate without write keys is the identity (memory/layer.py): such a model reads and
    # computes exactly what the ungated one does, so it gets the same fingerprint (and its caches).
    keyed = any(m.written_rows().numel() > 0 for m in mems.values() if hasattr(m, "write_mass"))
    mem_cfg = getattr(model, "memory_config", None)
    if mem_cfg is not None:
        cfg_dict = mem_cfg.to_dict() if hasattr(mem_cfg, "to_dict") else None
        if cfg_dict is not None:
            if not keyed:
                cfg_dict.pop("read_gate", None)
            if not keyed or cfg_dict.get("serve_gate") is None:
                # no keys: no gate to serve; unset: it is read_gate (fingerprints from before the key stay)
                cfg_dict.pop("serve_gate", None)
        h.update(json.dumps(cfg_dict if cfg_dict is not None else repr(mem_cfg), sort_keys=True).encode())
    memory_param_ids = set()
    for idx, mem in mems.items():
        h.update(f"memory layer {idx}".encode())
        # parameters and buffers (the input whitening statistics decide the addressing too)
        for name, p in [*mem.named_parameters(), *mem.named_buffers()]:
            memory_param_ids.add(id(p))
            if not keyed and name in ("write_keys", "write_mass"):
                continue
            h.update(name.encode())
            tensor_digest(h, p)
    named = [(n, t) for n, t in model.named_parameters() if id(t) not in memory_param_ids]
    named += [(n, t) for n, t in model.named_buffers() if id(t) not in memory_param_ids]
    for name, t in named:
        h.update(name.encode())
        flat = t.detach().reshape(-1)
        stride = max(1, flat.numel() // base_samples_per_tensor)
        tensor_digest(h, flat[::stride][:base_samples_per_tensor].clone() if flat.numel() else flat)
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    return h.hexdigest()
