"""Rephrased questions: evaluation-only rewordings of a fact's question (data/rephrasings,
``rephrased`` in a facts file). Parsing and bad values, the guarantee that they never feed
training, slot selection, whitening, background statistics or the read gate (checked on every
sequence those consume), training-time rewordings that are filtered against them, recall per
fact with a bootstrap over facts, and the run's outputs on the tiny model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from test_fact_file import FACTS, file_cfg, read, run_cli, write_jsonl

from smf_lightning.data.fact_file import FactFileError
from smf_lightning.data.facts import Fact
from smf_lightning.data.rephrasings import BUILTIN_FILE, RephrasingError, builtin_stream_ids, read_rephrasings
from smf_lightning.eval import intervals as ci
from smf_lightning.streams.datamodule import FactStreamDataModule

SENTINEL = "Quartzine pelmonic sentinel asks: which city rules Zorbania?"
REPHRASED = [
    dict(FACTS[0], rephrased=[SENTINEL, "Zorbania is governed from what city?"]),
    dict(FACTS[1], rephrased="The quillophone was first built by whom?"),
    *FACTS[2:],
]


def all_fitted_texts(dm, tok) -> list[str]:
    """Every sequence a run trains on or fits a statistic to: each task's training examples
    (training, slot selection, the read gate's keys), the background corpus (background
    statistics, whitening, key init) and the template groups of within-question whitening."""
    texts = [tok.decode(e.input_ids) for j in range(dm.n_tasks) for e in dm.training_examples(j)]
    texts += [tok.decode(e.input_ids) for e in dm.background_examples()]
    texts += [tok.decode(ids) for b in dm.template_group_batches(4, 2) for ids in b["input_ids"].tolist()]
    return texts


# ----------------------------------------------------------------------------- parsing


def test_rephrased_field_is_read_from_jsonl_and_csv(tmp_path):
    ff = read(write_jsonl(tmp_path / "f.jsonl", REPHRASED))
    zorb, quill = ff.facts[:2]
    assert zorb.rephrased == (SENTINEL, "Zorbania is governed from what city?")
    assert quill.rephrased == ("The quillophone was first built by whom?",) and ff.facts[2].rephrased == ()
    assert zorb.training_questions() == (zorb.question, *zorb.paraphrases)  # rephrasings are not among them
    path = tmp_path / "f.csv"
    path.write_text('question,answers,rephrased\n"Who invented the quillophone?",Ada Brenn,"Whose invention is the '
                    'quillophone? | The quillophone was invented by whom?"\n"Which river flows through Dulmar?",Oss,\n')
    ff = read(path)
    assert ff.facts[0].rephrased == ("Whose invention is the quillophone?", "The quillophone was invented by whom?")
    assert ff.facts[1].rephrased == ()  # an empty CSV cell: none


@pytest.mark.parametrize(
    "rephrased, reason, message",
    [
        ("", "empty_rephrased", "empty rephrasing"),
        ([""], "empty_rephrased", "rephrasing 0 is empty"),
        (7, "bad_type", "must be text"),
        (["ok, a real one?", 3], "bad_type", "must be text"),
        (["what is the CAPITAL of Zorbania"], "rephrased_is_trained", "is the trained question 'What is the capital of Zorbania?'"),
        (["Zorbania's capital is which city!"], "rephrased_is_trained", "is the trained question \"Zorbania's capital"),
    ],
)
def test_bad_rephrased_value_names_the_line_or_is_skipped_and_counted(tmp_path, rephrased, reason, message):
    path = write_jsonl(tmp_path / "f.jsonl", [*FACTS[1:], dict(FACTS[0], rephrased=rephrased)])
    with pytest.raises(FactFileError, match=rf"f.jsonl:5: .*{_escape(message)}.* data.skip_invalid=true"):
        read(path)
    ff = read(path, skip_invalid=True)
    assert ff.skipped == {reason: 1} and len(ff.facts) == 4


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_cli_bad_rephrased_stops_before_the_model_loads(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [dict(FACTS[0], rephrased=["What is the capital of Zorbania"]), *FACTS[1:]])
    res, out = run_cli(tmp_path, path)
    assert res.returncode == 2, out[-3000:]
    assert "f.jsonl:1: rephrasing 0" in out and "loading model" not in out and "Traceback" not in out


# ----------------------------------------------------------------------------- never fitted to


def test_rephrasings_never_reach_training_selection_whitening_background_or_gate(tiny_tok, tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", REPHRASED)
    dm = FactStreamDataModule(tokenizer=tiny_tok, **file_cfg(path, tmp_path, n_tasks=1, facts_per_task=5))
    dm.setup()
    texts = all_fitted_texts(dm, tiny_tok)
    assert texts and not any("Quartzine" in t or "governed from" in t or "first built by" in t for t in texts)
    assert any("Zorbania" in t for t in texts)  # the trained question and paraphrases are there
    suite = dm.rephrased_suite(0)
    assert sorted(f.question for f in suite.facts) == sorted([SENTINEL, "Zorbania is governed from what city?",
                                                              "The quillophone was first built by whom?"])
    assert suite.template.name == dm.train_templates[0] and suite.max_new_tokens == dm.rephrased_max_new_tokens
    assert dm.info["rephrased"]["facts"] == 2 and dm.info["rephrased"]["questions"] == 3
    # the one place every fitted sequence is encoded refuses an evaluation rephrasing outright
    with pytest.raises(ValueError, match="evaluation-only rephrasing of fact zorb"):
        dm._encode(Fact("other", SENTINEL.upper(), "x", ("x",)), dm.train_templates[0])


def test_generated_rewordings_train_but_never_an_evaluation_rephrasing(tiny_tok, tmp_path, monkeypatch):
    from smf_lightning.eval import scoring
    from smf_lightning.models.tiny import tiny_qwen2

    seen_prompts = []
    replies = {"synonyms": f" {SENTINEL}", "subject_first": " Is Vellmoor the capital of Zorbania?",
               "name_the": " Name the seat of Zorbania's government."}

    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size, stop_at_newline=True):
        from smf_lightning.data.rewording import STYLES

        seen_prompts.extend(prompts)
        out = []
        for p in prompts:
            style = next(s for s, text in STYLES.items() if p.startswith(text.split("{question}")[0]))
            question = p.rsplit("Question: ", 1)[1].split("\nRewritten:")[0]
            out.append(replies[style] if "Zorbania" in question else f" {style}: {question.lower()}")
        return out

    monkeypatch.setattr(scoring, "generate_greedy", fake_generate)
    path = write_jsonl(tmp_path / "f.jsonl", REPHRASED)
    dm = FactStreamDataModule(tokenizer=tiny_tok, probe_model=tiny_qwen2(),
                              **file_cfg(path, tmp_path, n_tasks=1, facts_per_task=5, rewordings=3, max_seq_len=256))
    dm.setup()
    assert not any("Quartzine" in p or "governed from" in p for p in seen_prompts)  # the generator never sees them
    counts = dm.info["rewordings"]
    assert counts["generated"] == 15 and counts["dropped_is_evaluation_rephrasing"] == 1
    assert counts["dropped_contains_answer"] == 1 and counts["kept"] == 13
    texts = all_fitted_texts(dm, tiny_tok)
    assert not any("Quartzine" in t for t in texts)
    assert sum("Name the seat of Zorbania's government." in t for t in texts) == len(dm.train_templates)
    # cached: a second data module generates nothing
    seen_prompts.clear()
    again = FactStreamDataModule(tokenizer=tiny_tok, probe_model=tiny_qwen2(),
                                 **file_cfg(path, tmp_path, n_tasks=1, facts_per_task=5, rewordings=3, max_seq_len=256))
    again.setup()
    assert not seen_prompts and again.info["rewordings"] == counts


# ----------------------------------------------------------------------------- recall and its interval


def test_rephrased_recall_counts_each_fact_once_and_resamples_facts():
    # task 0: fact a has 2 rephrasings (1 right), fact b 1 (right): per fact 0.5 and 1.0 -> 0.75, not 2/3
    records = {"task": [0, 0, 0, 0, 0], "template": ["qa", "qa", "rephrased", "rephrased", "rephrased"],
               "id": ["a", "b", "a", "a", "b"], "em": [1.0, 0.0, 1.0, 0.0, 1.0]}
    assert ci.recall_task_means(records, [0], ["rephrased"], "em") == {0: 0.75}
    assert ci.recall_task_means(records, [0], ["qa"], "em") == {0: 0.5}
    assert ci.recall_task_means(records, [1], ["rephrased"], "em") == {}  # no rows: left out, not 0
    draws = ci.recall_resampled(records, [0], ["rephrased"], "em", 200, 0)[0]
    assert set(draws.tolist()) <= {0.5, 0.75, 1.0}  # facts are resampled whole: never 2/3 or 1/3


# ----------------------------------------------------------------------------- the built-in rephrasings


def test_builtin_rephrasings_file_is_valid_and_tags_its_streams():
    table = read_rephrasings("builtin")
    lines = [json.loads(line) for line in BUILTIN_FILE.read_text().splitlines() if line.strip()]
    assert len(table) == len(lines) >= 200
    assert all(len(r["rephrased"]) >= 2 for r in lines)  # at least two per fact
    streams = {s for r in lines for s in r["streams"]}
    assert {"quick", "dev"} <= streams <= {"quick", "dev", "test"}
    assert len(builtin_stream_ids(["quick"])) == 30 and len(builtin_stream_ids(["dev"])) == 200
    if "test" in streams:
        assert len(builtin_stream_ids(["test"])) == 200
        assert not builtin_stream_ids(["test"]) & builtin_stream_ids(["dev", "quick"])  # nothing tuned on is reported
    with pytest.raises(RephrasingError, match="the built-in streams are"):
        builtin_stream_ids(["nope"])


def test_a_rephrasings_file_of_ones_own_is_checked_line_by_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "a", "rephrased": ["Who?"]}\n{"id": "b", "rephrased": []}\n')
    with pytest.raises(RephrasingError, match=r"r.jsonl:2: a record needs"):
        read_rephrasings(str(path))
    with pytest.raises(RephrasingError, match="does not exist"):
        read_rephrasings(str(tmp_path / "missing.jsonl"))


# ----------------------------------------------------------------------------- the run's outputs


def test_cli_reports_rephrased_recall_in_every_output(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", REPHRASED)
    res, out = run_cli(tmp_path, path, "callbacks.plots=true", "callbacks.intervals.resamples=50")
    assert res.returncode == 0, out[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert 0.0 <= summary["fact_recall_rephrased"] <= summary["fact_recall_rephrased_contains"] <= 1.0
    assert summary["recall"]["fact_recall_rephrased"]["ci95"] is not None
    assert summary["data"]["rephrased"]["template"] == "qa"
    assert set(summary["wrong_answer_is_other_fact"]) >= {"trained", "heldout_template"}
    rows = list(csv.reader((run / "accuracy_matrix_rephrased.csv").open()))
    assert rows[0] == ["eval_point", "task_0", "task_1"] and [r[0] for r in rows[1:]] == ["before", "after task 0", "after task 1"]
    matrix = summary["accuracy_matrix_rephrased"]
    # tasks without a rephrased fact have no entry; the final row's mean is the summary figure
    final = [v for v in matrix[-1] if v is not None]
    assert final and summary["fact_recall_rephrased"] == pytest.approx(sum(final) / len(final))
    items = list(csv.DictReader((run / "items" / "after_task_1" / "fact_recall.csv").open()))
    rephrased_items = [r for r in items if r["template"] == "rephrased"]
    ids = {f for t in summary["data"]["task_fact_ids"] for f in t}
    assert len(rephrased_items) == ("zorb" in ids) * 2 + ("quill" in ids)
    assert (run / "accuracy_matrix_rephrased.png").stat().st_size > 1000


def test_a_rewording_that_drops_a_detail_or_repeats_the_question_is_not_trained():
    from collections import Counter

    from smf_lightning.data.rewording import keep_rewordings

    fact = Fact("anne", "Who did Princess Anne marry in 1992?", "Tim Laurence", ("Tim Laurence",))
    counts: Counter = Counter()
    kept = keep_rewordings(fact, ["Princess Anne married in what year?", "In 1992, whom did Princess Anne wed?",
                                  "Who did princess Anne marry in 1992", "Was it Tim Laurence that Princess Anne wed in 1992?"],
                           lambda q: True, counts)
    assert kept == ("In 1992, whom did Princess Anne wed?",)
    assert counts == {"generated": 4, "kept": 1, "dropped_lost_detail": 1, "dropped_same_as_trained": 1,
                      "dropped_contains_answer": 1}


def test_rewording_groups_for_whitening_hold_a_background_question_and_its_rewordings(tiny_tok, tmp_path, monkeypatch):
    """model.memory.within_groups=rewordings: the within-question covariance is fitted on groups of
    one background question and its kept rewordings, under the first training template; stream
    facts and their rephrasings are not among them."""
    from smf_lightning.data.rewording import STYLES
    from smf_lightning.eval import scoring
    from smf_lightning.models.tiny import tiny_qwen2

    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size, stop_at_newline=True):
        out = []
        for p in prompts:
            style = next(s for s, text in STYLES.items() if p.startswith(text.split("{question}")[0]))
            out.append(f" {style}: " + p.rsplit("Question: ", 1)[1].split("\nRewritten:")[0].lower())
        return out

    monkeypatch.setattr(scoring, "generate_greedy", fake_generate)
    path = write_jsonl(tmp_path / "f.jsonl", REPHRASED)
    dm = FactStreamDataModule(tokenizer=tiny_tok, probe_model=tiny_qwen2(),
                              **file_cfg(path, tmp_path, n_tasks=1, facts_per_task=5, background={"synthetic": 6},
                                         max_seq_len=256))
    dm.setup()
    batches = dm.rewording_group_batches(4, questions_per_batch=3)
    assert [b["groups"].tolist() for b in batches] == [[0] * 4 + [1] * 4 + [2] * 4, [3] * 4]  # question + 3 rewordings
    texts = [tiny_tok.decode(ids) for b in batches for ids in b["input_ids"].tolist()]
    background = [f.question for f in dm._background_facts[:4]]
    for q, group in enumerate([texts[i:i + 4] for i in range(0, 16, 4)]):
        assert group[0].startswith(f"Question: {background[q]}") and all(background[q].lower() in t for t in group[1:])
    stream = {f.question for f in dm.task_facts(0)}
    assert not any(s in t for s in stream for t in texts) and not any("Quartzine" in t for t in texts)
    assert dm.rewording_cache_name().startswith("rewordings-")
    # the whitening's cache key holds what it is fitted on: fewer styles, other groups, another key
    from smf_lightning.models.build import batches_digest

    dm.rewordings = 2
    fewer = dm.rewording_group_batches(4, questions_per_batch=3)
    assert [b["groups"].tolist() for b in fewer][0] == [0] * 3 + [1] * 3 + [2] * 3
    assert batches_digest(fewer) != batches_digest(batches)
    assert batches_digest(dm.rewording_group_batches(4, questions_per_batch=3)) == batches_digest(fewer)
    from smf_lightning.memory import MemoryConfig

    with pytest.raises(ValueError, match="within_groups='wordings'; allowed: 'templates', 'rewordings'"):
        MemoryConfig(layers=[1], input_norm="zca_within", whiten_on="loss", within_groups="wordings").validate()


def test_an_interrupted_rewording_generation_keeps_the_chunks_it_finished(tmp_path):
    """Rewordings are saved chunk by chunk: a generation stopped midway (Ctrl-C, a killed job)
    resumes from what it wrote and generates only the rest."""
    from smf_lightning.data.generation import CHUNK_BATCHES
    from smf_lightning.data.rewording import generate_rewordings

    questions = [f"Which river flows through city number {i}?" for i in range(10)]
    cache = tmp_path / "rewordings.json"
    calls = []

    def generate(model, tokenizer, prompts, max_new_tokens, batch_size):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return [f"reworded {len(calls)}.{i}" for i in range(len(prompts))]

    with pytest.raises(KeyboardInterrupt):
        generate_rewordings(object(), None, questions, 2, 8, batch_size=2, cache_file=cache, generate=generate)
    chunk = 2 * CHUNK_BATCHES
    saved = json.loads(cache.read_text())
    assert sum(len(v) for v in saved.values()) == chunk  # the first chunk, nothing of the interrupted one
    calls.clear()
    out = generate_rewordings(object(), None, questions, 2, 8, batch_size=2, cache_file=cache,
                              generate=lambda m, t, p, n, b: [f"again {i}" for i in range(len(p))])
    assert len(out) == 10 and all(len(v) == 2 for v in out.values())
    firsts = [r for v in out.values() for r in v if r.startswith("reworded 1.")]
    assert len(firsts) == chunk  # kept, not generated again


# ----------------------------------------------------------------------------- context prefixes (data.prefixes)


def _prefixed_dm(tiny_tok, tmp_path, **overrides):
    from test_data import _write_fake_root

    root = _write_fake_root(tmp_path / "olmo")
    path = write_jsonl(tmp_path / "f.jsonl", REPHRASED)
    cfg = file_cfg(path, tmp_path, n_tasks=1, facts_per_task=5, source="offline", data_root=str(root),
                   background={"synthetic": 4, "lambada": 3}, max_seq_len=256, **overrides)
    dm = FactStreamDataModule(tokenizer=tiny_tok, **cfg)
    dm.setup()
    return dm


def test_prefixes_add_k_sequences_per_fact_that_never_target_or_write_the_prefix(tiny_tok, tmp_path):
    plain = _prefixed_dm(tiny_tok, tmp_path / "a")
    dm = _prefixed_dm(tiny_tok, tmp_path / "b", prefixes=3, prefix_words=[4, 6])
    base, examples = plain.training_examples(0), dm.training_examples(0)
    assert examples[:len(base)] == base  # the unprefixed sequences are unchanged, in order
    extra = examples[len(base):]
    facts = dm.task_facts(0)
    assert [e.fact_id for e in extra] == [f.id for f in facts for _ in range(3)]
    passages = [p.text for p in dm._background_passages]
    for k, ex in enumerate(extra):
        fact = facts[k // 3]
        questions, template = dm.training_questions(fact), dm.train_templates[k % 3 % len(dm.train_templates)]
        assert ex.template == f"prefix:{template}" and ex.prefix_len > 0
        assert not any(ex.loss_mask[:ex.prefix_len])  # the prefix is never a target
        words = tiny_tok.decode(ex.input_ids[:ex.prefix_len]).split()
        assert 4 <= len(words) <= 6 and any(" ".join(words) in p for p in passages)  # a run of a background passage
        # after the prefix: the fact's (k mod n)-th training question under the template, targets as unprefixed
        variant = dm._encode(Fact(fact.id, questions[k % 3 % len(questions)], fact.answer, fact.aliases), template)
        assert ex.input_ids[ex.prefix_len:] == variant.input_ids and ex.loss_mask[ex.prefix_len:] == variant.loss_mask
    assert _prefixed_dm(tiny_tok, tmp_path / "c", prefixes=3, prefix_words=[4, 6]).training_examples(0) == examples
    batch = dm.collate(extra[:4])
    for row, ex in enumerate(extra[:4]):
        assert not batch["write_mask"][row, :ex.prefix_len].any()
        assert batch["write_mask"][row, ex.prefix_len:].tolist() == batch["attention_mask"][row, ex.prefix_len:].bool().tolist()
    assert "write_mask" not in plain.collate(base[:4])  # without prefixes the batch is as before
    # the evaluation-only rephrasings stay out of prefixed sequences as of every other fitted one
    assert not any("Quartzine" in t or "governed from" in t for t in all_fitted_texts(dm, tiny_tok))


def test_writing_positions_drop_what_the_batch_does_not_allow():
    import torch

    from smf_lightning.selection.frequent import writing_positions

    ids = torch.tensor([[5, 6, 7, 8]])
    allowed = torch.tensor([[False, True, True, True]])
    skipped = torch.zeros(10, dtype=torch.bool)
    skipped[7] = True
    assert writing_positions(ids, None, None, allowed).tolist() == allowed.tolist()
    assert writing_positions(ids, skipped, None, allowed).tolist() == [[False, True, False, True]]
    base = torch.tensor([[True, True, False, True]])
    assert writing_positions(ids, None, base, allowed).tolist() == [[False, True, False, True]]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(prefixes=-1), "prefixes must be an integer >= 0"),
        (dict(prefixes=2, prefix_words=[5, 3]), r"prefix_words must be \[lo, hi\]"),
        (dict(prefixes=2, background={"synthetic": 4}), "background.lambada is 0"),
    ],
)
def test_bad_prefix_options_are_refused(tiny_tok, tmp_path, overrides, message):
    path = write_jsonl(tmp_path / "f.jsonl", REPHRASED)
    with pytest.raises(ValueError, match=message):
        FactStreamDataModule(tokenizer=tiny_tok, **file_cfg(path, tmp_path, n_tasks=1, facts_per_task=5, **overrides))


def test_prefix_options_are_checked_before_the_model_loads():
    from hydra import compose, initialize_config_dir

    from smf_lightning.config import ConfigError, validate_config
    from smf_lightning.train import conf_dir

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        validate_config(compose("train", overrides=["experiment=tiny", "data.prefixes=2", "data.background.lambada=4"]))
        for bad, message in ((["data.prefixes=2", "data.background.lambada=0"], "background.lambada is 0"),
                             (["data.prefix_words=[0,3]"], r"data.prefix_words must be \[lo, hi\]")):
            with pytest.raises(ConfigError, match=message):
                validate_config(compose("train", overrides=["experiment=tiny", *bad]))
