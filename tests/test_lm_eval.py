"""lm-evaluation-harness as an extra evaluator (callbacks/lm_eval.py), offline: a small local
multiple-choice task that the test writes itself scores exactly what our own `multiple_choice`
suite kind scores on the same items; the global RNGs (hence training) are untouched; a run with
``callbacks.lm_eval.tasks`` records lm-eval's results beside ours; bad configs fail before any
model loads."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from smf_lightning.callbacks.lm_eval import evaluate_with_lm_eval
from smf_lightning.config import ConfigError
from smf_lightning.eval.custom_suites import build_custom_suite
from smf_lightning.eval.scoring import score_choices
from smf_lightning.train import conf_dir

TASK = "tiny_mc"
WORDS = "the a man dog sat on roof quickly house river city old new red blue green ran jumps over lazy fox".split()
N_ITEMS = 24


def _phrase(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def write_task(folder: Path) -> tuple[Path, list[dict]]:
    """A JSONL file of multiple-choice items (contexts of 3-9 words; four distinct endings of 1-2 words,
    so the raw-sum choice is not always the shortest; some contexts end in "." and some endings
    start with "," to cross the tokenisation boundary) and an lm-eval task YAML reading it."""
    rng = random.Random(7)
    records = []
    for i in range(N_ITEMS):
        ctx = _phrase(rng, 3, 9) + ("." if i % 3 == 0 else "")
        endings = []
        while len(endings) < 4:  # distinct: two equal endings tie, and a tie's argmax is rounding's choice
            ending = ("," if (i + len(endings)) % 5 == 0 else "") + _phrase(rng, 1, 2)
            endings += [ending] if ending not in endings else []
        records.append({"key": f"r{i}", "ctx": ctx, "endings": endings, "gold": rng.randrange(4)})
    data = folder / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    # lm-eval's multiple_choice: the continuation is target_delimiter (" ") + choice after
    # doc_to_text, as our suite scores " " + ending after the context
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{ctx}}"\n'
        "doc_to_choice: endings\n"
        "doc_to_target: gold\n"
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n")
    return data, records


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    folder = tmp_path_factory.mktemp("lm_eval_task")
    data, records = write_task(folder)
    return folder, data, records


@pytest.fixture(scope="module")
def tiny_model():
    from smf_lightning.models.tiny import tiny_qwen2

    return tiny_qwen2(seed=0)


def _rng_states() -> tuple:
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _same_states(a: tuple, b: tuple) -> bool:
    return (a[0] == b[0] and a[1][0] == b[1][0] and np.array_equal(a[1][1], b[1][1]) and a[1][2:] == b[1][2:]
            and torch.equal(a[2], b[2]))


def test_lm_eval_acc_equals_our_multiple_choice_acc_item_by_item(task_dir, tiny_model, tiny_tok):
    folder, data, records = task_dir
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    states = _rng_states()
    out = evaluate_with_lm_eval(tiny_model, tiny_tok, [TASK], include_path=str(folder), batch_size=8, bootstrap_iters=0)
    # the global RNGs are as before: lm-eval neither reseeded them nor drew from them
    assert _same_states(states, _rng_states())

    suite = build_custom_suite("mine", {"kind": "multiple_choice", "source": str(data), "n_items": N_ITEMS,
                                        "fields": {"id": "key", "context": "ctx", "choices": "endings", "label": "gold"}},
                               seed=0)
    ours = suite.evaluate(tiny_model, tiny_tok, batch_size=8)
    our_acc = dict(zip(suite.last_items["id"], suite.last_items["acc"]))
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(N_ITEMS))
    # Both are the argmax of the summed log-likelihood of " " + ending after the context: the
    # same hit on every item, hence the same accuracy (to the last bit: a mean of the same 0/1s).
    assert [s["acc"] for s in samples] == [our_acc[r["key"]] for r in records]
    assert out["results"][TASK]["acc,none"] == ours["acc"]
    assert 0 < ours["acc"] < 1  # not a degenerate agreement

    # Item by item, the log-likelihoods agree up to float rounding: lm-eval tokenises context +
    # continuation together and splits at the context's tokens, we tokenise them apart; the
    # byte-level pre-tokenizer never merges across " " + ending, so the tokens are the same, and
    # the chosen index is the same on every item.
    contexts = [r["ctx"] for r in records]
    sums = [[c.sum_logprob for c in item] for item in
            score_choices(tiny_model, tiny_tok, contexts, [[" " + e for e in r["endings"]] for r in records], 8)]
    theirs = [[ll for ll, _ in s["filtered_resps"]] for s in samples]
    assert np.allclose(theirs, sums, rtol=0, atol=1e-3)
    assert [int(np.argmax(t)) for t in theirs] == [int(np.argmax(s)) for s in sums]
    top2 = np.sort(sums, axis=1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 10 * 1e-3  # no near-tie: the same argmax is not luck of rounding
    # acc_norm legitimately differs: lm-eval divides by the characters of the choice, we by
    # those of " " + choice (one more each); checked here with lm-eval's own normalisation
    lm_norm = [float(int(np.argmax(np.array(t) / [len(e) for e in r["endings"]])) == r["gold"])
               for t, r in zip(theirs, records)]
    assert [s["acc_norm"] for s in samples] == lm_norm


def test_a_run_records_lm_eval_beside_ours(task_dir, tmp_path):
    """A tiny CLI run: lm_eval.json with the first and last points, per-document files, and
    summary.json's ``lm_eval.<task>.<metric>`` before / after (as ``heldout``)."""
    import subprocess

    folder, _, _ = task_dir
    root = Path(__file__).resolve().parents[1]
    args = ["experiment=tiny", "logger.wandb.mode=disabled", "callbacks.plots=false", "callbacks.cache_before_eval=false",
            "callbacks.suites_at=first_last",
            f"callbacks.lm_eval.tasks=[{TASK}]", f"callbacks.lm_eval.include_path={folder}", "callbacks.lm_eval.limit=8",
            f"hydra.run.dir={tmp_path}"]
    res = subprocess.run([sys.executable, "-m", "smf_lightning.train", *args], cwd=root, capture_output=True, text=True,
                         timeout=600, env={**__import__("os").environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"})
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads((tmp_path / "lm_eval.json").read_text())
    assert record["tasks"] == [TASK] and record["limit"] == 8
    assert [p["label"] for p in record["points"]] == ["before", "after task 1"]
    for p in record["points"]:
        assert p["documents"] == {TASK: 8} and {"acc", "acc_norm"} <= set(p["results"][TASK])
        assert (tmp_path / "items" / p["label"].replace(" ", "_") / f"lm_eval_{TASK}.csv").read_text().count("\n") == 9
    summary = json.loads((tmp_path / "summary.json").read_text())
    acc = summary["lm_eval"][TASK]["acc"]
    assert acc["before"] == record["points"][0]["results"][TASK]["acc"]
    assert acc["after"] == record["points"][1]["results"][TASK]["acc"]
    assert acc["change"] == acc["after"] - acc["before"]
    assert {"fact_recall", "heldout", "acc"} <= set(summary)  # ours, still there


def _cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose("train", overrides=["experiment=tiny", "logger.wandb.mode=disabled",
                                           f"paths.output_dir={tmp_path}", *overrides])


@pytest.mark.parametrize("overrides,expect", [
    (["callbacks.lm_eval.tasks=hellaswag"], "use a list of lm-eval task names"),
    (["callbacks.lm_eval.tasks=[hellaswag]", "callbacks.lm_eval.include_path=/no/such/folder"], "does not exist"),
    (["callbacks.lm_eval.tasks=[no_such_task_xyz]"], "lm-eval knows no task 'no_such_task_xyz'"),
    (["callbacks.lm_eval.tasks=[hellaswag]", "callbacks.lm_eval.limit=0"], "callbacks.lm_eval.limit=0"),
])
def test_bad_lm_eval_config_fails_before_the_model_loads(overrides, expect, tmp_path, monkeypatch):
    from smf_lightning import train
    from smf_lightning.stages import continual

    monkeypatch.setattr(continual, "load_model", lambda cfg: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match=expect):
        train.run(_cfg(tmp_path, *overrides))


def test_lm_eval_not_installed_says_how_to_install(tmp_path, monkeypatch):
    import importlib.util

    from smf_lightning import train
    from smf_lightning.stages import continual

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else find_spec(name, *a))
    monkeypatch.setattr(continual, "load_model", lambda cfg: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match=r"pip install \.\[lm_eval\]"):
        train.run(_cfg(tmp_path, "callbacks.lm_eval.tasks=[hellaswag]"))
    # off (the default): nothing needs lm-eval
    from smf_lightning.stages.continual import check_config

    check_config(_cfg(tmp_path))
