"""Methods are components: a class named by ``_target_`` with a typed config that checks itself
and declares what the rest of the program needs; a method of one's own runs without touching the
package (docs/extending.md), and no code outside ``methods/`` asks a method for its name."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import smf_lightning
from smf_lightning.config import ConfigError, validate_config
from smf_lightning.methods import (
    BUILTIN, ContinualLM, FullFinetune, MethodConfig, SparseMemoryFinetune, method_class, method_config,
)
from smf_lightning.methods.baselines import LoRAConfig
from smf_lightning.methods.smf import SMFConfig
from smf_lightning.selection import SELECTORS, Selector, register_selector, select_slots, selector_class
from smf_lightning.train import conf_dir, run

TINY = ["experiment=tiny", "logger.wandb.mode=disabled", "callbacks.plots=false", "callbacks.cache_before_eval=false"]


@dataclass
class NormsConfig(MethodConfig):
    pattern: str = "norm"  # parameters whose name contains this train

    def validate(self) -> None:
        super().validate()
        if not self.pattern:
            raise ConfigError("bad config: method.pattern='' matches every parameter; name a part of a parameter name")


class NormsOnly(ContinualLM):
    """A method of a user's own: only the normalisation weights train (AdamW)."""

    method_name = "norms"
    Config = NormsConfig

    def __init__(self, model, method_cfg, background=None, seed=0):
        super().__init__(model, method_cfg)
        for name, p in self.model.named_parameters():
            p.requires_grad_(self.config.pattern in name)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.trainable_parameters(), lr=self.config.lr)


def tiny_cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose("train", overrides=[*TINY, f"paths.output_dir={tmp_path}", *overrides])


def test_a_users_method_runs_from_its_target_alone(tmp_path):
    """method._target_ names a class outside the package: the run trains exactly what it declares,
    no slot statistics are written (it is not a memory method), the summary names it."""
    cfg = tiny_cfg(tmp_path, "method=full_ft", f"method._target_={__name__}.NormsOnly", "method.name=norms",
                   "+method.pattern=norm", "method.lr=0.01")
    validate_config(cfg)
    summary = run(cfg)
    assert summary["method"] == "norms" and summary["steps"] == 16
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert saved and all("norm" in k for k in saved), sorted(saved)[:5]  # only trainable weights are saved
    assert not (tmp_path / "slot_stats.csv").exists()


def test_a_users_method_config_checks_itself_before_anything_loads(tmp_path):
    cfg = tiny_cfg(tmp_path, "method=full_ft", f"method._target_={__name__}.NormsOnly", "+method.pattern=''")
    with pytest.raises(ConfigError, match="method.pattern"):
        validate_config(cfg)
    cfg = tiny_cfg(tmp_path, "method=full_ft", "method._target_=no.such.Method")
    with pytest.raises(ConfigError, match=r"method._target_='no.such.Method' cannot be imported"):
        validate_config(cfg)
    cfg = tiny_cfg(tmp_path, "method=full_ft", "method._target_=torch.nn.Linear")
    with pytest.raises(ConfigError, match="is not a Lightning ContinualLM class"):
        validate_config(cfg)


def test_an_unknown_or_missing_key_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"method.top_k is not a key of method 'smf' \(SMFConfig\)"):
        validate_config(tiny_cfg(tmp_path, "+method.top_k=5"))
    with pytest.raises(ConfigError, match=r"method.rank is not a key of method 'full_ft'"):
        validate_config(tiny_cfg(tmp_path, "method=full_ft", "+method.rank=4"))
    # another method's key is no typo: an experiment written for SMF, run with method=lora, keeps SMF's
    # settings in cfg.method; the baseline ignores them
    validate_config(tiny_cfg(tmp_path, "method=lora", "+method.select_per=fact", "+method.exclude_hubs=0.1"))
    assert not hasattr(method_config({"name": "full_ft", "lr": 1e-6, "r": 4}), "r")
    with pytest.raises(ConfigError, match="method.lr is missing"):
        method_config({"name": "full_ft"})
    with pytest.raises(ConfigError, match="method.name='sparse' names no built-in method"):
        method_class({"name": "sparse"})


def test_each_builtin_yaml_names_its_class_and_parses_to_its_typed_config(tmp_path):
    expected = {"smf": (SparseMemoryFinetune, SMFConfig), "full_ft": (FullFinetune, MethodConfig),
                "lora": (BUILTIN["lora"], LoRAConfig)}
    for name, (cls, config_cls) in expected.items():
        cfg = tiny_cfg(tmp_path, f"method={name}")
        assert method_class(cfg.method) is cls and BUILTIN[name] is cls
        config = method_config(cfg.method)
        assert type(config) is config_cls and config.name == name
        # without _target_ (a config saved by an older run) the name finds the same class
        assert method_class({k: v for k, v in cfg.method.items() if k != "_target_"}) is cls


def test_typed_values_numbers_as_text_and_the_plain_smf_defaults():
    config = method_config({"name": "smf", "selector": "kl", "top_t": "32", "optimizer": "adam", "lr": "3e-4",
                            "betas": [0.8, 0.9]})
    assert config.lr == 3e-4 and config.top_t == 32 and config.betas == (0.8, 0.9)
    # a key absent behaves as plain SMF (Lin et al.), as a config saved before the key existed did
    assert (config.select_per, config.count_by, config.loss_tokens_only, config.exclude_owned, config.exclude_hubs,
            config.optimizer_state, config.prefix_cache, config.retrofit) == ("step", "reads", True, False, 0.0,
                                                                              "carry", 0, True)
    with pytest.raises(ConfigError, match=r"method.lr='fast'"):
        method_config({"name": "full_ft", "lr": "fast"})
    with pytest.raises(ConfigError, match="method.retrofit=False"):
        method_config({"name": "smf", "selector": "kl", "top_t": 8, "optimizer": "adam", "lr": 0.1, "retrofit": False})


def test_what_a_method_declares():
    smf = method_config({"name": "smf", "selector": "tfidf", "top_t": 300, "optimizer": "adam", "lr": 0.3})
    ft = method_config({"name": "full_ft", "lr": 1e-6})
    assert SparseMemoryFinetune.run_label(smf) == "smf-tfidf-t300" and FullFinetune.run_label(ft) == "full_ft"
    assert SparseMemoryFinetune.needs_background and SparseMemoryFinetune.memory_only
    assert not FullFinetune.needs_background and not FullFinetune.memory_only
    assert SparseMemoryFinetune.retrofits(smf) and not FullFinetune.retrofits(ft)


def test_no_code_outside_methods_asks_a_method_its_name():
    """What differs between methods is declared by the method class (methods/base.py); a test of
    the name elsewhere would be knowledge of one method scattered into the program."""
    package = Path(smf_lightning.__file__).resolve().parent
    names = "|".join(re.escape(n) for n in BUILTIN)
    compared = re.compile(rf"""(==|!=|\bin\b)\s*\(?[^#\n]*["']({names})["']""")
    found = []
    for path in package.rglob("*.py"):
        if path.parent.name == "methods":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if compared.search(code) and re.search(r"method|\.name\b", code):
                found.append(f"{path.relative_to(package)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


class LowestIdSelector(Selector):
    """A selector of a user's own (never registered: named by its dotted path): the lowest slot ids."""

    name = "lowest_id"

    def score(self, counts, candidates, bg):
        return -candidates.to(torch.float64)


def test_a_users_selector_by_dotted_path_selects_and_runs(tmp_path):
    path = f"{__name__}.LowestIdSelector"
    counts = torch.tensor([0, 5, 1, 0, 9, 2, 7])
    assert select_slots(counts, path, 2).tolist() == [1, 2]
    assert select_slots(counts, path, 2, exclude=torch.tensor([0, 1, 0, 0, 0, 0, 0], dtype=torch.bool)).tolist() == [2, 4]
    assert selector_class(path) is LowestIdSelector and LowestIdSelector.scored()
    # it reads no background statistics, so hub exclusion (defined by them) is refused before anything loads
    with pytest.raises(ConfigError, match="method.exclude_hubs"):
        validate_config(tiny_cfg(tmp_path, f"method.selector={path}", "method.exclude_hubs=0.1"))
    with pytest.raises(ConfigError, match="method.selector: unknown slot selector 'klx'"):
        validate_config(tiny_cfg(tmp_path, "method.selector=klx"))
    cfg = tiny_cfg(tmp_path, f"method.selector={path}", "method.exclude_hubs=0", "method.top_t=4")
    validate_config(cfg)
    summary = run(cfg)
    assert summary["selector"] == path and summary["steps"] == 16


def test_register_selector_makes_a_name():
    @register_selector
    class Busiest(Selector):
        name = "test_busiest"

        def score(self, counts, candidates, bg):
            return counts[candidates].to(torch.float64)

    try:
        assert select_slots(torch.tensor([3, 0, 8, 8, 1]), "test_busiest", 2).tolist() == [2, 3]
        assert method_config({"name": "smf", "selector": "test_busiest", "top_t": 2, "optimizer": "adam", "lr": 1.0})
    finally:
        SELECTORS.pop("test_busiest")
    with pytest.raises(ValueError, match="not a Selector subclass with a name"):
        register_selector(int)


def test_lora_trains_only_its_adapters_as_its_yaml_says(tmp_path):
    """The LoRA baseline from conf/method/lora.yaml: peft adapters on the named modules, rank r, and
    nothing else trainable; one optimizer step moves adapter weights only."""
    from smf_lightning.methods import build_method
    from smf_lightning.models.tiny import tiny_qwen2

    cfg = tiny_cfg(tmp_path, "method=lora", "method.r=4", "method.target_modules=[q_proj,v_proj]")
    module = build_method(dict(cfg.method), tiny_qwen2())
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and (".q_proj." in n or ".v_proj." in n) for n in trainable), sorted(trainable)
    assert {p.shape[0] for n, p in module.named_parameters() if "lora_A" in n} == {4}
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    opt = module.configure_optimizers()
    ids = torch.randint(2, 500, (2, 8))
    loss = module.lm_loss({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    loss.backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in module.named_parameters() if n in frozen)
