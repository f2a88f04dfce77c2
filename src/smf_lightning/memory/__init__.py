"""Product-key memory layers and retrofitting them into pretrained LMs."""

from .fingerprint import fingerprint_model
from .layer import MemoryConfig, ProductKeyMemory, SlotAccess
from .positions import loss_position_mask
from .retrofit import (
    MemoryMLP,
    decoder_layers,
    freeze_all_but_values,
    load_retrofitted,
    memory_layers,
    memory_value_params,
    param_counts,
    retrofit,
    save_retrofitted,
)

__all__ = [
    "MemoryConfig",
    "MemoryMLP",
    "ProductKeyMemory",
    "SlotAccess",
    "decoder_layers",
    "fingerprint_model",
    "freeze_all_but_values",
    "load_retrofitted",
    "loss_position_mask",
    "memory_layers",
    "memory_value_params",
    "param_counts",
    "retrofit",
    "save_retrofitted",
]
