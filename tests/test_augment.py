"""Study material generated from passages (data.augment): prompts and filters on handcrafted
generations (exact kept/dropped), the cache (round trip, what keys it, interrupted generation),
the documents stream trained on the material (fact_id = passage id), the run's
augmented/task_<k>.jsonl and summary counts, the guarantee that the evaluation questions never
reach the generator, the material or any trained sequence, the probe of questions the model
already answers, the dev/test halves of a corpus, config errors before the model loads, and a
tiny end-to-end run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from test_data import _data_cfg
from test_documents import DOCS, run_cli, write_jsonl

from smf_lightning.data import augment, generation
from smf_lightning.data.augment import (
    PROMPTS,
    AugmentSpec,
    augment_cache_file,
    build_prompt,
    cloze_items,
    generate_material,
    keep_qa,
    keep_restatements,
    parse_lines,
    parse_qa,
)
from smf_lightning.data.documents import DocumentError, DocumentFile, Passage, passage_split_of, split_passages, squad_example
from smf_lightning.errors import ConfigError
from smf_lightning.streams.datamodule import FactStreamDataModule

ZORB = DOCS[0]["text"]  # "Zorbania is a small country in the north. Its capital is Vellmoor, a city on the river Oss."


def spec(**overrides) -> dict:
    """data.augment as documents.yaml has it, with ``overrides``."""
    return {**_data_cfg("documents")["augment"], **overrides}


def no_unfit(question, answer):
    return None


# ----------------------------------------------------------------------------- prompts, parsing, filters


def test_prompts_hold_the_passage_and_nothing_else():
    for kind, template in PROMPTS.items():
        assert template.count("{passage}") == 1, kind
        assert build_prompt(template, ZORB).endswith(f"Passage: {ZORB}\n" + ("Question:" if kind == "qa" else "Restated:\n"))
    assert AugmentSpec.from_mapping(spec(kinds=["qa"], prompts={"qa": "P: {passage}\nQuestion:"})).prompt("qa") == \
        "P: {passage}\nQuestion:"
    assert AugmentSpec.from_mapping(spec(kinds=["qa"])).prompt("qa") == PROMPTS["qa"]  # null: the built-in one


def test_qa_pairs_are_parsed_and_filtered_exactly():
    continuation = (" What is the capital of Zorbania?\nAnswer: Vellmoor\n"
                    "Question: Capital?\nAnswer: Vellmoor\n"                              # 1 word
                    "Question: Which river flows past Vellmoor?\nAnswer: the Oss\n"
                    "Question: Which city is the capital of Zorbania, Vellmoor?\nAnswer: Vellmoor\n"
                    "Question: What is the capital of Zorbania?\nAnswer: Vellmoor\n"      # a repeat
                    "Question: Who founded Zorbania?\nAnswer: King Olaf\n"                # not in the passage
                    "Question: How big is Zorbania?\nAnswer:\n"                           # no answer
                    "Question: Where is Zorbania located?\nAnswer: in the north\n"
                    "Question: Which river runs through the capital city?\nAnswer: Oss\n"  # over per_passage
                    "Question: What is the river?\n\nPassage: Another text\nQuestion: Q?\nAnswer: A\n")
    pairs = parse_qa(continuation)
    assert len(pairs) == 10 and pairs[0] == ("What is the capital of Zorbania?", "Vellmoor")
    assert pairs[6] == ("How big is Zorbania?", "") and pairs[-1] == ("What is the river?", "")  # cut: no answer line
    evaluation = augment.evaluation_questions(["Where is Zorbania located?"])
    items = keep_qa("zorb", ZORB, "qa", pairs, per_passage=2, evaluation=evaluation, unfit=no_unfit)
    assert [it.reason for it in items] == [
        None, "question_too_short", None, "question_contains_answer", "duplicate", "answer_not_in_passage",
        "no_answer", "is_evaluation_question", "beyond_per_passage", "no_answer"]
    assert all(it.passage_id == "zorb" and it.kind == "qa" for it in items)
    assert items[0].record() == {"passage_id": "zorb", "kind": "qa", "question": "What is the capital of Zorbania?",
                                 "answer": "Vellmoor", "kept": True, "reason": None}
    unfit = keep_qa("zorb", ZORB, "qa", pairs[:1], per_passage=2, evaluation=frozenset(),
                    unfit=lambda q, a: "sequence_too_long")
    assert unfit[0].reason == "sequence_too_long"
    assert parse_qa("Question: Who?\nAnswer: A\n", prompt="Write pairs.\n{passage}\n") == [("Who?", "A")]
    assert parse_qa("") == [] and parse_qa("\n\nPassage: x") == []  # nothing written: no pair


def test_restatements_are_parsed_and_filtered_exactly():
    lines = parse_lines("\nThe capital of Zorbania is the city of Vellmoor.\n- Its capital is Vellmoor, a city on the "
                        "river Oss.\n1. A small country.\nThe capital of Zorbania is the city of Vellmoor.\n"
                        "Zorbania lies in the north of the continent.\nThe river Oss runs through Vellmoor, its "
                        "capital.\n\nPassage: more")
    assert lines[1] == "Its capital is Vellmoor, a city on the river Oss." and len(lines) == 6
    items = keep_restatements("zorb", ZORB, [*lines, "Zorbania is a small country"], per_passage=2,
                              evaluation=augment.evaluation_questions(["Where does the river Oss run through?"]))
    assert [it.reason for it in items] == [None, "same_as_passage", "too_short", "duplicate", None,
                                           "beyond_per_passage", "same_as_passage"]
    assert items[0].record() == {"passage_id": "zorb", "kind": "paraphrase",
                                 "text": "The capital of Zorbania is the city of Vellmoor.", "kept": True, "reason": None}
    stated = keep_restatements("zorb", ZORB, ["Some ask: where does the river Oss run through?"], per_passage=2,
                               evaluation=augment.evaluation_questions(["Where does the river Oss run through?"]))
    assert stated[0].reason == "is_evaluation_question"


def test_cloze_blanks_a_name_or_number_of_each_sentence():
    assert cloze_items(ZORB) == [("Fill in the blank: Its capital is Vellmoor, a city on the river ____.", "Oss")]
    text = DOCS[1]["text"] + " " + DOCS[3]["text"]
    assert cloze_items(text) == [
        ("Fill in the blank: The quillophone was invented by Ada Brenn in ____, after years of work in her shed.", "1911"),
        ("Fill in the blank: Mount Ferrow was first climbed in ____ by a team of four.", "1911")]
    assert cloze_items("Short one. Too short: 1911.") == []


@pytest.mark.parametrize("overrides, message", [
    (dict(kinds=["qa", "summary"]), "data.augment.kinds=['qa', 'summary']; allowed: a list of distinct kinds"),
    (dict(kinds=["qa"], prompts={"qa": "Write questions.", "paraphrase": None}),
     "data.augment.prompts.qa='Write questions.'; allowed: null (the built-in prompt) or a prompt with exactly one "
     "{passage}"),
    (dict(kinds=["qa"], per_passage={"qa": -1, "paraphrase": 8, "cloze": 4}), "data.augment.per_passage.qa=-1"),
    (dict(kinds=[], include_passage=False), "data.augment.include_passage=False; allowed: true when"),
    (dict(kinds=["qa"], max_new_tokens=0), "data.augment.max_new_tokens=0"),
    (dict(kinds=["qa"], qa_loss_on="question"), "data.augment.qa_loss_on='question'"),
    (dict(kinds=["qa"], sampling=True), "data.augment has no key sampling"),
])
def test_bad_augment_keys_say_which_and_what_is_allowed(overrides, message):
    with pytest.raises(ConfigError, match="^bad config: ") as err:
        AugmentSpec.from_mapping(spec(**overrides))
    assert message in str(err.value)


# ----------------------------------------------------------------------------- the cache


def fake_generation(prompts):
    return [f" reply to ...{p[-40:]}" for p in prompts]


def test_cache_round_trip_and_what_keys_it(tmp_path):
    calls = []

    def generate(model, tokenizer, prompts, max_new_tokens, batch_size):
        calls.append(list(prompts))
        return fake_generation(prompts)

    texts = [d["text"] for d in DOCS]
    f = augment_cache_file(tmp_path, "f" * 64, "qa", PROMPTS["qa"], 64)
    first = generate_material(object(), None, texts, PROMPTS["qa"], 64, 2, f, generate=generate, label="qa")
    assert sum(map(len, calls)) == 5 and first == dict(zip(texts, fake_generation([build_prompt(PROMPTS["qa"], t)
                                                                                    for t in texts])))
    calls.clear()
    assert generate_material(None, None, texts, PROMPTS["qa"], 64, 2, f, generate=generate) == first  # no model needed
    assert not calls
    edited = [*texts[:4], texts[4] + " It was rebuilt in 1950."]  # keyed by content: only the edited one is new
    generate_material(object(), None, edited, PROMPTS["qa"], 64, 2, f, generate=generate)
    assert calls == [[build_prompt(PROMPTS["qa"], edited[4])]]
    with pytest.raises(ValueError, match="1 passages have no cached qa material"):
        generate_material(None, None, ["A new passage."], PROMPTS["qa"], 64, 2, f, generate=generate, label="qa")
    # generator, kind, prompt and decoding length each name another file
    others = {augment_cache_file(tmp_path, "e" * 64, "qa", PROMPTS["qa"], 64),
              augment_cache_file(tmp_path, "f" * 64, "paraphrase", PROMPTS["qa"], 64),
              augment_cache_file(tmp_path, "f" * 64, "qa", PROMPTS["qa"] + " ", 64),
              augment_cache_file(tmp_path, "f" * 64, "qa", PROMPTS["qa"], 65)}
    assert len(others) == 4 and f not in others
    assert augment_cache_file(tmp_path, "f" * 64, "qa", PROMPTS["qa"], 64) == f


def test_an_interrupted_generation_keeps_the_chunks_it_saved(tmp_path):
    texts = [f"Passage number {i} is about the river Oss." for i in range(10)]
    f = tmp_path / "augment.json"
    calls = []

    def generate(model, tokenizer, prompts, max_new_tokens, batch_size):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return [f"first {i}" for i in range(len(prompts))]

    with pytest.raises(KeyboardInterrupt):
        generate_material(object(), None, texts, PROMPTS["qa"], 8, 1, f, generate=generate)
    chunk = generation.CHUNK_BATCHES
    assert len(json.loads(f.read_text())["outputs"]) == chunk  # the first chunk, nothing of the interrupted one
    out = generate_material(object(), None, texts, PROMPTS["qa"], 8, 1, f,
                            generate=lambda m, t, p, n, b: [f"again {i}" for i in range(len(p))])
    assert sum(v.startswith("first") for v in out.values()) == chunk and len(out) == 10


# ----------------------------------------------------------------------------- the stream


SENTINEL = "Which zorbling guards the quartzine gate of Vellmoor?"
QA_REPLIES = {  # by the passage's first words: what a generator might write
    "Zorbania": (" Which city is the capital of Zorbania?\nAnswer: Vellmoor\n"
                 f"Question: {SENTINEL}\nAnswer: Oss\n"  # as if the generator had guessed an evaluation question
                 "Question: Which river flows past the capital?\nAnswer: the Oss\n\nPassage:"),
    "The quillophone": (" Who was the inventor of the quillophone?\nAnswer: Ada Brenn\n"
                        "Question: Who invented the quillophone?\nAnswer: Ada Brenn\n"  # an evaluation question
                        "Question: When?\nAnswer: 1911\n"),
    "The winter": " What colour was the snow?\nAnswer: white\n",  # not in the passage: nothing kept
}
PARA_REPLIES = {
    "Zorbania": "Zorbania, a small northern country, has Vellmoor as its capital.\nThe river Oss flows past Vellmoor.\n",
    "The quillophone": "Ada Brenn invented the quillophone in 1911 in her shed.\n",
    "The winter": "The winter was long and cold, and the snow stayed until spring.\n",  # a copy: dropped
}
WINTER = {"id": "winter", "text": "The winter was long and cold, and the snow stayed until spring.",  # no name, no number
          "qa": [{"question": "Until when did the snow stay?", "answers": ["until spring", "spring"]}]}


def study_docs():
    docs = [dict(DOCS[0], qa=[*DOCS[0]["qa"], {"id": "sentinel", "question": SENTINEL, "answers": ["Blix"]}]),
            DOCS[1], WINTER]
    return docs


@pytest.fixture
def fake_generator(monkeypatch):
    """eval/scoring.generate_greedy replaced: replies by prompt kind and passage; records every prompt."""
    from smf_lightning.eval import scoring

    prompts_seen = []

    def generate(model, tokenizer, prompts, max_new_tokens, batch_size, stop_at_newline=True):
        prompts_seen.extend(prompts)
        out = []
        for p in prompts:
            passage = p.rsplit("Passage: ", 1)[1]
            replies = QA_REPLIES if p.endswith("Question:") else PARA_REPLIES if p.endswith("Restated:\n") else None
            out.append("" if replies is None else next((r for k, r in replies.items() if passage.startswith(k)), ""))
        return out

    monkeypatch.setattr(scoring, "generate_greedy", generate)
    return prompts_seen


def study_dm(tiny_tok, tmp_path, docs=None, **overrides):
    from smf_lightning.models.tiny import tiny_qwen2

    path = write_jsonl(tmp_path / "d.jsonl", docs or study_docs())
    cfg = _data_cfg("documents", path=str(path), n_tasks=1, passages_per_task=3, facts_per_task=3, suites={},
                    background={"synthetic": 4}, train_batch_size=2, max_seq_len=96, chunk_overlap=4, probe=False,
                    cache_dir=str(tmp_path / "cache"),
                    augment=spec(kinds=["qa", "paraphrase", "cloze"], per_passage={"qa": 2, "paraphrase": 8, "cloze": 4}))
    dm = FactStreamDataModule(tokenizer=tiny_tok, probe_model=tiny_qwen2(), **{**cfg, **overrides})
    dm.setup()
    return dm


def test_study_material_trains_with_the_passage_id(tiny_tok, tmp_path, fake_generator, caplog):
    with caplog.at_level(logging.WARNING):
        dm = study_dm(tiny_tok, tmp_path)
    aug = dm.info["documents"]["augmented"]
    assert aug["per_kind"]["qa"] == {"generated": 7, "kept": 3, "dropped": {
        "answer_not_in_passage": 1, "is_evaluation_question": 2, "question_too_short": 1}}
    assert aug["per_kind"]["paraphrase"] == {"generated": 4, "kept": 3, "dropped": {"same_as_passage": 1}}
    assert aug["per_kind"]["cloze"] == {"generated": 2, "kept": 2, "dropped": {}}  # zorb (Oss), quill (1911)
    assert aug["generated"] == 13 and aug["kept"] == 8
    assert aug["dropped"] == {"answer_not_in_passage": 1, "is_evaluation_question": 2, "question_too_short": 1,
                              "same_as_passage": 1}
    assert aug["passages_without_material"] == 1 and aug["passages_without_material_ids"] == ["winter"]
    assert "1 of 3 passages kept no study material" in caplog.text and "winter" in caplog.text  # named, not silent
    examples = dm.training_examples(0)
    assert aug["sequences_per_task"] == [len(examples)]
    texts = {e.template: [] for e in examples}
    for e in examples:
        texts[e.template].append(tiny_tok.decode(e.input_ids))
    qa = [t for name, ts in texts.items() if name == "qa:qa" for t in ts]
    assert sorted(qa) == ["Question: Which city is the capital of Zorbania?\nAnswer: Vellmoor\n",
                          "Question: Which river flows past the capital?\nAnswer: the Oss\n",
                          "Question: Who was the inventor of the quillophone?\nAnswer: Ada Brenn\n"]  # training template
    assert not any(name.endswith(":quiz") for name in texts)  # never the held-out template
    assert "paraphrase:chunk0" in texts and "cloze:qa" in texts
    by_passage = {}
    for e in examples:
        kind = "passage" if e.template.startswith("chunk") else e.template.split(":")[0]
        by_passage.setdefault(e.fact_id, set()).add(kind)
    assert by_passage == {"zorb": {"passage", "qa", "paraphrase", "cloze"},  # one passage, one fact id
                          "quill": {"passage", "qa", "paraphrase", "cloze"}, "winter": {"passage"}}
    qa_example = next(e for e in examples if e.template == "qa:qa" and "Which city" in tiny_tok.decode(e.input_ids))
    n_prompt = len(tiny_tok("Question: Which city is the capital of Zorbania?\nAnswer:")["input_ids"])
    assert not any(qa_example.loss_mask[:n_prompt]) and all(qa_example.loss_mask[n_prompt:])  # answer_and_suffix


def test_passages_only_as_study_material_and_the_run_dir_records(tiny_tok, tmp_path, fake_generator):
    dm = study_dm(tiny_tok, tmp_path)
    dm.write_augmented(tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "augmented" / "task_0.jsonl").read_text().splitlines()]
    assert len(lines) == dm.info["documents"]["augmented"]["generated"]
    assert {(r["passage_id"], r["kind"]) for r in lines} >= {("zorb", "qa"), ("quill", "paraphrase"), ("zorb", "cloze")}
    assert sum(r["kept"] for r in lines) == 8 and all((r["reason"] is None) == r["kept"] for r in lines)
    assert {"passage_id": "winter", "kind": "qa", "question": "What colour was the snow?", "answer": "white",
            "kept": False, "reason": "answer_not_in_passage"} in lines
    # include_passage=false: the study material alone (a passage without any is not trained at all)
    only = study_dm(tiny_tok, tmp_path, augment=spec(kinds=["qa", "paraphrase", "cloze"], include_passage=False,
                                                      per_passage={"qa": 2, "paraphrase": 8, "cloze": 4}))
    assert {e.template.split(":")[0] for e in only.training_examples(0)} == {"qa", "paraphrase", "cloze"}
    assert {e.fact_id for e in only.training_examples(0)} == {"zorb", "quill"}
    with pytest.raises(DocumentError, match="task 0 has nothing to train on: none of its passages kept study material"):
        study_dm(tiny_tok, tmp_path, docs=[WINTER], passages_per_task=1, facts_per_task=1,
                 augment=spec(kinds=["qa"], include_passage=False))


def test_evaluation_questions_never_reach_the_generator_the_material_or_training(tiny_tok, tmp_path, fake_generator):
    dm = study_dm(tiny_tok, tmp_path)
    assert fake_generator and not any(SENTINEL in p or "Blix" in p for p in fake_generator)  # prompts: passage text only
    assert all(p.endswith((f"Passage: {d['text']}\nQuestion:", f"Passage: {d['text']}\nRestated:\n"))
               for p in fake_generator for d in study_docs() if d["text"] in p)
    items = [it for its in dm._augmented.values() for it in its]
    stated = [it for it in items if SENTINEL in (it.question + it.text)]
    assert [it.reason for it in stated] == ["is_evaluation_question"]  # generated by chance, dropped
    assert [it.reason for it in items if it.question == "Who invented the quillophone?"] == ["is_evaluation_question"]
    assert not any(SENTINEL in it.question + it.text for it in items if it.kept)
    batches = [dm.collate(b) for b in dm.train_batches(0)]
    decoded = [tiny_tok.decode(row) for b in batches for row in b["input_ids"].tolist()]
    assert decoded and not any(SENTINEL in t for t in decoded)
    fitted = [tiny_tok.decode(e.input_ids) for e in (*dm.training_examples(0), *dm.background_examples())]
    assert not any(SENTINEL in t or "Which river flows through Vellmoor" in t for t in fitted)  # nor slot statistics
    assert SENTINEL in [f.question for f in dm.task_facts(0)]  # ... and it is still asked in recall
    from smf_lightning.data.facts import Fact

    with pytest.raises(ValueError, match="evaluation-only question attached to a passage"):
        dm._encode(Fact("zorb", SENTINEL.lower() + " ", "x", ("x",)), "qa")


def test_cached_material_needs_no_generation_and_a_generator_of_its_own(tiny_tok, tmp_path, fake_generator):
    from smf_lightning.models.tiny import tiny_qwen2

    first = study_dm(tiny_tok, tmp_path)
    fake_generator.clear()
    again = study_dm(tiny_tok, tmp_path)
    assert not fake_generator and again.info["documents"]["augmented"] == first.info["documents"]["augmented"]
    # a generator of its own: a local model directory, loaded as a base model; its fingerprint keys the cache
    folder = tmp_path / "gen"
    tiny_qwen2(seed=3).save_pretrained(folder)
    tiny_tok.save_pretrained(folder)
    other = study_dm(tiny_tok, tmp_path, augment=spec(kinds=["qa"], generator=str(folder),
                                                       per_passage={"qa": 2, "paraphrase": 0, "cloze": 0}))
    info = other.info["documents"]["augmented"]
    assert info["generator"] == str(folder) and info["generator_fingerprint"] != first.info["documents"]["augmented"][
        "generator_fingerprint"]
    assert len(fake_generator) == 3 and info["per_kind"]["qa"]["kept"] == 3


def test_cloze_alone_needs_no_generator(tiny_tok, tmp_path, fake_generator):
    dm = study_dm(tiny_tok, tmp_path, augment=spec(kinds=["cloze"]))
    assert not fake_generator and "generator_fingerprint" not in dm.info["documents"]["augmented"]
    assert dm.info["documents"]["augmented"]["per_kind"]["cloze"]["kept"] == 2


# ----------------------------------------------------------------------------- probe and the dev/test halves


def test_questions_the_model_answers_are_left_out_and_counted(tiny_tok, tmp_path, monkeypatch):
    """The probe asks each candidate passage's questions closed-book: an answered question is left
    out; a passage whose every question is answered is passed over for the next one."""
    from smf_lightning.eval import scoring

    answers = {"What is the capital of Zorbania?": "Vellmoor", "Who invented the quillophone?": "Ada Brenn"}

    def generate(model, tokenizer, prompts, max_new_tokens, batch_size, stop_at_newline=True):
        return [next((a for q, a in answers.items() if p.endswith(f"{q}\nAnswer:") or
                      p.endswith(f"{q}\nReply:")), "no idea") for p in prompts]

    monkeypatch.setattr(scoring, "generate_greedy", generate)
    dm = study_dm(tiny_tok, tmp_path, docs=DOCS, probe=True, augment=None, n_tasks=2, passages_per_task=2,
                  facts_per_task=2)
    from smf_lightning.data.facts import seeded_order

    probe = dm.info["documents"]["probe"]
    used = [pid for task in dm.info["documents"]["task_passage_ids"] for pid in task]
    questions = [f.question for j in range(2) for f in dm.task_facts(j)]
    assert sorted(used) == ["dulmar", "ferrow", "line-3", "zorb"]  # quill's one question is answered: passed over
    order = [["zorb", "quill", "line-3", "ferrow", "dulmar"][i] for i in seeded_order(5, 0, "stream")]
    assert probe["passages_all_known"] == (["quill"] if order.index("quill") < 4 else [])  # named when passed over
    assert "What is the capital of Zorbania?" not in questions  # answered: left out ...
    assert "Which river flows through Vellmoor?" in questions  # ... the passage's other question stays
    assert probe["probed"] == 6 and probe["known"] == 2 and probe["template_known"] == 0
    assert dm.info["documents"]["qa_per_task"] == [sum(len(dm.task_facts(j)) for j in [k]) for k in range(2)]


def test_dev_and_test_halves_are_disjoint_whatever_the_seed(tiny_tok, tmp_path):
    passages = [Passage(f"p{i}", f"Passage {i} says the number is {i}.", ()) for i in range(200)]
    df = DocumentFile("x", "jsonl", passages, [None] * 200, [p.id for p in passages], 200)
    dev, test = split_passages(df, "dev"), split_passages(df, "test")
    assert {p.id for p in dev.passages}.isdisjoint({p.id for p in test.passages})
    assert len(dev.passages) + len(test.passages) == 200 and 70 < len(dev.passages) < 130
    assert dev.counts()["passage_split"] == "dev" and dev.counts()["outside_split"] == len(test.passages)
    assert split_passages(df, None) is df
    assert all(passage_split_of(p.id) == "dev" for p in dev.passages)
    docs = [{"id": f"p{i}", "text": f"Passage {i} says the number is {i}.",
             "qa": [{"question": f"What number does passage {i} give?", "answers": [str(i)]}]} for i in range(24)]
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    ids = {}
    for split in ("dev", "test"):
        for seed in (0, 1):
            cfg = _data_cfg("documents", path=str(path), n_tasks=2, passages_per_task=3, facts_per_task=3, suites={},
                            background={"synthetic": 4}, max_seq_len=32, chunk_overlap=4, probe=False, seed=seed,
                            passage_split=split)
            dm = FactStreamDataModule(tokenizer=tiny_tok, **cfg)
            dm.setup()
            ids[split, seed] = {p for task in dm.info["documents"]["task_passage_ids"] for p in task}
    for seed in (0, 1):
        for other in (0, 1):
            assert ids["dev", seed].isdisjoint(ids["test", other])


@pytest.mark.real
def test_builtin_example_halves_hold_the_augmented_experiment():
    df = squad_example()
    dev, test = split_passages(df, "dev"), split_passages(df, "test")
    assert not {p.id for p in dev.passages} & {p.id for p in test.passages}
    assert min(len(dev.passages), len(test.passages)) >= 5 * 20 * 2  # documents_augmented: 5 x 20, room for the probe


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("overrides, message", [
    (("data.augment.kinds=[qa,summary]",), "data.augment.kinds=['qa', 'summary']"),
    (("data.augment.kinds=[qa]", "data.augment.prompts.qa=Ask questions."), "data.augment.prompts.qa='Ask questions.'"),
    (("data.augment.kinds=[qa]", "data.augment.per_passage.qa=-2"), "data.augment.per_passage.qa=-2"),
    (("data.augment.kinds=[qa]", "data.augment.generator=/no/such/model"),
     "data.augment.generator='/no/such/model' cannot be loaded"),
    (("data.passage_split=train",), "data.passage_split='train'"),
])
def test_cli_bad_augment_config_fails_before_the_model_loads(tmp_path, overrides, message):
    res, out = run_cli(tmp_path, write_jsonl(tmp_path / "d.jsonl", DOCS), *overrides)
    assert res.returncode == 2, out[-3000:]
    assert message in out and "loading model" not in out and "Traceback" not in out


def test_cli_trains_on_documents_with_study_material(tmp_path):
    """experiment=tiny on data=documents with every kind of material: the generations are in the
    cache (written for the tiny model's fingerprint), so the run reads them; the run dir records
    them and summary.json counts them; steps follow the sequences the material adds."""
    from smf_lightning.eval.probe import model_fingerprint
    from smf_lightning.models.tiny import tiny_qwen2

    fingerprint = model_fingerprint(tiny_qwen2(seed=0))  # experiment=tiny's model (seed 0)
    cache = tmp_path / "cache"
    for kind, replies in (("qa", QA_REPLIES), ("paraphrase", PARA_REPLIES)):
        outputs = {augment.passage_key(d["text"]): next((r for k, r in replies.items() if d["text"].startswith(k)), "")
                   for d in DOCS}
        f = augment_cache_file(cache, fingerprint, kind, PROMPTS[kind], 256)
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"header": {}, "outputs": outputs}))
    res, out = run_cli(tmp_path, write_jsonl(tmp_path / "d.jsonl", DOCS), "data.augment.kinds=[qa,paraphrase,cloze]",
                       "data.max_seq_len=64", f"data.cache_dir={cache}", "method.select_per=fact")
    assert res.returncode == 0, out[-3000:]
    assert "Augmenting" not in out  # read from the cache: nothing generated
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    info = summary["data"]["documents"]
    aug = info["augmented"]
    assert aug["kinds"] == ["qa", "paraphrase", "cloze"] and aug["kept"] > 0 and "probe" in info
    lines = {k: (run / "augmented" / f"task_{k}.jsonl").read_text().splitlines() for k in range(2)}
    records = [json.loads(line) for k in range(2) for line in lines[k]]
    assert len(records) == aug["generated"] and sum(r["kept"] for r in records) == aug["kept"]
    task_ids = info["task_passage_ids"]
    for k in range(2):
        assert {json.loads(line)["passage_id"] for line in lines[k]} <= set(task_ids[k])
    assert summary["steps"] == sum((n + 1) // 2 * 2 for n in aug["sequences_per_task"])  # batch 2, 2 passes
    assert sum(aug["sequences_per_task"]) > sum(info["chunks_per_task"])


def test_documents_augmented_experiment_composes_and_validates():
    from hydra import compose, initialize_config_dir

    from smf_lightning.config import validate_config

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=documents_augmented"])
        test = compose("train", overrides=["experiment=documents_augmented", "data.passage_split=test"])
    validate_config(cfg)
    validate_config(test)
    d = cfg.data
    assert d.n_tasks == 5 and d.passages_per_task == 20 and d.path is None and d.passage_split == "dev"
    assert d.example_max_answer_words == 5 and d.probe and d.augment.kinds and d.augment.include_passage


def test_a_generator_is_located_without_loading_it(tmp_path, tiny_tok):
    from smf_lightning.models.loading import ModelLoadError, locate_model
    from smf_lightning.models.tiny import tiny_qwen2

    assert locate_model("qwen2.5-0.5b-offline") == "offline model qwen2.5-0.5b-offline"
    tiny_qwen2().save_pretrained(tmp_path / "gen")
    assert locate_model(str(tmp_path / "gen")) == f"local directory {tmp_path / 'gen'}"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a Hugging Face model directory with safetensors weights"):
        locate_model(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="no such directory"):
        locate_model(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="neither a local directory, a hub id"):
        locate_model("not a model")
    with pytest.raises(ModelLoadError, match="no packaged offline equivalent"):
        locate_model("someone/some-model", source="offline")
