"""Test helpers: fabricated wheels and a tiny but real GGUF file (no downloads).

The GGUF holds the lead's tiny random Qwen2 in F32, written with the `gguf` package the same way
llama.cpp's converter names tensors, so transformers' GGUF loader (and hence our GGUF -> safetensors
conversion) runs for real in a fraction of a second.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

# HF Qwen2 module names -> llama.cpp GGUF tensor names
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_PER_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_tiny_gguf(path: Path, tie: bool = False, seed: int = 0):
    """Write a 2-layer tiny Qwen2 (+ its BPE tokenizer) as an F32 GGUF; return (model, tokenizer)."""
    import gguf

    from smf_lightning.models.tiny import tiny_qwen2, tiny_tokenizer

    model, tok = tiny_qwen2(seed=seed, num_layers=2, tie=tie), tiny_tokenizer()
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("tiny-qwen2-test")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    tj = json.loads(tok.backend_tokenizer.to_str())
    tokens = [None] * len(tj["model"]["vocab"])
    for t, i in tj["model"]["vocab"].items():
        tokens[i] = t
    specials = {a["content"] for a in tj["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])  # 3 = control token
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(tok.eos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)

    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tie:
            continue  # a tied GGUF has no output.weight: that absence is what "tied" means
        if name in _GLOBAL:
            gguf_name = _GLOBAL[name]
        else:
            layer, module, kind = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name).groups()
            gguf_name = f"blk.{layer}.{_PER_LAYER[module]}.{kind}"
        w.add_tensor(gguf_name, tensor.detach().float().numpy().copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, tok


def make_wheel(folder: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal wheel (a zip with dist-info METADATA, enough for `pip download`) holding `files`."""
    stem = re.sub(r"[-_.]+", "_", package).lower()
    path = Path(folder) / f"{stem}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{stem}-{version}.dist-info/METADATA",
                    f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        zf.writestr(f"{stem}-{version}.dist-info/WHEEL",
                    "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{stem}-{version}.dist-info/RECORD", "")
    return path
