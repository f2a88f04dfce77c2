"""experiments/tools/bench_methods.py on the tiny model (``--tiny``): the methods are built by the
continual stage's builders with the recipe's levers, the comparison and the facts-seen profile
write their files, and the simulated stream leaves the memory as SMF would (ownership, ledger,
write keys, the next task's selection outside owned and hub slots)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parents[1] / "experiments" / "tools"
sys.path.insert(0, str(TOOLS))

import bench_methods  # noqa: E402

pytestmark = pytest.mark.study  # a tool under experiments/, not the package


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SMF_CACHE", str(tmp_path / "cache"))  # whitening and background statistics: here
    return tmp_path


def test_smf_is_built_with_the_recipe_and_simulated_facts_own_their_rows(cache):
    cfg, module, opt, dm, info, sim, task_start_s = bench_methods.build("smf", "facts_seq_quick", [], tiny=True,
                                                                        facts_seen=8)
    c = module.config
    assert task_start_s > 0
    recipe = ("kl", "fact", True, "stream", "fresh")
    assert (c.selector, c.select_per, c.exclude_owned, c.budget, c.optimizer_state) == recipe
    assert module.background and module.gated  # KL's background statistics; the read gate
    per_fact = sim["slots_per_fact"]
    assert per_fact == module.top_t == module.budget.top_t == 16  # 12 planned facts fit at top_t
    assert module.budget.planned_facts == (sim["tasks_before"] + dm.n_tasks) * dm.facts_per_task
    for i, mem in module.memories.items():
        assert mem.cfg.input_norm == "zca" and mem.cfg.read_gate == 0.5
        owned = module.owned[i]
        assert int(owned.sum()) == 8 * per_fact
        assert not (owned & module.hub_mask[i]).any()
        assert torch.equal(torch.nonzero(owned).squeeze(1), module.ledger.owned_rows(i))  # the ledger owns them
        assert torch.equal(mem.write_mass.sum(1) > 0, owned)  # write keys on the owned rows only
        for per_layer in module.fact_slots.values():  # the next task selects outside owned and hub slots
            slots = per_layer[i]
            assert not (owned[slots] | module.hub_mask[i][slots]).any() and slots.numel() <= per_fact
    seen = [f for f in module.ledger.facts if f.startswith("seen-")]
    assert len(seen) == 8 and len(module.ledger.facts) == 8 + dm.facts_per_task
    assert {module.ledger.facts[f].task for f in module.ledger.facts if f not in seen} == {sim["tasks_before"]}


def test_compare_and_facts_seen_write_their_results(cache):
    out = cache / "results"
    bench_methods.main(["--tiny", "--steps", "1", "--results-dir", str(out)])
    summary = json.loads((out / "bench_methods.json").read_text())
    assert set(summary["results"]) == {"smf", "smf_seen_batch", "lora", "full_ft"}
    smf = summary["results"]["smf"]
    assert smf["method_config"]["selector"] == "kl" and smf["ledger_facts"] > 0
    assert 0 < sum(smf["selected_rows"].values()) <= smf["budget"]["top_t"] * 2 * len(smf["selected_rows"])
    for r in summary["results"].values():
        phases = r["phases_s_median"]
        assert all(phases[p] >= 0 for p in bench_methods.PHASES if p != "other")
        assert r["step_s_median"] > 0 and r["peak_rss_mb"] > 0
    ft = summary["results"]["full_ft"]
    assert summary["smf_over_full_ft_step"] == pytest.approx(smf["step_s_median"] / ft["step_s_median"])
    with (out / "bench_methods.csv").open() as f:
        assert [row["method"] for row in csv.DictReader(f)] == ["smf", "smf_seen_batch", "lora", "full_ft"]

    bench_methods.main(["--tiny", "--steps", "1", "--results-dir", str(out), "--facts-seen", "8"])
    rows = json.loads((out / "bench_methods_facts_seen.json").read_text())["rows"]
    assert [(r["facts_seen"], r["method"]) for r in rows] == [(0, "smf"), (0, "smf_seen_batch"), (8, "smf"),
                                                               (8, "smf_seen_batch")]
    assert all(v == 0.0 for v in rows[0]["keyed_read_share"].values())  # no fact has written a key yet
    assert all(v == 8 * 16 for v in rows[2]["owned_slots"].values())
    assert rows[2]["ledger_facts"] == rows[0]["ledger_facts"] + 8
