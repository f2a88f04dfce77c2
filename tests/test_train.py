"""The training front door on the tiny model: the real CLI end to end (single run and a
2-job multirun), the output contract of docs/design.md §8, resume after a kill, bad overrides,
and SMF's core invariant (only selected memory rows move)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {
    "method", "selector", "top_t", "model", "n_tasks", "facts_per_task", "fact_recall",
    "fact_recall_heldout_template", "fact_recall_contains", "acc", "bwt", "forgetting", "heldout", "steps",
    "seconds_per_step", "peak_rss_mb", "trainable_params", "updated_params_per_step",
}
TINY = ["experiment=tiny", "logger.wandb.mode=offline"]


def cli(args: list[str], extra_env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_SILENT="true", HYDRA_FULL_ERROR="0", PYTHONUNBUFFERED="1", **(extra_env or {}))
    return subprocess.run([sys.executable, "-m", "smf_lightning.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900, **kw)


def check_contract(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary), SUMMARY_KEYS - set(summary)
    assert summary["n_tasks"] == 2 and summary["facts_per_task"] == 2
    ids = summary["data"]["task_fact_ids"]  # the stream, in order: 2 tasks x 2 distinct facts
    assert [len(t) for t in ids] == [2, 2] and len({i for t in ids for i in t}) == 4
    assert summary["model"]["source"] == "tiny"
    # an exact-match answer always contains its alias
    assert summary["fact_recall"] <= summary["fact_recall_contains"] <= 1
    assert set(summary["heldout"]) == {"nq_open", "hellaswag", "gsm8k", "lambada"}
    for h in summary["heldout"].values():
        assert {"metric", "before", "after", "rel_change"} <= set(h)
    # 2 tasks x 2 facts x 4 training templates / batch 2 x 2 passes = 8 steps per task
    assert summary["steps"] == 16
    rows = list(csv.reader((run_dir / "accuracy_matrix.csv").open()))
    assert rows[0] == ["eval_point", "task_0", "task_1"]
    assert [r[0] for r in rows[1:]] == ["before", "after task 0", "after task 1"]
    assert rows[2][2] == ""  # task 1 not evaluated after task 0 (lower triangle only)
    heldout = list(csv.DictReader((run_dir / "heldout.csv").open()))
    assert {r["eval_point"] for r in heldout} == {"0", "1", "2"}
    assert (run_dir / "csv" / "metrics.csv").is_file()
    for png in ("accuracy_matrix.png", "forgetting_curves.png", "slot_stats.png"):
        assert (run_dir / png).stat().st_size > 1000, png
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    return summary


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    res = cli([*TINY, f"hydra.run.dir={run_dir}"])
    assert res.returncode == 0, res.stderr[-3000:]
    (run_dir / "cli_output.txt").write_text(res.stdout + res.stderr)
    return run_dir


def test_cli_run_writes_output_contract(tiny_run):
    s = check_contract(tiny_run)
    assert s["method"] == "smf" and s["selector"] == "kl" and s["top_t"] == 16
    # per-fact selection: a step updates at most top_t rows per fact of its batch (<= 2 facts) and
    # memory layer (2 layers, v_dim 64)
    assert 0 < s["updated_params_per_step"] <= 2 * 16 * 64 * 2
    assert s["trainable_params"] == 2 * 256 * 64  # the two value tables
    # the checkpoint holds only trainable weights, not the frozen base
    ckpt = torch.load(tiny_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert set(ckpt["state_dict"]) == {"model.model.layers.1.mlp.memory.values.weight", "model.model.layers.2.mlp.memory.values.weight"}
    assert list((tiny_run / "wandb").glob("offline-run-*")), "wandb offline run missing"


def test_run_output_has_no_lightning_noise(tiny_run):
    out = (tiny_run / "cli_output.txt").read_text()
    assert "in eval mode at the start of training" not in out  # the model is put in train mode before fit
    assert "litlogger" not in out  # Lightning's advertisement is filtered from the run log
    assert "evaluation 'before'" in out  # the log itself still comes through


def test_multirun_sweep_writes_summary_and_plot(tmp_path):
    res = cli(["-m", *TINY, "method.selector=kl,tfidf", f"hydra.sweep.dir={tmp_path}"])
    assert res.returncode == 0, res.stderr[-3000:]
    for job in ("0", "1"):
        check_contract(tmp_path / job)
    rows = list(csv.DictReader((tmp_path / "sweep_summary.csv").open()))
    assert [r["selector"] for r in rows] == ["kl", "tfidf"]
    assert (tmp_path / "learning_vs_forgetting.png").stat().st_size > 1000
    # each job closed its own wandb run
    runs = [p for job in ("0", "1") for p in (tmp_path / job / "wandb").glob("offline-run-*")]
    assert len(runs) == 2
    # experiments/report.py turns the sweep directory into the report tables, one row per job
    sys.path.insert(0, str(ROOT / "experiments"))
    import report

    table_rows, table = report.report(tmp_path, "headline")
    assert [(r["row"], r["selector"]) for r in table_rows] == [("0", "kl"), ("1", "tfidf")]
    assert [r["recall"] for r in table_rows] == [json.loads((tmp_path / j / "summary.json").read_text())["fact_recall"]
                                                 for j in ("0", "1")]
    assert "| 0 | adam lr" in table and "| 1 | adam lr" in table


def test_suites_first_last_skips_middle_points(tmp_path):
    """callbacks.suites_at=first_last: held-out suites before training and after the last task
    only; fact recall still after every task; the summary is the same shape."""
    res = cli([*TINY, "callbacks.suites_at=first_last", "callbacks.checkpoint.enabled=false", f"hydra.run.dir={tmp_path}"])
    assert res.returncode == 0, res.stderr[-3000:]
    heldout = list(csv.DictReader((tmp_path / "heldout.csv").open()))
    assert {r["eval_point"] for r in heldout} == {"0", "2"}
    rows = list(csv.reader((tmp_path / "accuracy_matrix.csv").open()))
    assert [r[0] for r in rows[1:]] == ["before", "after task 0", "after task 1"]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert set(s["heldout"]) == {"nq_open", "hellaswag", "gsm8k", "lambada"}
    assert (tmp_path / "forgetting_curves.png").stat().st_size > 1000
    assert not (tmp_path / "checkpoints").exists()


def test_a_run_without_held_out_suites_writes_fact_recall_only(tmp_path):
    """Every suite removed (fact recall only, e.g. continuing a model cheaply): no suite is scored and
    heldout.csv is a header without rows."""
    res = cli([*TINY, *(f"~data.suites.{k}" for k in ("nq_open", "hellaswag", "gsm8k", "lambada")), "callbacks.checkpoint.enabled=false", f"hydra.run.dir={tmp_path}"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert list(csv.DictReader((tmp_path / "heldout.csv").open())) == []
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["heldout"] == {} and 0 <= s["fact_recall"] <= 1


def assert_same_final_results(run_dir: Path, ref_dir: Path) -> None:
    """A resumed run's final files equal the uninterrupted run's."""
    s = check_contract(run_dir)
    ref = json.loads((ref_dir / "summary.json").read_text())
    assert s["accuracy_matrix"] == ref["accuracy_matrix"]
    assert s["accuracy_matrix_heldout_template"] == ref["accuracy_matrix_heldout_template"]
    assert s["fact_recall_contains"] == ref["fact_recall_contains"]
    assert s["steps"] == ref["steps"]
    for suite, h in ref["heldout"].items():
        assert s["heldout"][suite]["after"] == pytest.approx(h["after"], rel=1e-5), suite
    assert (run_dir / "accuracy_matrix.csv").read_text() == (ref_dir / "accuracy_matrix.csv").read_text()


def test_resume_after_kill_gives_same_results(tiny_run, tmp_path):
    """debug.stop_after_task=0 SIGKILLs the run right after task 0's checkpoint is on disk: a
    kill point that does not depend on the machine's speed."""
    first = tmp_path / "killed"
    res = cli([*TINY, f"hydra.run.dir={first}", "debug.stop_after_task=0"])
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert not (first / "summary.json").exists()
    # completed task 0 results survived the kill
    rows = list(csv.reader((first / "accuracy_matrix.csv").open()))
    assert [r[0] for r in rows[1:]] == ["before", "after task 0"]
    ckpt = first / "checkpoints" / "last.ckpt"
    assert not ckpt.with_suffix(".ckpt.tmp").exists()

    resumed = tmp_path / "resumed"
    res = cli([*TINY, f"hydra.run.dir={resumed}", f"ckpt_path={ckpt}"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_final_results(resumed, tiny_run)


@pytest.mark.parametrize("signame,code", [("TERM", 128 + signal.SIGTERM), ("INT", 128 + signal.SIGINT)])
def test_stop_signal_keeps_results_prints_resume_command_and_resumes(tiny_run, tmp_path, signame, code):
    """A SIGTERM / SIGINT (sent by the run to itself after optimizer step 10: task 1's second
    step, a deterministic point) stops the run at once: exit 128 + signal, task 0's results and
    checkpoint intact, no further step taken, the exact resume command printed; running that
    command in the same run folder (as a sweep job resumes) gives the uninterrupted run's final files and
    its metrics.csv: task 0's logged steps kept, task 1's steps logged once; wandb logs under the same run id."""
    first = tmp_path / "stopped"
    res = cli([*TINY, f"hydra.run.dir={first}", f"debug.signal={signame}", "debug.signal_at_step=10"])
    out = res.stdout + res.stderr
    assert res.returncode == code, out[-3000:]
    assert f"received SIG{signame}" in out
    assert not (first / "summary.json").exists()
    rows = list(csv.reader((first / "accuracy_matrix.csv").open()))
    assert [r[0] for r in rows[1:]] == ["before", "after task 0"]
    ckpt = first / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"] == 0  # task 0's checkpoint
    assert max(train_losses(first)[0]) <= 10  # stopped right there: no step after the signal
    # the printed command, run as printed (python -> this interpreter), finishes the stream
    line = next(ln for ln in out.splitlines() if "smf_lightning.train" in ln and "ckpt_path=" in ln)
    args = line.split("smf_lightning.train", 1)[1].split()
    assert f"ckpt_path={ckpt}" in args and "debug.signal=" + signame not in line
    res = cli([*args, f"hydra.run.dir={first}"])  # in the same folder, as a sweep job resumes
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_final_results(first, tiny_run)
    steps, losses = train_losses(first)
    ref_steps, ref_losses = train_losses(tiny_run)
    assert steps == ref_steps and len(set(steps)) == len(steps)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    # the resumed run logged under the interrupted run's wandb id, the one its checkpoint keeps
    # (offline: a second offline-run-<time>-<id> folder; one folder if both started in the same second)
    runs = sorted((first / "wandb").glob("offline-run-*"))
    kept = torch.load(ckpt, map_location="cpu", weights_only=True)["wandb_ids"]
    assert runs and {r.name.rsplit("-", 1)[1] for r in runs} == set(kept) and len(kept) == 1, (runs, kept)


def train_losses(run_dir: Path) -> tuple[list[int], list[float]]:
    rows = [r for r in csv.DictReader((run_dir / "csv" / "metrics.csv").open()) if r.get("train/loss")]
    return [int(r["step"]) for r in rows], [float(r["train/loss"]) for r in rows]


@pytest.mark.parametrize(
    "override,expect",
    [
        ("method.selector=bogus", "method.selector"),
        ("method.top_t=0", "method.top_t"),
        ("model.memory.n_slots=1000", "model.memory.n_slots"),
        ("model.memory.mode=sideways", "model.memory.mode"),
        ("method=bogus", "method"),
        ("callbacks.suites_at=sometimes", "callbacks.suites_at"),
        ("method.prefix_cache=-1", "method.prefix_cache"),
        ("method.count_by=tokens", "method.count_by"),
        ("callbacks.intervals.resamples=-1", "callbacks.intervals.resamples"),
        ("callbacks.eval_prefix_cache=maybe", "callbacks.eval_prefix_cache"),
        ("model.memory.layers=[99]", "model.memory.layers"),  # the tiny model has 4 decoder layers
        ("data.loss_on=xyz", "data.loss_on"),
        ("data.heldout_templates=[nope]", "data.heldout_templates"),
        ("data.heldout_templates=[qa,q_a,answer_is,trivia,quiz]", "data.heldout_templates"),  # none left to train
        ("+data.suites.mmlu={n_items:4}", "data.suites.mmlu"),
        ("+data.background.wikipedia=4", "data.background.wikipedia"),
        ("trainer.devices=2", "trainer.devices"),
        ("trainer.strategy=ddp", "trainer.strategy"),
        ("+trainer.max_epochs=5", "trainer.max_epochs"),  # the stream sets it (stages/continual.py)
        ("debug.stop_after_task=5", "debug.stop_after_task"),
        ("debug.signal=HUP", "debug.signal"),
    ],
)
def test_bad_override_fails_fast_with_clear_message(override, expect, tmp_path):
    res = cli([*TINY, override, f"hydra.run.dir={tmp_path}"])
    out = res.stdout + res.stderr
    assert res.returncode == 2 or (override.startswith("method=") and res.returncode != 0), out[-2000:]
    assert expect in out
    assert "loading model" not in out  # rejected before any model is loaded


@pytest.mark.real
def test_real_model_layer_out_of_range_fails_before_loading(tmp_path):
    """The offline Qwen2.5-class model's 24 layers come from the catalogue, not from loading it."""
    res = cli(["experiment=facts_seq_quick", "model.memory.layers=[24]", f"hydra.run.dir={tmp_path}"])
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-2000:]
    assert "model.memory.layers" in out and "0..23" in out and "loading model" not in out


def test_smf_changes_only_selected_value_rows(tiny_tok):
    import lightning as L

    from smf_lightning.memory import MemoryConfig, memory_layers, retrofit
    from smf_lightning.methods import SparseMemoryFinetune
    from smf_lightning.models.tiny import tiny_qwen2
    from smf_lightning.selection.background import BackgroundStats

    model = retrofit(tiny_qwen2(), MemoryConfig(layers=[1, 2], n_slots=256, heads=2, knn=4, k_dim=16))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bg = {i: BackgroundStats.empty(256) for i in (1, 2)}
    for stats in bg.values():
        stats.add_batch(torch.bincount(torch.arange(0, 256, 3), minlength=256))
    module = SparseMemoryFinetune(model, {"selector": "kl", "top_t": 8, "optimizer": "adam", "lr": 0.1}, background=bg)
    texts = ["Question: Who wrote Hamlet?\nAnswer: Shakespeare", "Q: What is 2+2? A: 4"]
    enc = tiny_tok(texts, return_tensors="pt", padding=True)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    batch = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}
    selected: dict[int, set] = {1: set(), 2: set()}

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            for i, s in pl_module.last_selection.items():
                assert s.numel() <= 8
                selected[i] |= set(s.tolist())

    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Record()])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch] * 4, batch_size=None))
    for name, p in model.named_parameters():
        if not name.endswith("values.weight"):
            assert torch.equal(p, before[name]), f"{name} changed"
    for i, mem in memory_layers(model).items():
        w, w0 = mem.values.weight.detach(), before[f"model.layers.{i}.mlp.memory.values.weight"]
        changed = set(torch.nonzero((w != w0).any(1)).squeeze(1).tolist())
        assert changed and changed <= selected[i]


def test_missing_checkpoint_fails_fast(tmp_path):
    res = cli([*TINY, f"hydra.run.dir={tmp_path}", f"ckpt_path={tmp_path}/nope.ckpt"])
    assert res.returncode != 0
    assert "ckpt_path" in res.stdout + res.stderr and "does not exist" in res.stdout + res.stderr


def test_loss_on_kept_logits_equals_full_logits_loss(tiny_tok):
    """next_token_nll sends only labelled columns through the LM head; the loss and the
    gradients equal those of full logits, also for a model without `logits_to_keep`."""
    from smf_lightning.methods.base import next_token_nll
    from smf_lightning.models.tiny import tiny_qwen2

    model = tiny_qwen2()
    enc = tiny_tok(["Question: Who wrote Hamlet?\nAnswer: Shakespeare", "Q: What is 2+2? A: 4"],
                   return_tensors="pt", padding=True)
    labels = torch.full_like(enc.input_ids, -100)
    labels[0, -3:] = enc.input_ids[0, -3:]  # answer-only loss on different columns per row
    n1 = int(enc.attention_mask[1].sum())
    labels[1, n1 - 1] = enc.input_ids[1, n1 - 1]
    batch = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}

    def reference():
        logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100, reduction="sum")

    class NoKeep(torch.nn.Module):  # a forward without logits_to_keep (e.g. a custom wrapper)
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    grads = []
    for loss_fn in (reference, lambda: next_token_nll(model, batch)[0], lambda: next_token_nll(NoKeep(model), batch)[0]):
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert next_token_nll(model, batch)[1] == 4
    for loss, g in grads[1:]:
        torch.testing.assert_close(loss, grads[0][0], rtol=1e-5, atol=1e-6)
        for a, b in zip(g, grads[0][1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_summary_counts_the_memory_capacity_the_stream_used(tiny_run):
    """SMF's capacity accounting: per task and memory layer the slots written, owned and still free.
    With exclude_owned a task writes only slots no earlier task owns and never a hub slot, so the
    counts add up exactly."""
    s = json.loads((tiny_run / "summary.json").read_text())
    cap = s["capacity"]
    assert cap["exclude_owned"] is True and set(cap["layers"]) == {"1", "2"}
    for layer, now in cap["layers"].items():
        tasks = [e for e in cap["per_task"] if str(e["layer"]) == layer]
        assert [e["task"] for e in tasks] == [0, 1]
        assert tasks[0]["owned"] == tasks[0]["written"] and tasks[1]["owned"] == tasks[0]["owned"] + tasks[1]["written"]
        for e in tasks:
            assert e["free"] == e["n_slots"] - e["hubs"] - e["owned"] and 0 < e["per_fact"] <= s["top_t"]
        assert now["owned"] == tasks[-1]["owned"] and now["hubs"] == 26  # ceil(0.1 x 256)
    rows = list(csv.DictReader((tiny_run / "slot_stats.csv").open()))
    last = {r["layer"]: r for r in rows}  # the last step of each layer
    assert {k: int(r["owned_slots"]) for k, r in last.items()} == {k: v["owned"] for k, v in cap["layers"].items()}
    assert "capacity after task 1 (memory layer 1)" in (tiny_run / "cli_output.txt").read_text()


def test_a_stream_that_cannot_fit_the_memory_is_refused_before_loading(tmp_path):
    # tiny: 256 slots per layer, 26 of them hubs, top-16 per fact, slots never reused: 14 facts fit. The
    # default method.budget=stream may lower top_t down to min(method.min_top_t=100, top_t=16) = 16 only
    res = cli([*TINY, "data.n_tasks=8", "data.facts_per_task=2", f"hydra.run.dir={tmp_path}"])
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-2000:]
    assert ("even at the smallest per-fact budget method.budget=stream may spend: 8 tasks x 2 facts x "
            "min(method.min_top_t=100, method.top_t=16)=16 slots = 256 slots per memory layer, but only 230 can be "
            "selected (model.memory.n_slots=256 minus 26 hub slots") in out
    assert "At this budget 14 facts fit" in out and "loading model" not in out and "Traceback" not in out
    from hydra import compose, initialize_config_dir

    from smf_lightning.config import ConfigError, validate_config
    from smf_lightning.train import conf_dir

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        stream = ["experiment=tiny", "data.n_tasks=8", "data.facts_per_task=2"]
        with pytest.raises(ConfigError, match="8 tasks x 2 facts x method.top_t=16 slots = 256 slots per memory layer"):
            validate_config(compose("train", overrides=[*stream, "method.budget=fixed"]))
        for fits in (["data.facts_per_task=1", "data.n_tasks=14"], ["method.exclude_owned=false"], ["method.top_t=14"],
                     ["method.min_top_t=14"]):
            validate_config(compose("train", overrides=[*stream, *fits]))


def test_capacity_budget_stream_fits_a_stream_the_fixed_budget_cannot(tmp_path):
    """method.budget=stream on the tiny memory: 4 facts (one per task) at method.top_t=64 need 256 slots
    of a layer's 230 selectable, so budget=fixed refuses the stream; stream gives every fact 230 // 4 = 57.
    The run records that budget (the one the config stage resolved), no fact owns more than 57 rows
    of a layer, no row is owned by two facts (exclude_owned), and summary.json's per-fact counts are
    the ledger's."""
    from hydra import compose, initialize_config_dir

    from smf_lightning.config import ConfigError, validate_config
    from smf_lightning.memory.ledger import FactLedger
    from smf_lightning.methods import method_config
    from smf_lightning.methods.smf import stream_budget
    from smf_lightning.train import conf_dir

    plan = ["data.n_tasks=4", "data.facts_per_task=1", "method.top_t=64", "method.min_top_t=8"]
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        with pytest.raises(ConfigError, match="4 tasks x 1 facts x method.top_t=64 slots = 256 slots per memory layer"):
            validate_config(compose("train", overrides=["experiment=tiny", *plan, "method.budget=fixed"]))
        config = method_config(compose("train", overrides=["experiment=tiny", *plan]).method)
    res = cli([*TINY, *plan, "callbacks.suites_at=first_last", f"hydra.run.dir={tmp_path}"])
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    # logged twice, as a warning (top_t lowered): by the config stage before the model loads, and by the
    # method when training starts
    assert out.count("[WARNING] - slot budget (method.budget=stream): 57 slots per fact and memory layer for 4 "
                     "planned facts: 230 selectable = 256 slots - 26 hubs - 0 owned before the stream - 0 reserved; "
                     "method.top_t=64 lowered to fit the stream") == 2
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["capacity"]["budget"] == stream_budget(config, 256, 4, 1).to_dict()
    assert s["capacity"]["budget"]["top_t"] == 57 and s["top_t"] == 64  # top_t: the configured one
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ledger = FactLedger.from_state_dict(ckpt["fact_ledger"])
    assert len(ledger.facts) == 4
    for layer in (1, 2):
        rows = [e.rows.get(layer, torch.zeros(0, dtype=torch.long)) for e in ledger.facts.values()]
        sizes = sorted(int(r.numel()) for r in rows)
        assert 0 < sizes[-1] <= 57
        assert int(torch.unique(torch.cat(rows)).numel()) == sum(sizes)  # no row owned twice
        per_fact = s["capacity"]["slots_per_fact"][str(layer)]
        assert per_fact == {"facts": 4, "min": sizes[0], "median": (sizes[1] + sizes[2]) / 2, "max": sizes[-1]}
        assert s["capacity"]["layers"][str(layer)]["owned"] == sum(sizes)
