"""The updated model as a product (docs/usage.md, "Using the updated model"), on tiny runs: the
fact ledger a run records (memory/ledger.py), opening a run or an export, full and delta exports
(same logits, a transformers pipeline, the base checked), forgetting facts, continuing from an
export, and asking questions as the evaluation asks them."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smf_lightning.data.facts import Fact
from smf_lightning.errors import ConfigError
from smf_lightning.memory import MemoryConfig, ProductKeyMemory, memory_layers
from smf_lightning.memory.ledger import FactLedger, row_tensors

ROOT = Path(__file__).resolve().parents[1]
# the tiny experiment with the recipe's read gate, so write keys are part of every check
TINY = ["experiment=tiny", "logger.wandb.mode=disabled", "callbacks.plots=false", "model.memory.read_gate=0.5"]


def run_module(module: str, *args: str, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_SILENT="true", HYDRA_FULL_ERROR="0", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, **kw)


def train(run_dir: Path, *overrides: str) -> Path:
    res = run_module("smf_lightning.train", *TINY, f"hydra.run.dir={run_dir}", *overrides)
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir


def cli(main, *args, capsys=None) -> tuple[int, str, str]:
    """An in-process command's exit code, stdout and stderr."""
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr() if capsys is not None else None
    return code, out.out if out else "", out.err if out else ""


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(folder)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


@torch.no_grad()
def logits(model, tokenizer, prompts: list[str]) -> list[torch.Tensor]:
    return [model(**tokenizer(p, return_tensors="pt")).logits for p in prompts]


def read_rows(model, tokenizer, prompt: str) -> dict[int, set[int]]:
    """Memory layer -> every row any position of ``prompt`` reads (before the read gate)."""
    with torch.no_grad():
        model(**tokenizer(prompt, return_tensors="pt"))
    return {i: set(m.last_access.indices.reshape(-1).tolist()) for i, m in memory_layers(model).items()}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def opened(run_dir):
    from smf_lightning.product.open import load_run

    return load_run(run_dir)


@pytest.fixture(scope="module")
def exports(run_dir, tmp_path_factory) -> dict[str, Path]:
    from smf_lightning.export import main

    out = tmp_path_factory.mktemp("exports")
    for kind, extra in (("full", []), ("delta", ["--delta"])):
        code, _, _ = cli(main, run_dir, out / kind, *extra)
        assert code == 0
    return {"full": out / "full", "delta": out / "delta"}


def stream_prompts(opened) -> list[str]:
    dm = opened.datamodule
    return [dm.templates[t].prompt(f.question) for j in range(dm.n_tasks) for f in dm.task_facts(j) for t in dm.templates]


# ---- 1. the fact ledger ------------------------------------------------------------------------
def test_ledger_captures_new_rows_once_and_attributes_them_per_fact_or_per_step(tmp_path):
    mem = ProductKeyMemory(8, MemoryConfig(layers=[0], n_slots=16, heads=1, knn=2, k_dim=4, read_gate=0.5), layer_idx=0)
    with torch.no_grad():
        mem.values.weight[3] = 1.0  # a row that was not zero before the stream
        mem.write_mass[3] = 0.5
    ledger = FactLedger()
    ledger.record_step({0: mem}, {0: torch.tensor([5, 3])}, ["a", "b", "a"], task=0,
                       fact_slots={"a": {0: torch.tensor([3])}, "b": {0: torch.tensor([5, 7])}})
    assert ledger.facts["a"].rows[0].tolist() == [3] and ledger.facts["b"].rows[0].tolist() == [5]
    with torch.no_grad():
        mem.values.weight[[3, 5]] = 2.0  # the step moved them
    ledger.record_step({0: mem}, {0: torch.tensor([3, 7])}, ["b"], task=1)  # select_per=step: every batch fact
    assert ledger.facts["b"].rows[0].tolist() == [3, 5, 7] and ledger.facts["b"].task == 0
    assert ledger.captured_rows(0).tolist() == [3, 5, 7]
    pre = ledger.pre_content(0, mem, torch.tensor([7, 3, 5]))
    assert torch.equal(pre["values"][:, 0], torch.tensor([0.0, 1.0, 0.0]))  # row 3 kept its first capture
    assert torch.equal(pre["write_mass"][:, 0], torch.tensor([0.0, 0.5, 0.0]))
    assert ledger.state_dict()["pre"][0]["values.rows"].tolist() == [3]  # zero rows are not stored

    torch.save(ledger.state_dict(), tmp_path / "ledger.pt")  # as in a checkpoint
    ledger.write(tmp_path)  # as in an export
    for copy in (FactLedger.from_state_dict(torch.load(tmp_path / "ledger.pt", weights_only=True)),
                 FactLedger.read(tmp_path)):
        assert {f: e.rows[0].tolist() for f, e in copy.facts.items()} == {"a": [3], "b": [3, 5, 7]}
        for name, t in copy.pre_content(0, mem, torch.tensor([7, 3, 5])).items():
            assert torch.equal(t, pre[name])
    assert ledger.continued().first_task == 1

    ledger.remove(["a"])  # row 3 is still b's: its pre-stream content stays
    assert ledger.captured_rows(0).tolist() == [3, 5, 7]
    ledger.remove(["b"])
    assert ledger.captured_rows(0).numel() == 0 and not ledger.facts


def test_a_run_records_every_updated_row_with_its_facts_and_pre_stream_content(run_dir, opened):
    from smf_lightning.methods import SparseMemoryFinetune
    from smf_lightning.models.tiny import tiny_qwen2
    from smf_lightning.memory import retrofit

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ledger = FactLedger.from_state_dict(ckpt["fact_ledger"])
    summary = json.loads((run_dir / "summary.json").read_text())
    tasks = summary["data"]["task_fact_ids"]
    assert {f: e.task for f, e in ledger.facts.items()} == {f: j for j, ids in enumerate(tasks) for f in ids}
    dm = opened.datamodule
    for j in range(dm.n_tasks):
        for f in dm.task_facts(j):
            assert (ledger.facts[f.id].question, ledger.facts[f.id].answer) == (f.question, f.answer)
    for i, mem in memory_layers(opened.model).items():
        owned = set(ledger.owned_rows(i).tolist())
        updated = set(torch.nonzero(mem.values.weight.detach().ne(0).any(1)).squeeze(1).tolist())  # additive: from 0
        assert updated and updated <= owned  # every updated row is some fact's
        assert set(mem.written_rows().tolist()) <= owned
        captured = ledger.captured_rows(i)
        assert owned <= set(captured.tolist())
        for name, pre in ledger.pre_content(i, mem, captured).items():  # zero before the stream
            assert torch.equal(pre, torch.zeros_like(pre)), name

    # the checkpoint hooks: what is saved is what a resumed run restores
    model = retrofit(tiny_qwen2(), MemoryConfig(**opened.model.memory_config.to_dict()))
    module = SparseMemoryFinetune(model, {"selector": "kl", "top_t": 16, "optimizer": "adam", "lr": 0.1})
    module.on_load_checkpoint(ckpt)
    saved = {"state_dict": {}}
    module.on_save_checkpoint(saved)
    assert _same(saved["fact_ledger"], ckpt["fact_ledger"])


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


# ---- 2-3. open, export, load -------------------------------------------------------------------
def test_full_and_delta_exports_load_to_the_runs_model(opened, exports):
    import smf_lightning

    prompts = stream_prompts(opened)
    ref = logits(opened.model, opened.tokenizer, prompts)
    for kind, base in (("full", None), ("delta", None), ("delta", "tiny")):
        model = smf_lightning.load(exports[kind], base=base)
        assert not model.training and type(model).__name__ == "Qwen2ForCausalLM"
        for a, b in zip(logits(model, opened.tokenizer, prompts), ref):
            assert torch.equal(a, b), kind
        for i, mem in memory_layers(model).items():
            for name, t in row_tensors(mem).items():
                assert torch.equal(t, row_tensors(memory_layers(opened.model)[i])[name]), (kind, i, name)
    for path in exports.values():  # safetensors, JSON and YAML only: nothing to unpickle
        assert {f.suffix for f in path.iterdir()} <= {".safetensors", ".json", ".yaml"}
    full, delta = (json.loads((exports[k] / "export.json").read_text()) for k in ("full", "delta"))
    assert delta["kind"] == "delta" and delta["bytes"] < full["bytes"] / 4
    moved = {str(i): int(m.values.weight.ne(0).any(1).sum()) for i, m in memory_layers(opened.model).items()}
    assert delta["delta_rows"] == moved  # the rows that differ from the starting (zero) rows, no more


def test_open_model_gives_model_tokenizer_config_and_ledger(opened, exports):
    from smf_lightning.product.open import open_model

    for kind in ("full", "delta"):
        e = open_model(exports[kind])
        assert e.kind == kind and not e.model.training
        assert e.config.data.templates == opened.config.data.templates
        assert list(e.ledger.facts) == list(opened.ledger.facts)
        assert e.tokenizer("Question: x")["input_ids"] == opened.tokenizer("Question: x")["input_ids"]


def test_a_loaded_export_works_with_generate_and_a_pipeline(opened, exports):
    import smf_lightning
    from transformers import AutoTokenizer, pipeline

    model = smf_lightning.load(exports["full"])
    tok = AutoTokenizer.from_pretrained(exports["full"])
    prompt = stream_prompts(opened)[0]
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    out = pipe(prompt, max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert out.startswith(prompt) and len(out) > len(prompt)
    ids = tok(prompt, return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert tok.decode(generated[0], skip_special_tokens=True) == out


def test_a_delta_refuses_another_base(exports, tmp_path):
    import smf_lightning
    from smf_lightning.models.tiny import tiny_qwen2, tiny_tokenizer

    tiny_qwen2(seed=1).save_pretrained(tmp_path / "other")
    tiny_tokenizer().save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match="not the one this delta was trained from"):
        smf_lightning.load(exports["delta"], base=tmp_path / "other")


def test_bad_paths_exit_2_and_write_nothing(run_dir, exports, tmp_path, capsys):
    import shutil

    from smf_lightning.export import main

    no_ckpt = tmp_path / "no_ckpt"
    shutil.copytree(run_dir / ".hydra", no_ckpt / ".hydra")
    garbage = tmp_path / "garbage"
    shutil.copytree(run_dir / ".hydra", garbage / ".hydra")
    (garbage / ".hydra" / "config.yaml").write_text("model: [unclosed\n")
    (garbage / "checkpoints").mkdir()
    shutil.copy(run_dir / "checkpoints" / "last.ckpt", garbage / "checkpoints" / "last.ckpt")
    for source, why in ((tmp_path / "nope", "does not exist"), (no_ckpt, "no checkpoints/last.ckpt"),
                        (garbage, "cannot read"), (exports["full"], "not a run directory"),
                        (run_dir, "is not an empty directory")):
        out = exports["delta"] if why.startswith("is not an empty") else tmp_path / "out"
        before = tree_digest(out) if out.exists() else None
        code, _, err = cli(main, source, out, capsys=capsys)
        assert code == 2 and why in err and err.startswith("error: ") and err.count("\n") == 1, (why, err)
        assert (tree_digest(out) if out.exists() else None) == before, why
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage", "no_ckpt"]  # no partial export left
    res = run_module("smf_lightning.export", tmp_path / "nope", tmp_path / "out")  # the command itself
    assert res.returncode == 2 and not (tmp_path / "out").exists()
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1


# ---- 4. forget ----------------------------------------------------------------------------------
def test_forget_restores_a_facts_rows_and_nothing_else(opened, exports, tmp_path, capsys):
    import smf_lightning
    from smf_lightning.forget import main

    ledger = opened.ledger
    fact = next(iter(ledger.facts))
    mine = ledger.fact_rows([fact])
    before_export = tree_digest(exports["full"])
    code, out, _ = cli(main, exports["full"], fact, "--out", tmp_path / "full", capsys=capsys)
    assert code == 0 and fact in out
    assert tree_digest(exports["full"]) == before_export  # the input is never modified
    before = smf_lightning.load(exports["full"])
    after = smf_lightning.load(tmp_path / "full")
    mems_b, mems_a = memory_layers(before), memory_layers(after)
    for i, rows in mine.items():
        pre = ledger.pre_content(i, mems_b[i], rows)
        others = torch.ones(mems_b[i].n_slots, dtype=torch.bool)
        others[rows] = False
        for name, t in row_tensors(mems_a[i]).items():
            assert torch.equal(t[rows], pre[name]), name  # its rows hold their pre-stream content
            assert torch.equal(t[others], row_tensors(mems_b[i])[name][others]), name  # no other row moved
    # the other facts that shared a restored row are reported with their counts
    for f, e in ledger.facts.items():
        n = sum(int(torch.isin(r, mine[i]).sum()) for i, r in e.rows.items() if i in mine)
        assert (f"{f} shared {n} of its {e.n_rows()} rows" in out) == (f != fact and n > 0), f
    kept = FactLedger.read(tmp_path / "full")
    assert fact not in kept.facts and set(kept.facts) == set(ledger.facts) - {fact}

    # a prompt that reads none of the restored rows computes exactly what it did; the fact's own question does not
    tok = opened.tokenizer
    words = "the a of Paris memory one two slot fox dog capital 1925 year crane novel who what when".split()
    quiet = [w for w in words + [f"{a} {b}" for a in words[:6] for b in words[6:]]
             if all(not (rows & set(mine[i].tolist())) for i, rows in read_rows(before, tok, w).items() if i in mine)]
    assert quiet, "no candidate prompt avoids the restored rows"
    for a, b in zip(logits(before, tok, quiet), logits(after, tok, quiet)):
        assert torch.equal(a, b)
    dm = opened.datamodule
    own = dm.templates[dm.train_templates[0]].prompt(ledger.facts[fact].question)
    assert not torch.equal(*(logits(m, tok, [own])[0] for m in (before, after)))

    # a delta forgets alike; an unknown fact id changes nothing
    code, _, _ = cli(main, exports["delta"], fact, "--out", tmp_path / "delta", capsys=capsys)
    assert code == 0 and json.loads((tmp_path / "delta" / "export.json").read_text())["kind"] == "delta"
    forgot_delta = smf_lightning.load(tmp_path / "delta")
    for a, b in zip(logits(forgot_delta, tok, quiet + [own]), logits(after, tok, quiet + [own])):
        assert torch.equal(a, b)
    code, _, _ = cli(main, exports["full"], "no-such-fact", "--out", tmp_path / "unknown", capsys=capsys)
    assert code == 2 and not (tmp_path / "unknown").exists()


# ---- 5. continue --------------------------------------------------------------------------------
def test_a_run_continued_from_an_export_keeps_old_facts_rows_and_ledger(opened, exports, tmp_path):
    from smf_lightning.product.open import load_run

    # another data seed: other synthetic facts (their ids differ) in one more task
    cont = load_run(train(tmp_path / "cont", f"model.init_checkpoint={exports['full']}", "data.seed=1", "data.n_tasks=1"))
    old, new = opened.ledger, cont.ledger
    assert list(new.facts)[: len(old.facts)] == list(old.facts)
    added = [f for f in new.facts if f not in old.facts]
    assert added and {new.facts[f].task for f in added} == {1 + max(e.task for e in old.facts.values())}
    for i, mem in memory_layers(cont.model).items():
        rows = old.owned_rows(i)
        assert set(rows.tolist()).isdisjoint(new.fact_rows(added).get(i, torch.zeros(0)).tolist())
        for name, t in row_tensors(mem).items():
            assert torch.equal(t[rows], row_tensors(memory_layers(opened.model)[i])[name][rows]), name
        assert torch.equal(new.owned_rows(i), torch.unique(torch.cat([rows, new.fact_rows(added)[i]])))


def test_a_delta_export_cannot_be_continued_from(exports, tmp_path):
    from hydra import compose, initialize_config_dir

    from smf_lightning.models.build import load_model
    from smf_lightning.train import conf_dir

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, f"model.init_checkpoint={exports['delta']}"])
    with pytest.raises(ConfigError, match="continue from a full export"):
        load_model(cfg)


# ---- 6. ask ------------------------------------------------------------------------------------
def test_ask_answers_as_the_evaluation_did_and_explains_which_facts_were_read(run_dir, opened, exports, capsys):
    from smf_lightning.ask import main
    from smf_lightning.product.answer import Explainer

    dm = opened.datamodule
    first = dm.train_templates[0]
    with (run_dir / "items" / "after_task_1" / "fact_recall.csv").open() as f:  # the last evaluation's answers
        items = list(csv.DictReader(f))
    predicted = {r["id"]: r["prediction"] for r in items if r["template"] == first}
    facts = [f for j in range(dm.n_tasks) for f in dm.task_facts(j)]
    code, out, _ = cli(main, run_dir, *[f.question for f in facts], "--json", "--explain", capsys=capsys)
    assert code == 0
    replies = [json.loads(line) for line in out.splitlines()]
    assert [r["answer"] for r in replies] == [predicted[f.id] for f in facts]
    assert [r["prompt"] for r in replies] == [dm.templates[first].prompt(f.question) for f in facts]

    # --explain: a fact whose rows its own question reads is listed, with that share of the read weight of
    # every prompt position (the default) or of the answer position (--explain-at answer)
    mems = memory_layers(opened.model)
    heads = sum(m.heads for m in mems.values())
    _, out_answer, _ = cli(main, run_dir, *[f.question for f in facts], "--json", "--explain", "--explain-at", "answer",
                           capsys=capsys)
    at_answer = [json.loads(line) for line in out_answer.splitlines()]
    listed = {"prompt": 0, "answer": 0}
    for f, r, ra in zip(facts, replies, at_answer):
        with torch.no_grad():
            opened.model(**opened.tokenizer(r["prompt"], return_tensors="pt"))
        for where, reply in (("prompt", r), ("answer", ra)):
            weight = 0.0
            for i, mem in mems.items():
                acc = mem.last_access
                idx, w = (acc.indices[0], acc.weights[0]) if where == "prompt" else (acc.indices[0, -1:], acc.weights[0, -1:])
                own = torch.isin(idx, opened.ledger.facts[f.id].rows.get(i, torch.zeros(0, dtype=torch.long)))
                weight += float(w[own].sum()) / (heads * idx.shape[0])
            shares = {e["fact"]: e["share"] for e in reply["explain"]}
            if weight > 0:
                listed[where] += 1
                assert shares[f.id] == pytest.approx(weight)
            assert all(0 < s <= 1 for s in shares.values()) and len(shares) <= 5
    assert listed["answer"], "no fact's own question read its rows at the answer position"
    assert listed["prompt"] >= listed["answer"]  # the answer position is one of the prompt's positions
    assert Explainer(opened.model, opened.tokenizer, FactLedger())(r["prompt"]) == []
    with pytest.raises(ConfigError, match="explain positions"):
        Explainer(opened.model, opened.tokenizer, FactLedger(), "everywhere")

    # an export, questions from stdin: the same answers; a bad template: exit 2
    res = run_module("smf_lightning.ask", exports["delta"], "--json", input="\n".join(f.question for f in facts) + "\n")
    assert res.returncode == 0, res.stderr[-2000:]
    assert [json.loads(line)["answer"] for line in res.stdout.splitlines()] == [predicted[f.id] for f in facts]
    q_a = {r["id"]: r["prediction"] for r in items if r["template"] == "q_a"}
    code, out, _ = cli(main, exports["full"], facts[0].question, "--template", "q_a", capsys=capsys)
    assert code == 0 and out == q_a[facts[0].id].strip() + "\n"
    code, out, _ = cli(main, exports["full"], "Question: 2+2?\nAnswer:", "--raw", "--max-new-tokens", "2", capsys=capsys)
    assert code == 0 and out.count("\n") == 1
    code, _, err = cli(main, exports["full"], facts[0].question, "--template", "nope", capsys=capsys)
    assert code == 2 and "unknown template 'nope'" in err


# ---- the read-gate sweep (experiments/tools/diag_gate_sweep.py) --------------------------------
def test_gate_sweep_at_the_runs_own_threshold_reproduces_its_recall(run_dir, tmp_path):
    """At the run's own threshold the sweep asks as the evaluation asked: its trained-question
    recall is the mean of the last evaluation point's per-fact scores under the first training
    template; a threshold that is not a cosine is refused."""
    out = tmp_path / "sweep.json"
    res = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), "diag", "gate_sweep", str(run_dir),
                          "--gates", "0.5,off", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["gate"] for r in rows] == [0.5, None]
    last = sorted((run_dir / "items").glob("after_task_*"), key=lambda p: int(p.name.rsplit("_", 1)[1]))[-1]
    with open(last / "fact_recall.csv") as fh:
        recs = list(csv.DictReader(fh))
    first = recs[0]["template"]
    ems = [float(r["em"]) for r in recs if r["template"] == first]
    assert rows[0]["n_trained"] == len(ems)
    assert rows[0]["trained_em"] == pytest.approx(sum(ems) / len(ems), abs=1e-12)
    bad = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), "diag", "gate_sweep", str(run_dir),
                          "--gates", "1.5"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "not a cosine threshold" in bad.stderr


def test_the_read_diagnostic_opens_a_run_and_reports_the_trained_questions(run_dir, opened, tmp_path):
    """experiments/tools/diag_rephrased.py on a tiny run (no rephrasings, no known suite): the
    trained questions' read shares, each a share in [0, 1]."""
    out = tmp_path / "reads.json"
    res = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), "diag", "rephrased", str(run_dir),
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    trained = json.loads(out.read_text())["groups"]["trained"]
    dm = opened.datamodule
    assert trained["answer_passed"]["n"] == sum(len(dm.task_facts(j)) for j in range(dm.n_tasks))
    assert all(0.0 <= v["mean"] <= 1.0 for k, v in trained.items() if k.endswith(("_written", "_passed")))


def test_writer_keys_pass_the_reads_that_wrote_a_row_and_keep_the_mean_test_elsewhere(opened):
    """diag_gate_sweep --keys writers (WriterKeys): the rebuilt writers of a row are positions of a
    fact the ledger says owns it; a training position's read of its own fact's row passes even at
    tau 0.999 (its query is one of the row's writers); reads of rows without writers get the mean
    write key's verdict; remove() gives the layer its own gate back."""
    sys.path.insert(0, str(ROOT / "experiments" / "tools"))
    from diag_gate_sweep import WriterKeys
    from diag_rephrased import lookups

    from smf_lightning.memory.positions import loss_position_mask

    mems = {i: m for i, m in memory_layers(opened.model).items() if m.cfg.read_gate is not None}
    assert mems, "the tiny run trains with a read gate"
    writers = WriterKeys(opened, mems, min_weight=0.0)
    i, mem = next(iter(mems.items()))
    assert writers.n_pairs.get(i, 0) > 0
    owned = opened.ledger.owned_rows(i)
    assert bool(torch.isin(writers.keys[i] // mem.heads, owned).all())

    dm = opened.datamodule
    example = dm.training_examples(0)[0]
    batch = dm.collate([example])
    idx, w, qn = lookups(opened.model, {i: mem}, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[i]
    writers.install()
    try:
        assert "_read_gate" in mem.__dict__
        gate = mem._read_gate(idx, qn, 0.999)
    finally:
        writers.remove()
    assert "_read_gate" not in mem.__dict__
    mean = mem._read_gate(idx, qn, 0.999)
    own_rows = opened.ledger.facts[example.fact_id].rows[i]
    loss = loss_position_mask(batch["labels"])[0]
    own = torch.isin(idx[0], own_rows) & loss.view(-1, 1, 1)
    assert bool(own.any()) and bool((gate[0][own] == 1).all())
    head = torch.arange(mem.heads).view(1, 1, mem.heads, 1).expand_as(idx)
    no_writer = ~torch.isin(idx * mem.heads + head, writers.keys[i])
    assert bool(torch.equal(gate[no_writer], mean[no_writer]))


def test_layer_separation_scores_ranks_exactly():
    """experiments/tools/diag_layer_separation.py: the AUC is P(rephrased > known) with ties at
    half, and the pass share counts rephrasings above the known scores' 99th percentile."""
    sys.path.insert(0, str(ROOT / "experiments" / "tools"))
    from diag_layer_separation import separation

    apart = separation(torch.tensor([0.9, 0.8]), torch.tensor([0.1, 0.2, 0.3]))
    assert apart["auc"] == 1.0 and apart["pass_at_known99"] == 1.0
    tied = separation(torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5]))
    assert tied["auc"] == 0.5 and tied["pass_at_known99"] == 0.0
    mixed = separation(torch.tensor([0.0, 1.0]), torch.tensor([0.5]))
    assert mixed["auc"] == 0.5 and mixed["pass_at_known99"] == 0.5


def test_training_questions_are_what_the_training_sequences_are_made_of(opened):
    """FactStreamDataModule.training_questions (the probe's wordings): each fact's training
    sequences are exactly its training questions under every training template."""
    dm = opened.datamodule
    for j in range(dm.n_tasks):
        examples = dm.training_examples(j)
        for f in dm.task_facts(j):
            seqs = sorted(ex.input_ids for ex in examples if ex.fact_id == f.id)
            expected = sorted(dm.encoder.encode(Fact(f.id, q, f.answer, f.aliases), name).input_ids
                              for q in dm.training_questions(f) for name in dm.train_templates)
            assert seqs == expected
