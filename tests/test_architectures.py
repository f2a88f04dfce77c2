"""The recipe on any causal LM: every tiny decoder architecture is retrofitted and trained one
exactly sparse SMF step, an unsupported one is refused by name, and the hub path
(``model.source=hub model.name=<hub id>``) loads exactly what was saved (seconds, no hub).

The hub is never contacted: a hub id resolves from a Hugging Face cache this file writes into
tmp_path (the layout ``snapshot_download`` / ``try_to_load_from_cache`` read), in offline mode.
"""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from smf_lightning.config import ConfigError, decoder_layer_count
from smf_lightning.memory import MemoryConfig, memory_layers, retrofit
from smf_lightning.memory.retrofit import SUPPORTED, TESTED_ARCHITECTURES, decoder_layers
from smf_lightning.models.tiny import TINY_ARCHITECTURES, tiny_causal_lm, tiny_qwen2, tiny_tokenizer

MEMORY = dict(layers=[1, 2], n_slots=256, heads=2, knn=4, k_dim=16)
TOP_T = 8
TEXTS = ("Question: Who wrote Hamlet?\nAnswer: Shakespeare", "Q: 2+2? A: 4")  # 11 and 9 tokens


def padded_batch(tok) -> dict:
    enc = tok(list(TEXTS), return_tensors="pt", padding=True)
    assert not enc.attention_mask.all()  # padded: the memory's padding mask is exercised
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def one_smf_step(model, batch):
    """One SparseMemoryFinetune optimizer step (a Lightning fit of max_steps=1); the module."""
    import lightning as L

    from smf_lightning.methods import SparseMemoryFinetune

    module = SparseMemoryFinetune(model, {"selector": "tf", "top_t": TOP_T, "optimizer": "adam", "lr": 0.1,
                                          "prefix_cache": 0})
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    assert trainer.global_step == 1
    return module


# -----------------------------------------------------------------------------
# A. Any decoder


@pytest.mark.parametrize("model_type", list(TINY_ARCHITECTURES))
def test_retrofit_is_the_base_model_and_one_smf_step_changes_only_selected_rows(model_type, tiny_tok):
    batch = padded_batch(tiny_tok)
    ref = logits(tiny_causal_lm(model_type, seed=1), batch)
    model = retrofit(tiny_causal_lm(model_type, seed=1), MemoryConfig(output="direct", **MEMORY))
    assert sorted(memory_layers(model)) == MEMORY["layers"]
    # additive memory starts with zero values: the same forward, bit for bit
    assert torch.equal(logits(model, batch), ref)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    values = {n for n, p in model.named_parameters() if n.endswith("memory.values.weight")}
    assert len(values) == len(MEMORY["layers"])
    module = one_smf_step(model, batch)

    params = dict(model.named_parameters())
    for name, p in params.items():  # base weights, memory keys and projections: untouched
        if name not in values:
            assert torch.equal(p, before[name]), f"{model_type}: {name} changed"
    for i, mem in memory_layers(model).items():
        name = next(n for n in values if params[n] is mem.values.weight)
        w, w0 = mem.values.weight.detach(), before[name]
        selected = module.last_selection[i].cpu()
        assert 0 < selected.numel() <= TOP_T and selected.unique().numel() == selected.numel()
        changed = torch.nonzero((w != w0).any(1)).squeeze(1)
        assert set(changed.tolist()) == set(selected.tolist()), f"{model_type} layer {i}"
        unselected = torch.ones(mem.n_slots, dtype=torch.bool)
        unselected[selected] = False
        assert torch.equal(w[unselected], w0[unselected])  # every other row bit-identical (still zero)
    # and the step moved the model: the trained rows are read by the batch
    assert not torch.equal(logits(model, batch), ref)


def test_the_tested_architectures_are_the_ones_the_errors_name():
    """Every architecture the tiny builder makes is one the retrofit's error names as tested, and
    vice versa; the tiny Qwen2 of the other tests is the builder's qwen2, weight for weight."""
    built = {type(tiny_causal_lm(mt)).__name__ for mt in TINY_ARCHITECTURES}
    assert built == set(TESTED_ARCHITECTURES)
    assert all(name in SUPPORTED for name in TESTED_ARCHITECTURES)
    a, b = tiny_causal_lm("qwen2", seed=3), tiny_qwen2(seed=3)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(x, b.state_dict()[k]) for k, x in a.state_dict().items())


def test_layer_lists_found_where_each_architecture_keeps_them():
    expected = {"gpt2": "transformer.h"}  # every other tiny architecture: model.layers
    for mt in TINY_ARCHITECTURES:
        model = tiny_causal_lm(mt)
        layers = decoder_layers(model)
        where = next(n for n, m in model.named_modules() if m is layers)
        assert where == expected.get(mt, "model.layers") and len(layers) == model.config.num_hidden_layers


class _NoMlpDecoder(torch.nn.Module):
    """A stand-in causal LM whose layers have no `mlp` (fc1/fc2, as OPT's do)."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"fc1": torch.nn.Linear(4, 8)}) for _ in range(2))


def test_an_unsupported_architecture_is_refused_by_class_name_and_what_is_supported():
    with pytest.raises(ValueError, match=r"^_NoMlpDecoder has no list of decoder layers with an `mlp`") as err:
        retrofit(_NoMlpDecoder(), MemoryConfig(**MEMORY))
    assert f"Supported: {SUPPORTED}." in str(err.value) and "LlamaForCausalLM" in str(err.value)
    # a real transformers decoder without `.mlp`: OPT (fc1/fc2 in the layer itself)
    from transformers import OPTConfig, OPTForCausalLM

    opt = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                                   num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=32))
    with pytest.raises(ValueError, match=r"^OPTForCausalLM has no list of decoder layers .* Supported: "):
        retrofit(opt, MemoryConfig(**MEMORY))


# -----------------------------------------------------------------------------
# B. The hub path, without a hub

REPO_ID = "tiny-org/tiny-llama"
N_LAYERS = 3  # not the tiny default (4): the config checks must read it from the saved model


def save_tiny(folder, model_type="llama", seed=5, num_layers=N_LAYERS):
    model, tok = tiny_causal_lm(model_type, seed=seed, num_layers=num_layers), tiny_tokenizer()
    model.save_pretrained(folder)  # safetensors
    tok.save_pretrained(folder)
    return model


def model_cfg(name: str, source: str = "hub"):
    return OmegaConf.create({"model": {"name": name, "source": source, "dtype": "float32", "init_checkpoint": None},
                             "seed": 0})


def assert_same_weights(loaded, saved):
    a, b = loaded.state_dict(), saved.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache holding REPO_ID (refs/main -> snapshots/<commit>), offline mode on, and
    a hub probe that fails the test: a hub id resolves only from this cache, as on a machine
    that downloaded it before."""
    import huggingface_hub.constants as hf

    from smf_lightning.models import loading

    cache = tmp_path / "hf-cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + REPO_ID.replace("/", "--"))
    model = save_tiny(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(loading, "_hub_reachable", lambda repo_id: pytest.fail("must not probe the hub"))
    return model, repo / "snapshots" / commit


def test_hub_id_loads_through_the_hub_path_exactly(hub_cache, tiny_tok):
    """model.source=hub model.name=<hub id>: the config check reads the cached config.json (3 layers)
    and load_model returns the saved weights bit for bit, recorded as a hub model."""
    from smf_lightning.models.build import load_model

    saved, snapshot = hub_cache
    cfg = model_cfg(REPO_ID)
    assert decoder_layer_count(cfg.model) == N_LAYERS
    model, tok, info = load_model(cfg)
    assert info["source"] == "hub" and info["requested"] == REPO_ID and info["path"] == REPO_ID
    assert str(snapshot) in info["provenance"] and info["num_hidden_layers"] == N_LAYERS
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert_same_weights(model, saved)
    assert tok(list(TEXTS)).input_ids == tiny_tok(list(TEXTS)).input_ids


def test_hub_download_branch_resolves_the_id_with_from_pretrained(hub_cache, monkeypatch):
    """The branch a reachable hub takes: from_pretrained(<hub id>) itself (here served from the
    cache in offline mode), not a resolved folder."""
    from smf_lightning.models import load_base_model, loading

    saved, _ = hub_cache
    monkeypatch.setattr(loading, "_hub_cache_dir", lambda repo_id: None)
    monkeypatch.setattr(loading, "_hub_reachable", lambda repo_id: (True, ""))
    loaded = load_base_model(REPO_ID, source="hub")
    assert loaded.info["source"] == "hub" and "downloaded from the Hugging Face hub" in loaded.info["provenance"]
    assert_same_weights(loaded.model, saved)


def test_local_directory_with_source_hub_loads_exactly(tmp_path):
    """A user's HF directory under model.source=hub: loaded from disk, the same weights; the config
    check reads its depth (also for GPT-2, whose config.json says n_layer, not num_hidden_layers)."""
    from smf_lightning.models.build import load_model

    folder = tmp_path / "my-llama"
    saved = save_tiny(folder)
    cfg = model_cfg(str(folder))
    assert decoder_layer_count(cfg.model) == N_LAYERS
    model, _, info = load_model(cfg)
    assert info["source"] == "local" and info["path"] == str(folder.resolve())
    assert_same_weights(model, saved)

    gpt2 = tmp_path / "my-gpt2"
    save_tiny(gpt2, model_type="gpt2", num_layers=2)
    assert "num_hidden_layers" not in json.loads((gpt2 / "config.json").read_text())
    assert decoder_layer_count(model_cfg(str(gpt2)).model) == 2


@pytest.fixture
def no_weight_loading(monkeypatch):
    """Any weight loading fails the test: the checks must refuse a model before it."""
    import transformers

    def refuse(*a, **k):
        pytest.fail("weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", refuse)


def compose(*overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from smf_lightning.train import conf_dir

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return hydra_compose("train", overrides=["experiment=tiny", *overrides])


def test_config_check_sees_the_saved_models_depth(tmp_path, no_weight_loading):
    from smf_lightning.config import validate_config

    folder = tmp_path / "my-llama"
    save_tiny(folder)
    over = ["model.source=hub", f"model.name={folder}"]
    validate_config(compose(*over, "model.memory.layers=[2]"))
    with pytest.raises(ConfigError, match=r"model\.memory\.layers.*valid: 0\.\.2"):
        validate_config(compose(*over, "model.memory.layers=[3]"))


def test_unreadable_config_json_is_refused_before_loading(tmp_path, no_weight_loading):
    from smf_lightning.config import validate_config

    folder = tmp_path / "broken"
    save_tiny(folder)
    (folder / "config.json").write_text('{"model_type": "llama", ')  # a truncated write
    with pytest.raises(ConfigError, match="cannot be read") as err:
        validate_config(compose("model.source=hub", f"model.name={folder}"))
    msg = str(err.value)
    assert f"model.name={str(folder)!r}" in msg and str(folder / "config.json") in msg and "save_pretrained" in msg
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="is not a JSON object"):
        decoder_layer_count(model_cfg(str(folder)).model)


def test_unsupported_architecture_directory_is_refused_before_loading(tmp_path, no_weight_loading):
    """A saved OPT (layers without `mlp`) and a model_type transformers does not know: refused at
    the config check, naming the model and what is supported, with the weights never read."""
    from transformers import OPTConfig, OPTForCausalLM

    from smf_lightning.config import validate_config

    opt = tmp_path / "my-opt"
    OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                             word_embed_proj_dim=16, max_position_embeddings=32)).save_pretrained(opt)
    with pytest.raises(ConfigError) as err:
        validate_config(compose("model.source=hub", f"model.name={opt}"))
    msg = str(err.value)
    assert f"model.name={str(opt)!r}" in msg and "OPTForCausalLM has no list of decoder layers" in msg
    assert f"Supported: {SUPPORTED}" in msg

    alien = tmp_path / "alien"
    alien.mkdir()
    (alien / "config.json").write_text(json.dumps({"model_type": "not-a-model", "architectures": ["AlienForCausalLM"]}))
    (alien / "model.safetensors").write_bytes(b"never read")
    with pytest.raises(ConfigError) as err:
        decoder_layer_count(model_cfg(str(alien)).model)
    msg = str(err.value)
    assert f"model.name={str(alien)!r}" in msg and "'not-a-model' (AlienForCausalLM)" in msg
    assert f"Supported: {SUPPORTED}" in msg


def test_unsupported_hub_id_in_the_cache_is_refused_before_loading(hub_cache, no_weight_loading):
    _, snapshot = hub_cache
    cfg = json.loads((snapshot / "config.json").read_text())
    (snapshot / "config.json").write_text(json.dumps({**cfg, "model_type": "t5", "architectures": ["T5Model"]}))
    with pytest.raises(ConfigError, match=rf"model.name='{REPO_ID}'.*'t5' \(T5Model\).*Supported: "):
        decoder_layer_count(model_cfg(REPO_ID).model)


# ---- memory settings relative to the model: layers as fractions of the depth ----

def test_a_fraction_of_the_depth_resolves_per_model_and_the_model_records_the_index():
    from smf_lightning.memory.layer import resolve_layers

    assert resolve_layers([0.625], 24) == [15] and resolve_layers([0.625], 30) == [18]  # Qwen2.5-0.5B, SmolLM2-135M
    assert resolve_layers([0.25, 0.5, 0.75], 24) == [6, 12, 18] and resolve_layers([3, 0.5], 8) == [3, 4]
    assert resolve_layers([0.29], 100) == [29]  # 0.29 * 100 is 28.999... in floating point
    for model_type, n in (("qwen2", 4), ("llama", 6)):
        model = retrofit(tiny_causal_lm(model_type, num_layers=n), MemoryConfig(**{**MEMORY, "layers": [0.5]}))
        assert list(memory_layers(model)) == [n // 2] and model.memory_config.layers == [n // 2]
        assert model.memory_config.to_dict()["layers"] == [n // 2]  # what summary.json's model.memory holds


@pytest.mark.parametrize("layers, message", [
    ([1.0], "neither a decoder layer index"), ([-1], r"index \[-1\] out of range"), ([True], "neither"),
    ([0.5, 2], "names a layer twice on a model of 4 decoder layers"), ([0.99, 4], r"index \[4\] out of range"),
])
def test_bad_layer_settings_are_refused_with_the_resolved_layers(layers, message):
    with pytest.raises(ValueError, match=message):
        MemoryConfig(**{**MEMORY, "layers": layers}).validate(n_layers=4)


def test_memory_presets_place_the_memory_by_depth_on_each_model(tmp_path, no_weight_loading):
    """conf/memory/: the recipe's one layer at 5/8 of the depth and the seed paper's three at 1/4, 1/2,
    3/4, whatever the model; the config check resolves them against the model it will load."""
    from smf_lightning.config import validate_config

    folder = tmp_path / "my-llama"
    save_tiny(folder)  # 3 decoder layers
    over = ["model.source=hub", f"model.name={folder}", "model.memory.n_slots=256", "model.memory.knn=4",
            "method.top_t=4"]
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from smf_lightning.train import conf_dir

    for preset, layers in (("recipe", [0.625]), ("seed_paper", [0.25, 0.5, 0.75])):
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            cfg = hydra_compose("train", overrides=["model=smollm2-135m", f"memory={preset}", *over])
        assert list(cfg.model.memory.layers) == layers
        validate_config(cfg)  # 3 layers: recipe -> [1], seed paper -> [0, 1, 2]
