"""The run's model: built from the config in one place (build.py: load, retrofit, whitening,
k-means keys, background statistics), pretrained base models loaded from hub / local dir /
GGUF / offline catalogue (loading.py), and tiny random decoders (Qwen2, Llama, Mistral, Qwen3, Gemma2,
Phi3, GPT-2) for unit tests (tiny.py)."""

from smf_lightning.models.loading import OFFLINE_EQUIVALENTS, LoadedModel, ModelLoadError, load_base_model

__all__ = ["LoadedModel", "ModelLoadError", "OFFLINE_EQUIVALENTS", "load_base_model"]
