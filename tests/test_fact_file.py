"""Facts from a user's file (data=facts_file): parsing and validation of JSONL / CSV /
save_to_disk records, the stream the DataModule builds from them (paraphrases, task labels,
probe, the file_known suite), and the real CLI on the tiny model (exit codes, messages naming
file and line, the counts in summary.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_data import _data_cfg
from test_train import TINY, cli

from smf_lightning.data.fact_file import FactFileError, FactFileSpec, read_fact_file, stream_shortfall
from smf_lightning.streams.datamodule import FactStreamDataModule

FACTS = [
    {"id": "zorb", "question": "What is the capital of Zorbania?", "answers": ["Vellmoor", "Vellmoor City"],
     "paraphrases": ["Which city is the capital of Zorbania?", "Zorbania's capital is which city?"]},
    {"id": "quill", "question": "Who invented the quillophone?", "answers": "Ada Brenn"},
    {"question": "What colour is the flag of Tesk?", "answers": ["teal"]},
    {"id": "ferrow", "question": "In which year was Mount Ferrow first climbed?", "answers": [1911]},
    {"id": "dulmar", "question": "Which river flows through Dulmar?", "answers": ["the Oss"]},
]


def write_jsonl(path: Path, records: list, extra_lines: tuple[str, ...] = ()) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(line + "\n" for line in extra_lines))
    return path


def read(path: Path, **kw):
    return read_fact_file(FactFileSpec(str(path), **kw))


# ----------------------------------------------------------------------------- parsing


def test_jsonl_records_become_facts(tmp_path):
    ff = read(write_jsonl(tmp_path / "f.jsonl", FACTS))
    assert ff.n_read == 5 and not ff.skipped and ff.format == "jsonl"
    zorb, quill, tesk, ferrow, _ = ff.facts
    assert zorb.answer == "Vellmoor" and zorb.aliases == ("Vellmoor", "Vellmoor City")
    assert zorb.paraphrases == ("Which city is the capital of Zorbania?", "Zorbania's capital is which city?")
    assert quill.aliases == ("Ada Brenn",) and quill.paraphrases == ()  # one string = one answer
    assert tesk.id == "line-3"  # no id: named by its line
    assert ferrow.answer == "1911"
    assert ff.tasks == [None] * 5 and ff.task_labels == []
    assert ff.counts() == {"path": str(tmp_path / "f.jsonl"), "format": "jsonl", "records_read": 5, "skipped": {},
                           "skipped_total": 0, "valid": 5}


def test_json_array_and_blank_lines(tmp_path):
    (tmp_path / "f.json").write_text(json.dumps(FACTS[:2]))
    assert [f.id for f in read(tmp_path / "f.json").facts] == ["zorb", "quill"]
    (tmp_path / "g.jsonl").write_text("\n" + json.dumps(FACTS[2]) + "\n\n" + json.dumps(FACTS[3]) + "\n")
    assert [f.id for f in read(tmp_path / "g.jsonl").facts] == ["line-2", "ferrow"]  # real line numbers


BAD_LINES = [
    ('{"id": "a", "question": "Q?"', "invalid_json", "not valid JSON"),
    ('["Q?", "A"]', "not_an_object", "must be a JSON object"),
    ('{"id": "a", "question": "Q?", "answers": [""]}', "empty_answer", "empty answer"),
    ('{"id": "a", "question": "Q?", "answers": []}', "empty_answer", "empty answer"),
    ('{"id": "a", "question": "Q?"}', "missing_answer", "no answer"),
    ('{"id": "a", "question": "  ", "answers": "A"}', "empty_question", "empty question"),
    ('{"id": "a", "answers": "A"}', "missing_question", "no question"),
    ('{"id": "zorb", "question": "Q?", "answers": "A"}', "duplicate_id", "duplicate id 'zorb' (first at "),
    ('{"id": "a", "question": "Q?", "answers": "A", "paraphrases": ["P?", ""]}', "empty_paraphrase", "paraphrase 1 is empty"),
    ('{"id": "a", "question": {"text": "Q?"}, "answers": "A"}', "bad_type", "must be text"),
]


@pytest.mark.parametrize("line, reason, message", BAD_LINES)
def test_bad_record_is_an_error_naming_file_and_line_or_skipped(tmp_path, line, reason, message):
    path = write_jsonl(tmp_path / "f.jsonl", FACTS[:3], (line,) + tuple(json.dumps(r) for r in FACTS[3:]))
    with pytest.raises(FactFileError) as err:
        read(path)
    assert str(err.value).startswith(f"{path}:4: ") and message in str(err.value) and "data.skip_invalid=true" in str(err.value)
    ff = read(path, skip_invalid=True)
    assert ff.n_read == 6 and dict(ff.skipped) == {reason: 1}
    assert [f.id for f in ff.facts] == ["zorb", "quill", "line-3", "ferrow", "dulmar"]


def test_csv_with_mapped_fields_separator_and_line_numbers(tmp_path):
    path = tmp_path / "f.csv"
    path.write_text(
        "key,q,a,alts\n"
        "k1,What is the capital of Zorbania?,Vellmoor|Vellmoor City,Which city is Zorbania's capital?\n"
        '"k2","Who invented the\nquillophone?","Ada Brenn",\n'  # a quoted cell over two lines
        "k3,Which river flows through Dulmar?,,\n"
    )
    fields = {"id": "key", "question": "q", "answers": "a", "paraphrases": "alts"}
    with pytest.raises(FactFileError, match=rf"^{path}:5: empty answer \(field 'a'\)"):
        read(path, fields=fields)
    ff = read(path, fields=fields, skip_invalid=True)
    k1, k2 = ff.facts
    assert k1.aliases == ("Vellmoor", "Vellmoor City") and k1.paraphrases == ("Which city is Zorbania's capital?",)
    assert k2.question == "Who invented the\nquillophone?" and k2.paraphrases == ()
    assert ff.where == [f"{path}:2", f"{path}:3"] and dict(ff.skipped) == {"empty_answer": 1}
    with pytest.raises(FactFileError, match=r"no column 'question' for the question .*data\.fields\.question=COLUMN"):
        read(path)
    with pytest.raises(FactFileError, match="data.fields.answer is not a record field"):
        read(path, fields={"answer": "a"})


def test_save_to_disk_directory(tmp_path):
    import datasets

    datasets.Dataset.from_dict({
        "question": ["Who invented the quillophone?", "What colour is the flag of Tesk?", ""],
        "answers": [["Ada Brenn"], ["teal", "blue-green"], ["x"]],
    }).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(FactFileError, match=rf"{tmp_path / 'ds'}: row 2: empty question"):
        read(tmp_path / "ds")
    ff = read(tmp_path / "ds", skip_invalid=True)
    assert ff.format == "disk" and [f.id for f in ff.facts] == ["row-0", "row-1"] and ff.facts[1].aliases == ("teal", "blue-green")


def test_unreadable_or_missing_file(tmp_path):
    with pytest.raises(FactFileError, match="does not exist"):
        read(tmp_path / "missing.jsonl")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(FactFileError, match="data.format=jsonl"):
        read(tmp_path / "f.txt")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"question": "Caf\xe9?", "answers": "x"}\n')
    with pytest.raises(FactFileError, match="cannot read facts file"):
        read(tmp_path / "latin1.jsonl")


def test_task_labels_fix_the_split_and_must_be_all_or_none(tmp_path):
    records = [dict(r, task=t) for r, t in zip(FACTS, [10, 2, 2, 10, 1])]
    ff = read(write_jsonl(tmp_path / "f.jsonl", records))
    assert ff.task_labels == ["1", "2", "10"]  # integer labels in numeric order
    assert stream_shortfall(ff, 2, 1) is None
    assert "task '1' has only 1 usable facts" in stream_shortfall(ff, 2, 2)
    assert "names 3 tasks (1, 2, 10), but data.n_tasks=4" in stream_shortfall(ff, 4, 1)
    records[2].pop("task")
    path = write_jsonl(tmp_path / "g.jsonl", records)
    with pytest.raises(FactFileError, match=rf"^{path}:3: no task"):
        read(path)
    ff = read(path, skip_invalid=True)
    assert dict(ff.skipped) == {"missing_task": 1} and len(ff.facts) == 4
    ff = read(path, fields={"task": None})  # the task field not read: a seeded split
    assert ff.tasks == [None] * 5 and not ff.skipped


def test_too_few_facts_says_how_many_there_are(tmp_path):
    ff = read(write_jsonl(tmp_path / "f.jsonl", FACTS, ('{"question": "Q?", "answers": ""}',)), skip_invalid=True)
    message = stream_shortfall(ff, 3, 2)
    assert "has only 5 usable facts (6 records read, 1 skipped (1 empty_answer), 5 valid)" in message
    assert "3 x 2 = 6" in message
    assert stream_shortfall(ff, 1, 5) is None


# ----------------------------------------------------------------------------- the DataModule


def file_cfg(path: Path, tmp_path: Path, **overrides) -> dict:
    base = dict(path=str(path), n_tasks=2, facts_per_task=2, suites={}, background={"synthetic": 4}, train_batch_size=4,
                repeats_per_batch=1, probe=False, cache_dir=str(tmp_path / "probes"))
    return _data_cfg("facts_file", **{**base, **overrides})


def test_paraphrases_add_training_sequences_but_recall_stays_per_fact(tiny_tok, tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [FACTS[0], *FACTS[1:4]])
    dm = FactStreamDataModule(tokenizer=tiny_tok, **file_cfg(path, tmp_path))
    dm.setup()
    stream = [f for t in dm.tasks for f in t]
    assert sorted(f.id for f in stream) == ["ferrow", "line-3", "quill", "zorb"]
    info = dm.info["file"]
    assert info["records_read"] == 4 and info["used"] == 4 and info["used_paraphrases"] == 2 and "probe" not in info
    j = next(t for t in range(2) if any(f.id == "zorb" for f in dm.task_facts(t)))
    examples = dm.training_examples(j)
    n_train = len(dm.train_templates)
    assert len(examples) == (2 + 2) * n_train  # zorb: question + 2 paraphrases; its partner: question only
    zorb = [tiny_tok.decode(e.input_ids) for e in examples if e.fact_id == "zorb"]
    assert len(zorb) == 3 * n_train and all("Vellmoor" in text for text in zorb)
    assert sum("Zorbania's capital is which city?" in text for text in zorb) == n_train
    for name, suite in dm.recall_suites(j).items():
        assert [f.id for f in suite.facts] == [f.id for f in dm.task_facts(j)]  # one recall item per fact
        assert all(f.question == FACTS[0]["question"] for f in suite.facts if f.id == "zorb")
    assert not any(e.template in dm.heldout_templates for e in examples)


def test_task_field_fixes_which_facts_share_a_task(tiny_tok, tmp_path):
    records = [dict(r, task=t) for r, t in zip(FACTS, ["b", "a", "b", "a", "b"])]
    path = write_jsonl(tmp_path / "f.jsonl", records)
    dm = FactStreamDataModule(tokenizer=tiny_tok, **file_cfg(path, tmp_path))
    dm.setup()
    assert {f.id for f in dm.task_facts(0)} <= {"zorb", "line-3", "dulmar"}  # "b" appears first
    assert {f.id for f in dm.task_facts(1)} == {"quill", "ferrow"}
    assert dm.info["file"]["task_labels"] == ["b", "a"]


def test_too_long_facts_are_counted_and_the_shortfall_names_them(tiny_tok, tmp_path):
    long = {"id": "long", "question": "Which words?", "answers": "one two three four five six"}
    path = write_jsonl(tmp_path / "f.jsonl", [*FACTS[:3], long])
    dm = FactStreamDataModule(tokenizer=tiny_tok, **file_cfg(path, tmp_path))
    with pytest.raises(FactFileError, match=r"only 3 usable facts .*1 with an answer over max_answer_words=5"):
        dm.setup()
    dm = FactStreamDataModule(tokenizer=tiny_tok, **file_cfg(path, tmp_path, facts_per_task=1))
    dm.setup()
    assert dm.info["file"]["filtered"] == {"answer_too_long": 1, "sequence_too_long": 0} and dm.info["file"]["usable"] == 3


def test_probe_drops_known_facts_and_builds_the_file_known_suite(tiny_tok, tmp_path, monkeypatch):
    from smf_lightning.eval import scoring
    from smf_lightning.models.tiny import tiny_qwen2

    answers = {r["question"]: r["answers"] for r in FACTS}

    # The "model" knows Zorbania's capital and Tesk's flag under the probe prompt, and Dulmar's
    # river only under the "Q: ... A:" template.
    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size, stop_at_newline=True):
        out = []
        for p in prompts:
            question = next(q for q in answers if q in p)
            knows = ("Zorbania" in question or "Tesk" in question) or ("Dulmar" in question and p.startswith("Q: "))
            out.append(" " + str(answers[question][0] if isinstance(answers[question], list) else answers[question])
                       if knows else " no idea")
        return out

    monkeypatch.setattr(scoring, "generate_greedy", fake_generate)
    extra = [{"id": f"new{i}", "question": f"What is the code name of project {i}?", "answers": f"Code{i}"} for i in range(3)]
    answers.update({r["question"]: r["answers"] for r in extra})
    path = write_jsonl(tmp_path / "f.jsonl", FACTS + extra)
    dm = FactStreamDataModule(tokenizer=tiny_tok, probe_model=tiny_qwen2(),
                              **file_cfg(path, tmp_path, probe=True, known_items=2))
    dm.setup()
    stream = {f.id for t in dm.tasks for f in t}
    assert len(stream) == 4 and stream <= {"quill", "ferrow", "new0", "new1", "new2"}
    probe = dm.info["file"]["probe"]
    assert probe["probed"] == 8 and probe["known"] == 2 and probe["template_known"] == 1
    suite = dm.heldout_suites()["file_known"]
    assert sorted(f.id for f in suite.facts) == ["line-3", "zorb"]
    assert suite.template.prompt("{question}").endswith("Question: {question}\nAnswer:")
    with pytest.raises(FactFileError, match="only 2 records .* answered exactly .*lower data.known_items"):
        FactStreamDataModule(tokenizer=tiny_tok, probe_model=tiny_qwen2(),
                             **file_cfg(path, tmp_path, probe=True, known_items=3)).setup()


# ----------------------------------------------------------------------------- the CLI on the tiny model


def run_cli(tmp_path: Path, path: Path, *overrides: str):
    """experiment=tiny on the facts file; probes and "before" points stay in tmp_path."""
    res = cli([*TINY, "data=facts_file", f"data.path={path}", f"data.cache_dir={tmp_path / 'probes'}",
               "callbacks.cache_before_eval=false", "callbacks.plots=false", f"hydra.run.dir={tmp_path / 'run'}",
               *overrides])
    return res, res.stdout + res.stderr


def test_cli_trains_on_a_facts_file_and_reports_the_counts(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", FACTS, ('{"id": "bad", "question": "Q?", "answers": [""]}', "{oops"))
    res, out = run_cli(tmp_path, path, "data.skip_invalid=true")
    assert res.returncode == 0, out[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    info = summary["data"]["file"]
    assert info["records_read"] == 7 and info["skipped"] == {"empty_answer": 1, "invalid_json": 1}
    assert info["skipped_total"] == 2 and info["valid"] == 5 and info["used"] == 4
    assert info["probe"]["probed"] == 5  # probe=true is the default: the random tiny model knows none
    assert summary["data"]["facts_origin"] == f"file:{path}"
    ids = summary["data"]["task_fact_ids"]
    assert [len(t) for t in ids] == [2, 2] and {i for t in ids for i in t} <= {"zorb", "quill", "line-3", "ferrow", "dulmar"}
    # every fact under 4 training templates, zorb also for its 2 paraphrases; batch 2, 2 passes per task
    assert summary["steps"] == (4 + info["used_paraphrases"]) * 4 // 2 * 2
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"skipped {path}:6: empty answer" in log and f"skipped {path}:7: not valid JSON" in log
    assert "7 records read, 2 skipped" in log and "4 used in the stream" in log


@pytest.mark.parametrize(
    "extra, overrides, message",
    [
        (('{"id": "a", "question": "Q?", "answers": [""]}',), (), ":6: empty answer"),
        (("{oops",), (), ":6: not valid JSON"),
        (('{"id": "quill", "question": "Again?", "answers": "x"}',), (), ":6: duplicate id 'quill' (first at "),
        ((), ("data.n_tasks=3",), "has only 5 usable facts (5 records read, 5 valid), but the stream needs "
                                  "n_tasks x facts_per_task = 3 x 2 = 6"),
        ((), ("data.fields.question=q",), "no question (field 'q')"),
        ((), ("data.known_items=2", "data.probe=false"), "data.known_items"),
    ],
)
def test_cli_bad_facts_file_fails_before_the_model_loads(tmp_path, extra, overrides, message):
    path = write_jsonl(tmp_path / "f.jsonl", FACTS, extra)
    res, out = run_cli(tmp_path, path, *overrides)
    assert res.returncode == 2, out[-3000:]
    assert message in out and "loading model" not in out
    assert "Traceback" not in out


def test_cli_user_data_config_brings_its_own_templates(tmp_path):
    """A user's data yaml (here in a Hydra search path) with its own training and held-out templates."""
    conf = tmp_path / "conf" / "data"
    conf.mkdir(parents=True)
    path = write_jsonl(tmp_path / "f.jsonl", FACTS)
    (conf / "my_faq.yaml").write_text(
        "defaults:\n  - facts_file\n  - _self_\n"
        f"path: {path}\n"
        "templates:\n"
        "  qa: null\n  q_a: null\n  answer_is: null\n  trivia: null\n  quiz: null\n"  # drop the inherited ones
        '  customer: "Customer: {question}\\nAgent: {answer}\\n"\n'
        '  faq: "FAQ. {question} {answer}\\n"\n'
        '  ask: "Ask: {question}\\nReply: {answer}\\n"\n'
        "heldout_templates: [ask]\n"
    )
    res = cli([*TINY, f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "data=my_faq", "data.probe=false",
               "callbacks.cache_before_eval=false", "callbacks.plots=false", f"hydra.run.dir={tmp_path / 'run'}"])
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"]["train_templates"] == ["customer", "faq"] and summary["data"]["heldout_templates"] == ["ask"]
    assert "probe" not in summary["data"]["file"]
    used_paraphrases = summary["data"]["file"]["used_paraphrases"]
    assert summary["steps"] == (4 + used_paraphrases) * 2 // 2 * 2  # 2 training templates


@pytest.mark.real
def test_real_model_probe_keeps_unknown_facts_and_known_ones_for_the_suite(tmp_path):
    """The offline Qwen2.5-class model knows the capitals of Japan and Italy (the probe prompt
    shows it France -> Paris) and cannot know invented facts: the probe must tell them apart."""
    from smf_lightning.models.loading import load_base_model

    loaded = load_base_model("qwen2.5-0.5b-offline", source="offline")
    known = [{"id": "japan", "question": "What is the capital of Japan?", "answers": ["Tokyo"]},
             {"id": "italy", "question": "What is the capital of Italy?", "answers": ["Rome"]}]
    path = write_jsonl(tmp_path / "f.jsonl", known + FACTS)
    dm = FactStreamDataModule(tokenizer=loaded.tokenizer, probe_model=loaded.model,
                              **file_cfg(path, tmp_path, probe=True, probe_templates=False, known_items=2))
    dm.setup()
    stream = {f.id for t in dm.tasks for f in t}
    assert len(stream) == 4 and not stream & {"japan", "italy"}
    assert sorted(f.id for f in dm.heldout_suites()["file_known"].facts) == ["italy", "japan"]
    assert dm.info["file"]["probe"]["known"] == 2 and dm.info["file"]["probe"]["probed"] == 7
