"""The per-fact slot budget of a stream (method.budget; selection/budget.py): exact arithmetic on
the real memory's numbers, the identity of `stream` and `fixed` for every stream that fits, the
refusals with their numbers, and the config stage reading what an init checkpoint already owns."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from hydra import compose, initialize_config_dir

from smf_lightning.config import ConfigError
from smf_lightning.memory.ledger import FactLedger
from smf_lightning.methods import SparseMemoryFinetune, method_config
from smf_lightning.methods.smf import starting_memory, stream_budget
from smf_lightning.selection.budget import resolve_budget
from smf_lightning.train import conf_dir

REAL = dict(n_slots=512 ** 2, exclude_hubs=0.1)  # the recipe's memory: 262,144 slots, ceil(26,214.4) = 26,215 hubs
SELECTABLE = 262_144 - 26_215  # 235,929


def stream(facts: int, top_t: int = 300, min_top_t: int = 100, **kw) -> int:
    args = {**REAL, "owned": 0, "reserve": 0.0, **kw}
    return resolve_budget("stream", top_t, min_top_t=min_top_t, bounded=True, n_tasks=facts, facts_per_task=1,
                          **args).top_t


def test_stream_budget_on_the_real_memory_exactly():
    b = resolve_budget("stream", 300, min_top_t=100, bounded=True, n_tasks=100, facts_per_task=10, **REAL)
    assert (b.top_t, b.hubs, b.selectable, b.planned_facts) == (235, 26_215, SELECTABLE, 1_000)  # 235,929 // 1,000
    assert b.to_dict()["requested_top_t"] == 300 and b.policy == "stream"
    assert [stream(f) for f in (200, 786, 787, 870, 2_359)] == [300, 300, 299, 271, 100]
    with pytest.raises(ConfigError, match="2,360 tasks x 1 facts"):  # 2,360 x 100 > 235,929
        stream(2_360)
    # slots an inherited ledger owns and a reserve come off the selectable slots, exactly
    b = resolve_budget("stream", 300, min_top_t=100, bounded=True, n_tasks=1_000, facts_per_task=1, owned=5_000,
                       reserve=0.05, **REAL)
    assert (b.reserved, b.selectable, b.top_t) == (13_108, SELECTABLE - 5_000 - 13_108, 217)  # ceil(0.05 x 262,144)


def test_stream_gives_top_t_exactly_for_every_stream_that_fits_at_top_t():
    """The identity that lets `stream` be the recipe's default: where `fixed` runs, `stream` spends
    the same top_t (so every selection is the same); where `fixed` refuses, `stream` spends less."""
    for n_slots, hubs, top_t in ((512 ** 2, 0.1, 300), (256, 0.1, 16), (16_384, 0.0, 37)):
        for facts in range(1, n_slots // top_t + 50):
            kw = dict(min_top_t=1, bounded=True, n_tasks=facts, facts_per_task=1, n_slots=n_slots, exclude_hubs=hubs)
            try:
                resolve_budget("fixed", top_t, **kw)
                fits = True
            except ConfigError:
                fits = False
            b = resolve_budget("stream", top_t, **kw)
            assert (b.top_t == top_t) == fits and b.top_t <= top_t and facts * b.top_t <= b.selectable


def test_the_floor_is_min_top_t_or_top_t_and_unbounded_streams_spend_top_t():
    # min_top_t above top_t: stream refuses exactly where fixed does (the tiny experiment: top_t 16)
    tiny = dict(bounded=True, n_slots=256, exclude_hubs=0.1, facts_per_task=2)  # 230 selectable: 14 facts at 16
    assert resolve_budget("stream", 16, min_top_t=100, n_tasks=7, **tiny).top_t == 16
    with pytest.raises(ConfigError, match=r"min\(method.min_top_t=100, method.top_t=16\)=16"):
        resolve_budget("stream", 16, min_top_t=100, n_tasks=8, **tiny)
    assert resolve_budget("stream", 16, min_top_t=8, n_tasks=8, **tiny).top_t == 14
    # slots reused (exclude_owned=false) or a per-step budget: no plan, top_t whatever the stream
    for policy in ("fixed", "stream"):
        b = resolve_budget(policy, 300, min_top_t=100, bounded=False, n_tasks=10_000, facts_per_task=10, **REAL)
        assert b.top_t == 300 and "no per-fact plan" in b.describe()


def test_refusals_give_the_numbers_and_the_options():
    with pytest.raises(ConfigError) as fixed:
        resolve_budget("fixed", 300, min_top_t=100, bounded=True, n_tasks=100, facts_per_task=10, **REAL)
    assert str(fixed.value) == (
        "bad config: the stream cannot fit the memory: 100 tasks x 10 facts x method.top_t=300 slots = 300,000 slots "
        "per memory layer, but only 235,929 can be selected (model.memory.n_slots=262,144 minus 26,215 hub slots of "
        "method.exclude_hubs=0.1), and method.exclude_owned=true never selects a slot twice. At this budget 786 facts "
        "fit. Options: method.budget=stream (235 slots per fact for this stream); a lower method.top_t (at most 235 "
        "for this stream); a larger model.memory.n_slots; a shorter stream; or method.exclude_owned=false (later "
        "facts reuse slots).")
    with pytest.raises(ConfigError) as long:
        resolve_budget("stream", 300, min_top_t=100, bounded=True, n_tasks=500, facts_per_task=10, owned=1_000,
                       reserve=0.01, **REAL)
    assert str(long.value) == (
        "bad config: the stream cannot fit the memory even at the smallest per-fact budget method.budget=stream may "
        "spend: 500 tasks x 10 facts x min(method.min_top_t=100, method.top_t=300)=100 slots = 500,000 slots per "
        "memory layer, but only 232,307 can be selected (model.memory.n_slots=262,144 minus 26,215 hub slots of "
        "method.exclude_hubs=0.1, 1,000 slots the facts of model.init_checkpoint's ledger own, 2,622 kept free by "
        "method.reserve=0.01), and method.exclude_owned=true never selects a slot twice. At this budget 2,323 facts "
        "fit. Options: a lower method.min_top_t (at most 46, the budget every fact would get; conf/method/smf.yaml "
        "says what small budgets learned); a larger model.memory.n_slots; a shorter stream; a smaller "
        "method.reserve; or method.exclude_owned=false (later facts reuse slots).")


def test_the_budget_keys_check_themselves():
    base = {"name": "smf", "selector": "kl", "top_t": 300, "optimizer": "adam", "lr": 0.3}
    assert (method_config(base).budget, method_config(base).min_top_t, method_config(base).reserve) == ("fixed", 1, 0.0)
    with pytest.raises(ConfigError, match=r"method.budget='auto'; allowed: fixed \| stream"):
        method_config({**base, "budget": "auto"})
    with pytest.raises(ConfigError, match="method.min_top_t=0"):
        method_config({**base, "min_top_t": 0})
    with pytest.raises(ConfigError, match=r"method.reserve=0.95; allowed: a share of slots in \[0, 1 - method.exclude_hubs=0.1\)"):
        method_config({**base, "exclude_hubs": 0.1, "reserve": 0.95})
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        recipe = method_config(compose("train", overrides=["experiment=tiny"]).method)
    assert (recipe.budget, recipe.min_top_t, recipe.reserve) == ("stream", 100, 0.0)  # conf/method/smf.yaml


def _export_with_ledger(folder, rows_per_layer: dict[int, int], n_slots: int = 256):
    """A folder that reads like a full export to the config stage: retrofit.json and a fact ledger."""
    folder.mkdir()
    (folder / "retrofit.json").write_text(json.dumps({"format": 1, "memory": {"n_slots": n_slots}}))
    facts = {f"old{i}": {"task": 0, "rows": {layer: torch.arange(k) + 3 * i for layer, k in rows_per_layer.items()}}
             for i in range(2)}  # two facts, overlapping rows: the union is what is owned
    FactLedger.from_state_dict({"facts": facts, "pre": {}}).write(folder)
    return folder


def test_the_config_stage_counts_the_rows_an_init_checkpoint_owns(tmp_path, caplog):
    export = _export_with_ledger(tmp_path / "export", {1: 40, 2: 10})  # layer 1: rows 0..42 owned (43)
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=tiny", "model.memory.n_slots=1024", "data.n_tasks=4",
                                          "data.facts_per_task=1", "method.top_t=64", "method.min_top_t=8",
                                          f"model.init_checkpoint={export}"])
    assert starting_memory(cfg.model) == (256, 43)  # the export's memory, not model.memory.n_slots
    config = method_config(cfg.method)
    with caplog.at_level(logging.INFO, logger="smf_lightning.methods.smf"):
        SparseMemoryFinetune.check_run_config(cfg, config)
    # (256 - 26 hubs - 43 owned) // 4 facts = 46
    assert "46 slots per fact and memory layer for 4 planned facts: 187 selectable = 256 slots - 26 hubs - 43 owned" \
        in caplog.text
    assert stream_budget(config, 256, 4, 1, 43).top_t == 46
    config.budget = "fixed"  # fixed counts them too: 4 x 64 > 187
    with pytest.raises(ConfigError, match="43 slots the facts of model.init_checkpoint's ledger own"):
        SparseMemoryFinetune.check_run_config(cfg, config)
