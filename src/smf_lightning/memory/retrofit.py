"""Retrofit a Hugging Face causal LM with product-key memory layers.

Each chosen decoder layer's ``mlp`` is wrapped in :class:`MemoryMLP`:
``additive`` returns ``mlp(x) + memory(x)`` (values start at zero, so the model is the
base model at step 0 and needs no healing), ``replace`` returns ``memory(x)`` alone (Lin
et al. 2025, the seed paper; needs a healing stage first). A forward pre-hook on the
model hands the call's ``attention_mask`` to every memory layer, so the slots read by
padding tokens never reach statistics or slot selection.

A retrofitted model is saved as ``model.safetensors`` (all weights, safetensors only: no
pickle is ever loaded) plus ``retrofit.json`` (the memory config and where the base came
from) plus the base ``config.json`` and tokenizer files when given.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .layer import MemoryConfig, ProductKeyMemory

RETROFIT_FILE = "retrofit.json"
WEIGHTS_FILE = "model.safetensors"


class MemoryMLP(nn.Module):
    """Stands where a decoder layer's ``mlp`` stood: base MLP plus (or instead of) memory."""

    def __init__(self, mlp: nn.Module, memory: ProductKeyMemory, mode: str):
        super().__init__()
        # replace mode keeps the base MLP out of the module tree entirely, so its
        # weights are neither trained nor saved nor counted.
        self.mlp = mlp if mode == "additive" else None
        self.memory = memory
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.memory(x)
        return out if self.mlp is None else self.mlp(x) + out


# The architectures tests/test_architectures.py retrofits and trains an SMF step on (tiny random
# models of each: models/tiny.py TINY_ARCHITECTURES); the errors below name them.
TESTED_ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM",
                        "Gemma2ForCausalLM", "Phi3ForCausalLM", "GPT2LMHeadModel")
SUPPORTED = ("Hugging Face causal LMs whose decoder layers each have an `mlp` submodule (tested: "
             + ", ".join(TESTED_ARCHITECTURES) + "; SmolLM2 is a Llama)")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of an HF causal LM: the first non-empty ``nn.ModuleList`` whose
    modules all have an ``.mlp`` (Qwen2, Llama, Mistral, Qwen3, Gemma2, Phi3, GPT-2, ...)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(hasattr(m, "mlp") for m in module):
            return module
    raise ValueError(
        f"{type(model).__name__} has no list of decoder layers with an `mlp` submodule, so memory "
        f"layers cannot be retrofitted. Supported: {SUPPORTED}."
    )


def retrofit(model: nn.Module, cfg: MemoryConfig) -> nn.Module:
    """Add memory layers to ``model`` in place (and return it). Base weights are untouched."""
    layers = decoder_layers(model)
    cfg.validate(n_layers=len(layers))
    cfg = cfg.resolved(len(layers))  # fractions of the depth as layer indices: what the model records
    if memory_layers(model):
        raise ValueError("model is already retrofitted with memory layers; retrofit a fresh base model.")
    hidden = model.config.hidden_size
    ref = next(model.parameters())
    for i in cfg.layers:
        memory = ProductKeyMemory(hidden, cfg, layer_idx=i).to(device=ref.device, dtype=ref.dtype)
        # The value table stays float32 in a 16-bit model: it is what SMF trains, and a bf16 row
        # (8-bit mantissa) would swallow small updates (memory/layer.py: precision).
        memory.values.float()
        layers[i].mlp = MemoryMLP(layers[i].mlp, memory, cfg.mode)
    model.memory_config = cfg
    model.register_forward_pre_hook(_share_attention_mask, with_kwargs=True)
    return model


def _share_attention_mask(model, args, kwargs):
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        mask = None  # 4-D custom masks carry no plain padding information
    for mem in memory_layers(model).values():
        mem.token_mask = mask
    return None


def memory_layers(model: nn.Module) -> dict[int, ProductKeyMemory]:
    """Memory layers keyed by decoder layer index (empty for a base model)."""
    mems = {m.layer_idx: m for m in model.modules() if isinstance(m, ProductKeyMemory)}
    return dict(sorted(mems.items()))


def memory_value_params(model: nn.Module) -> dict[int, nn.Parameter]:
    """The value tables (N × v_dim), the only parameters SMF trains."""
    return {i: m.values.weight for i, m in memory_layers(model).items()}


def freeze_all_but_values(model: nn.Module) -> None:
    """requires_grad only on memory value tables (SMF); everything else frozen."""
    values = {id(p) for p in memory_value_params(model).values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in values)


def param_counts(model: nn.Module) -> dict[str, int]:
    """base = non-memory parameters, memory = all memory parameters, values = value tables."""
    seen: set[int] = set()

    def count(params) -> int:
        n = 0
        for p in params:
            if id(p) not in seen:  # tied weights count once
                seen.add(id(p))
                n += p.numel()
        return n

    mems = memory_layers(model).values()
    values = count(m.values.weight for m in mems)
    memory = values + count(p for m in mems for p in m.parameters())
    base = count(model.parameters())
    return {"base": base, "memory": memory, "values": values, "total": base + memory}


def save_retrofitted(model: nn.Module, path: str | Path, tokenizer=None, base_info: dict | None = None) -> Path:
    """Write weights (safetensors), ``retrofit.json`` and the base config (+ tokenizer)."""
    from safetensors.torch import save_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg: MemoryConfig = model.memory_config
    save_model(model, str(path / WEIGHTS_FILE))  # handles tied embeddings
    model.config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    meta = {"format": 1, "memory": cfg.to_dict(), "base": base_info or {}}
    (path / RETROFIT_FILE).write_text(json.dumps(meta, indent=2))
    return path


def load_retrofitted(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a retrofitted model from :func:`save_retrofitted` output; same logits bit for bit."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    meta_file = path / RETROFIT_FILE
    if not meta_file.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"{path} is not a saved retrofitted model: expected {RETROFIT_FILE} and {WEIGHTS_FILE} "
            f"(written by smf_lightning.memory.save_retrofitted)."
        )
    meta = json.loads(meta_file.read_text())
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    # Built on CPU, not the meta device: non-persistent buffers (rotary inv_freq) are not
    # in the checkpoint and must be computed by the constructor.
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=dtype)
    retrofit(model, MemoryConfig(**meta["memory"]))
    load_model(model, str(path / WEIGHTS_FILE), strict=True)
    model.eval()
    model.retrofit_meta = meta
    return model
