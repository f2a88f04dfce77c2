"""Tiny randomly initialised causal LMs (Qwen2, and every architecture in TINY_ARCHITECTURES)
and a tiny local tokenizer — for unit tests only.

Nothing here is downloaded: the tokenizer is a byte-level BPE trained in milliseconds on a
fixed text, so tests run anywhere (CI, no hub) and are deterministic.
"""

from __future__ import annotations

from functools import lru_cache

import torch

TINY_VOCAB = 512
TINY_LAYERS = 4  # decoder layers of the tiny model (config validation reads this, not a model)

_TRAIN_TEXT = """Question: What is the capital of France? Answer: Paris.
Q: Who wrote Hamlet? A: William Shakespeare. The answer is Shakespeare.
The quick brown fox jumps over the lazy dog. A memory layer stores facts in slots.
Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.
Sparse memory finetuning updates only a few value rows of the memory.
0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ? ! . , : ; ' " ( ) [ ] { }
abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ
"""


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TRAIN_TEXT.splitlines() * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab <= 512) with eos and pad tokens; any text encodes."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        padding_side="right",
    )


def tiny_qwen2_config(num_layers: int = TINY_LAYERS, hidden: int = 64, tie: bool = False):
    return tiny_config("qwen2", num_layers, hidden, tie)


def tiny_qwen2(seed: int = 0, num_layers: int = TINY_LAYERS, hidden: int = 64, tie: bool = False):
    """A randomly initialised Qwen2ForCausalLM (hidden 64, 4 layers), fp32, eval mode."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(tiny_qwen2_config(num_layers, hidden, tie)).float().eval()
    return model


# model_type -> extra config keys of a tiny decoder of each architecture the tests retrofit
# (tests/test_architectures.py). The architectures memory/retrofit.py names as tested.
TINY_ARCHITECTURES: dict[str, dict] = {
    "qwen2": {},
    "llama": {},
    "mistral": {"sliding_window": 8},  # shorter than the test batches: the sliding mask is exercised
    "qwen3": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "sliding_window": 8},  # alternating sliding / full attention layers
    "phi3": {},
    "gpt2": {"n_inner": 128},  # Conv1D MLP, learned positions, `transformer.h` layer list
}


def tiny_config(model_type: str = "qwen2", num_layers: int = TINY_LAYERS, hidden: int = 64, tie: bool = False):
    """The config of a tiny decoder (hidden 64, 4 heads, 2 KV heads, vocab 512) of ``model_type``."""
    from transformers import AutoConfig

    if model_type not in TINY_ARCHITECTURES:
        raise ValueError(f"no tiny {model_type!r} model; tiny architectures: {', '.join(TINY_ARCHITECTURES)}")
    return AutoConfig.for_model(
        model_type,
        vocab_size=TINY_VOCAB,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        eos_token_id=0,
        pad_token_id=1,
        bos_token_id=0,
        **TINY_ARCHITECTURES[model_type],
    )


def tiny_causal_lm(model_type: str = "qwen2", seed: int = 0, num_layers: int = TINY_LAYERS, hidden: int = 64,
                   tie: bool = False):
    """A randomly initialised tiny causal LM of ``model_type`` (a TINY_ARCHITECTURES key), fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, num_layers, hidden, tie)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).float().eval()
