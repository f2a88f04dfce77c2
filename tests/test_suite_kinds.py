"""Held-out suites of one's own from config (eval/custom_suites.py): every kind read from every
format scores exactly what the kind's class scores on the same items; the built-in suites are
instances of the kinds (same numbers from a file of their items); bad configs fail with a clear
message before any model loads; custom suites get per-item files, intervals, the prefix cache
and a before-cache key that follows their data."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from smf_lightning.config import ConfigError
from smf_lightning.data.sources import ChoiceItem, MathItem, PassageItem, QAItem
from smf_lightning.eval.custom_suites import SuiteConfigError, build_custom_suite, validate_suites
from smf_lightning.eval.suites import (
    GSM8KSuite,
    HellaSwagSuite,
    LambadaSuite,
    MultipleChoiceSuite,
    NQOpenSuite,
    PerplexitySuite,
    QASuite,
    TextItem,
    suite_subset_order,
)

WORDS = "the a man dog sat on roof quickly house river city old new red blue green ran jumps over lazy fox".split()
SEED = 3


def _text(rng: torch.Generator, n: int) -> str:
    return " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (n,), generator=rng))


def _records(kind: str) -> tuple[list[dict], dict, list]:
    """(records under field names of the data's own, the `fields` mapping, the items they hold)
    for 7 items of varied lengths."""
    rng = torch.Generator().manual_seed(["qa", "multiple_choice", "perplexity", "last_word"].index(kind))
    n = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=rng))  # noqa: E731
    records, items = [], []
    for i in range(7):
        if kind == "qa":
            q, golds = _text(rng, n(2, 8)), [_text(rng, n(1, 3)) for _ in range(n(1, 3))]
            records.append({"key": f"r{i}", "q": q, "golds": golds})
            items.append(QAItem(f"r{i}", q, tuple(golds)))
        elif kind == "multiple_choice":
            ctx, ends, gold = _text(rng, n(3, 10)), [_text(rng, n(1, 5)) for _ in range(4)], i % 4
            records.append({"key": f"r{i}", "ctx": ctx, "endings": ends, "gold": gold})
            items.append(ChoiceItem(f"r{i}", ctx, tuple(ends), gold))
        elif kind == "perplexity":
            prefix, passage = (_text(rng, n(2, 6)) if i % 2 else None), _text(rng, n(3, 12))
            records.append({"key": f"r{i}", "prefix": prefix, "passage": passage})
            items.append(TextItem(f"r{i}", passage, prefix))
        else:  # last_word
            sentence = _text(rng, n(3, 12))
            records.append({"key": f"r{i}", "sentence": sentence})
            items.append(PassageItem(f"r{i}", sentence, sentence.split()[-1]))
    fields = {"qa": {"question": "q", "answers": "golds"},
              "multiple_choice": {"context": "ctx", "choices": "endings", "label": "gold"},
              "perplexity": {"text": "passage", "context": "prefix"},
              "last_word": {"text": "sentence"}}[kind]
    return records, {"id": "key", **fields}, items


def _write(records: list[dict], fmt: str, folder: Path) -> Path:
    """`records` as a JSONL file, a CSV file (lists joined by "|", None as an empty cell) or a
    datasets save_to_disk directory."""
    if fmt == "jsonl":
        path = folder / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif fmt == "csv":
        path = folder / "data.csv"
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(records[0]))
            w.writeheader()
            w.writerows({k: "|".join(v) if isinstance(v, list) else ("" if v is None else v) for k, v in r.items()}
                        for r in records)
    else:
        import datasets

        path = folder / "data_disk"
        datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


KIND_CLASS = {"qa": QASuite, "multiple_choice": MultipleChoiceSuite, "perplexity": PerplexitySuite,
              "last_word": LambadaSuite}
METRICS = {"qa": {"f1", "em", "answer_nll"}, "multiple_choice": {"acc_norm", "acc"},
           "perplexity": {"ppl", "nll", "bits_per_byte"}, "last_word": {"last_word_ppl", "last_word_acc"}}


@pytest.fixture(scope="module")
def tiny_model():
    from smf_lightning.models.tiny import tiny_qwen2

    return tiny_qwen2(seed=0)


def _opts(kind: str, source: Path | str, fields: dict, n_items: int = 5, **extra) -> dict:
    opts = {"kind": kind, "source": str(source), "fields": fields, "n_items": n_items, **extra}
    if kind == "qa":
        opts["max_new_tokens"] = 3
    return opts


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "disk"])
@pytest.mark.parametrize("kind", ["qa", "multiple_choice", "perplexity", "last_word"])
def test_every_kind_from_every_format_scores_its_items(kind, fmt, tmp_path, tiny_model, tiny_tok):
    records, fields, items = _records(kind)
    suite = build_custom_suite("mine", _opts(kind, _write(records, fmt, tmp_path), fields), SEED, generation_batch_size=2)
    chosen = [items[i] for i in suite_subset_order("mine", len(items), SEED)[:5]]
    assert type(suite) is KIND_CLASS[kind] and suite.name == "mine"
    assert list(suite.items) == chosen  # the seeded subset of the items the file holds, field by field
    assert suite.origin.startswith(fmt + ":")
    result = suite.evaluate(tiny_model, tiny_tok, batch_size=2)
    assert set(result) == METRICS[kind] and all(math.isfinite(v) for v in result.values())
    direct = KIND_CLASS[kind](items=chosen, name="mine", **({"max_new_tokens": 3, "generation_batch_size": 2}
                                                             if kind == "qa" else {}))
    assert direct.evaluate(tiny_model, tiny_tok, batch_size=2) == result
    assert direct.last_items == suite.last_items and suite.last_items["id"] == [it.id for it in chosen]


def test_a_hub_id_is_loaded_with_its_subset_and_split(monkeypatch, tiny_model, tiny_tok):
    import datasets

    records, fields, items = _records("multiple_choice")
    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(records)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    suite = build_custom_suite("hub_mc", _opts("multiple_choice", "someone/mc-set", fields, subset="easy",
                                               split="validation"), SEED)
    assert calls == [("someone/mc-set", "easy", "validation")]
    assert suite.origin == "hub:someone/mc-set"
    assert list(suite.items) == [items[i] for i in suite_subset_order("hub_mc", len(items), SEED)[:5]]


def test_unmapped_fields_keep_their_own_names_and_ids_default_to_lines(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "who", "answers": "Bo"}\n\n{"question": "what", "answers": ["X", "Y"]}\n')
    suite = build_custom_suite("q", {"kind": "qa", "source": str(path), "n_items": 2}, SEED)
    assert sorted(suite.items, key=lambda it: it.id) == [QAItem("line-1", "who", ("Bo",)), QAItem("line-3", "what", ("X", "Y"))]


def test_perplexity_kind_equals_an_unpadded_reference(tiny_model, tiny_tok):
    """Token log-likelihood of the text (after the context and a space when it has one; else
    from its second token), batched and padded, equals one unpadded forward per item."""
    items = [TextItem("a", "the dog sat on the roof quickly", "a man"), TextItem("b", "red blue green fox"),
             TextItem("c", "old house", "the river city ran over the lazy"), TextItem("d", "new city jumps over a")]
    suite = PerplexitySuite(items)
    result = suite.evaluate(tiny_model, tiny_tok, batch_size=3)
    logprobs, tokens, nbytes = [], [], []
    for it in items:
        ctx = tiny_tok(it.context)["input_ids"] if it.context is not None else []
        cont = tiny_tok(" " + it.text if ctx else it.text, add_special_tokens=not ctx)["input_ids"]
        ids = torch.tensor([ctx + cont])
        scored = len(cont) if ctx else len(cont) - 1
        with torch.no_grad():
            lp = tiny_model(ids).logits.float().log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
        logprobs.append(float(lp[-scored:].sum()))
        tokens.append(scored)
        nbytes.append(len((" " + it.text).encode()) if ctx else len(tiny_tok.decode(cont[1:]).encode()))
    assert suite.last_items["tokens"] == tokens and suite.last_items["bytes"] == nbytes
    torch.testing.assert_close(torch.tensor(suite.last_items["logprob"]), torch.tensor(logprobs), atol=1e-4, rtol=0)
    assert result["ppl"] == pytest.approx(math.exp(-sum(suite.last_items["logprob"]) / sum(tokens)), rel=1e-12)
    assert result["nll"] == pytest.approx(math.log(result["ppl"]), rel=1e-9)
    assert result["bits_per_byte"] == pytest.approx(result["nll"] * sum(tokens) / sum(nbytes) / math.log(2), rel=1e-9)


# ----------------------------------------------------------------------------- the built-in suites are instances


def test_builtin_suites_are_the_kinds_and_a_file_of_their_items_scores_the_same(tmp_path, tiny_model, tiny_tok):
    """nq_open, hellaswag, lambada read back from a JSONL of their items, and gsm8k as a
    perplexity suite of "solution + answer" after "Question: ...\\nAnswer:", give every per-item
    column and metric of the built-in suite exactly."""
    assert issubclass(NQOpenSuite, QASuite) and issubclass(HellaSwagSuite, MultipleChoiceSuite)
    assert issubclass(GSM8KSuite, PerplexitySuite)
    qa = [QAItem(f"q{i}", f"who wrote book {i}", (f"Author {i}", "someone")) for i in range(4)]
    mc = [ChoiceItem(f"c{i}", f"A man is on roof {i}. He", ("starts pulling up roofing.", "eats a cube.", "runs."), i % 3)
          for i in range(4)]
    passages = [PassageItem(f"p{i}", f"the quick brown fox {i} jumps over the lazy dog", "dog") for i in range(4)]
    math_items = [MathItem(f"m{i}", f"What is {i} + 2?", f"We add {i} + 2 = {i + 2}.", str(i + 2)) for i in range(4)]
    files = {
        "qa": [{"id": it.id, "question": it.question, "answers": list(it.answers)} for it in qa],
        "multiple_choice": [{"id": it.id, "context": it.ctx, "choices": list(it.endings), "label": it.label} for it in mc],
        "last_word": [{"id": it.id, "text": it.text} for it in passages],
        "perplexity": [{"id": it.id, "context": it.question, "text": f"{it.solution}\nThe answer is {it.answer}."}
                       for it in math_items],
    }
    builtin = {"qa": NQOpenSuite(qa, max_new_tokens=4), "multiple_choice": HellaSwagSuite(mc),
               "last_word": LambadaSuite(passages, score_passage=True), "perplexity": GSM8KSuite(math_items)}
    extra = {"qa": {"max_new_tokens": 4}, "last_word": {"score_passage": True},
             "perplexity": {"prompt": "Question: {context}\nAnswer:", "max_length": 768}}
    for kind, rows in files.items():
        folder = tmp_path / kind
        folder.mkdir()
        ref = builtin[kind]
        suite = build_custom_suite(ref.name, {"kind": kind, "source": str(_write(rows, "jsonl", folder)), "n_items": 4,
                                              **extra.get(kind, {})}, SEED)
        # the seeded subset of 4 out of 4 is a permutation: score the built-in suite in that order
        ref.items = [next(it for it in ref.items if it.id == s.id) for s in suite.items]
        ref_result, result = ref.evaluate(tiny_model, tiny_tok, 2), suite.evaluate(tiny_model, tiny_tok, 2)
        for column, values in ref.last_items.items():
            assert suite.last_items[column] == values, (kind, column)
        assert {m: result[m] for m in ref_result} == ref_result, kind


# ----------------------------------------------------------------------------- bad configs


def _bad_cases(tmp_path: Path) -> list[tuple[dict, str]]:
    records, fields, _ = _records("multiple_choice")
    good = _write(records, "jsonl", tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    bad_label = tmp_path / "bad_label.jsonl"
    bad_label.write_text('{"ctx": "a b", "endings": ["x", "y"], "gold": 0}\n{"ctx": "c d", "endings": ["x", "y"], "gold": 5}\n')
    mc = lambda **kw: {"mine": {"kind": "multiple_choice", "source": str(good), "fields": fields, "n_items": 3, **kw}}  # noqa: E731
    return [
        (mc(kind="ranking"), r"data\.suites\.mine\.kind='ranking'.*qa \| multiple_choice \| perplexity \| last_word"),
        ({"mmlu": {"n_items": 4}}, r"data\.suites\.mmlu: 'mmlu' is not a built-in suite.*kind: .*source: FILE"),
        (mc(source=str(tmp_path / "nope.jsonl")), r"suite 'mine' file .*nope\.jsonl does not exist \(data\.suites\.mine\.source\)"),
        (mc(fields={**fields, "label": "answer_idx"}),
         r"data\.jsonl:1: no field 'answer_idx' for the label \(the record has key, ctx, endings, gold\); "
         r"map it with data\.suites\.mine\.fields\.label=FIELD"),
        (mc(fields={**fields, "label": "answer_idx"}, source=str(_write(records, "csv", tmp_path))),
         r"data\.csv has no column 'answer_idx' for the label .*map it with data\.suites\.mine\.fields\.label=COLUMN"),
        (mc(fields={"question": "ctx"}), r"data\.suites\.mine\.fields\.question is not a field of kind multiple_choice"),
        (mc(fields={**fields, "choices": None}), r"data\.suites\.mine\.fields\.choices=null; kind multiple_choice needs"),
        (mc(source=str(empty)), r"suite 'mine': .*empty\.jsonl has no usable multiple_choice items \(0 records read"),
        (mc(n_items=50), r"n_items=50, but .* has only 7 usable items .*lower n_items"),
        (mc(n_items=0), r"data\.suites\.mine\.n_items=0"),
        (mc(prompt_style="x"), r"data\.suites\.mine\.prompt_style is not an option of kind multiple_choice; its options: "
                               r"prompt, max_length"),
        (mc(source=str(bad_label)), r"bad_label\.jsonl:2: label \(field 'gold'\) must be the index of the right choice, "
                                    r"0\.\.1; got 5\. Fix the record, or skip .* data\.suites\.mine\.skip_invalid=true"),
        (mc(format="parquet"), r"data\.suites\.mine\.format='parquet'"),
        ({"lambada": {"n_items": 4, "fields": {"text": "t"}}}, r"data\.suites\.lambada\.fields needs data\.suites\.lambada\.source"),
        ({"nq_open": {"n_items": 4, "max_new": 3}}, r"data\.suites\.nq_open\.max_new is not an option of the built-in nq_open"),
    ]


def test_bad_suite_configs_say_what_is_wrong_and_what_to_do(tmp_path):
    for suites, message in _bad_cases(tmp_path):
        with pytest.raises(SuiteConfigError, match=message):
            validate_suites(suites)
    assert issubclass(SuiteConfigError, ConfigError)  # exit code 2, one line, as every config error
    records, fields, _ = _records("qa")
    validate_suites({"nq_open": {"n_items": 4}, "ok": _opts("qa", _write(records, "csv", tmp_path), fields)})


def test_skip_invalid_skips_and_counts_bad_records(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text('{"context": "a b", "choices": ["x", "y"], "label": 0}\n{"context": "c", "choices": ["x"], "label": 0}\n'
                    '{"context": "e f", "choices": ["x", "y"], "label": "1"}\n')
    suite = build_custom_suite("mc", {"kind": "multiple_choice", "source": str(path), "n_items": 2, "skip_invalid": True}, 0)
    assert sorted(it.id for it in suite.items) == ["line-1", "line-3"] and {it.label for it in suite.items} == {0, 1}


def test_the_run_config_check_reads_the_suite_before_the_model_loads(tmp_path):
    """validate_config (train.py calls it before loading anything) stops at a bad suite."""
    from hydra import compose, initialize_config_dir

    from smf_lightning.config import validate_config
    from smf_lightning.train import conf_dir

    missing = tmp_path / "missing.csv"
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        cfg = compose(config_name="train", overrides=[
            "experiment=tiny", f"+data.suites.mine={{kind: qa, source: '{missing}', n_items: 2}}"])
    with pytest.raises(SuiteConfigError, match=r"suite 'mine' file .*missing\.csv does not exist"):
        validate_config(cfg)


# ----------------------------------------------------------------------------- in a run


def _smf_model():
    from smf_lightning.memory import MemoryConfig, retrofit
    from smf_lightning.memory.retrofit import freeze_all_but_values
    from smf_lightning.models.tiny import tiny_qwen2

    model = retrofit(tiny_qwen2(seed=1), MemoryConfig(layers=[2, 3], n_slots=64, heads=2, knn=4, k_dim=16))
    freeze_all_but_values(model)
    return model


def test_custom_suites_hit_the_prefix_cache_with_the_same_numbers(tmp_path, tiny_tok):
    """Point 2 (other memory values) reuses every forward point 1 kept, for every kind, and
    equals the uncached evaluation in every item column."""
    from smf_lightning.eval.prefix_states import EvalPrefixStates
    from smf_lightning.memory import memory_layers

    suites = []
    for kind in KIND_CLASS:
        records, fields, _ = _records(kind)
        folder = tmp_path / kind
        folder.mkdir()
        suites.append(build_custom_suite(kind, _opts(kind, _write(records, "jsonl", folder), fields), SEED,
                                         generation_batch_size=2))
    model, states = _smf_model(), EvalPrefixStates()

    def evaluate(with_states):
        out = []
        for suite in suites:
            if with_states:
                with states.active(model), states.scope(suite.name):
                    suite.evaluate(model, tiny_tok, 2)
            else:
                suite.evaluate(model, tiny_tok, 2)
            out.append(dict(suite.last_items))
        return out

    for seed in (1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            for mem in memory_layers(model).values():
                mem.values.weight.normal_(0, 1.0)
        assert evaluate(True) == evaluate(False)
        if seed == 1:
            fill = states.misses
            assert states.hits == 0 and fill > 0
    assert states.misses == fill and states.hits == fill


def test_before_cache_key_follows_the_suite_file(tmp_path, tiny_tok):
    from omegaconf import OmegaConf

    from smf_lightning.eval.before_cache import before_eval_key
    from smf_lightning.streams.datamodule import FactStreamDataModule
    from tests.test_data import SMALL, _data_cfg

    records, fields, _ = _records("qa")
    path = _write(records, "jsonl", tmp_path)
    suites = {"mine": _opts("qa", path, fields)}
    cfg = OmegaConf.create({"model": {"name": "m", "source": "tiny", "dtype": "float32"}, "data": {"suites": suites}})

    def key():
        dm = FactStreamDataModule(tokenizer=tiny_tok, **_data_cfg(**{**SMALL, "suites": suites}))
        dm.setup()
        assert isinstance(dm.heldout_suites()["mine"], QASuite)
        return before_eval_key(cfg, dm, "fp")

    first = key()
    assert key() == first
    records[0]["golds"] = ["another answer"]  # same config, same ids: only the file's content changes
    _write(records, "jsonl", tmp_path)
    changed = key()
    assert changed["suite_items"] != first["suite_items"] and changed["suites"] == first["suites"]


def test_a_tiny_run_writes_items_intervals_and_caches_before_for_custom_suites(tmp_path):
    """A whole run with a suite of every kind from files: items/<point>/<suite>.csv, heldout.csv
    interval columns and summary.json entries for each; the second run loads 'before' from
    the cache; a changed suite file is a new key."""
    from tests.test_train import cli

    overrides = []
    for kind in KIND_CLASS:
        records, fields, _ = _records(kind)
        folder = tmp_path / "data" / kind
        folder.mkdir(parents=True)
        path = _write(records, "csv" if kind == "qa" else "jsonl", folder)
        mapping = ", ".join(f"{k}: {v}" for k, v in fields.items())
        overrides.append(f"+data.suites.my_{kind}={{kind: {kind}, source: '{path}', n_items: 4, fields: {{{mapping}}}}}")
    base = ["experiment=tiny", "logger.wandb.mode=offline", "callbacks.checkpoint.enabled=false", "callbacks.plots=false",
            "callbacks.intervals.resamples=50", "callbacks.cache_before_eval=true", f"paths.cache_dir={tmp_path / 'cache'}",
            "~data.suites.hellaswag", "~data.suites.gsm8k", *overrides]
    first = cli([*base, f"hydra.run.dir={tmp_path / 'run1'}"])
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "run1"
    summary = json.loads((run / "summary.json").read_text())
    rows = list(csv.DictReader((run / "heldout.csv").open()))
    for kind in KIND_CLASS:
        name = f"my_{kind}"
        assert summary["heldout"][name]["ci95"] is not None and summary["heldout"][name]["change_ci95"] is not None
        items = list(csv.DictReader((run / "items" / "after_task_1" / f"{name}.csv").open()))
        assert len(items) == 4
        assert {r["metric"] for r in rows if r["suite"] == name} == METRICS[kind]
    second = cli([*base, f"hydra.run.dir={tmp_path / 'run2'}"])
    assert second.returncode == 0 and "loaded from" in second.stdout + second.stderr
    (tmp_path / "data" / "perplexity" / "data.jsonl").write_text(
        json.dumps({"key": "z", "passage": "the dog sat on the roof"}) + "\n" * 1
        + "".join(json.dumps(r) + "\n" for r in _records("perplexity")[0]))
    third = cli([*base, f"hydra.run.dir={tmp_path / 'run3'}"])
    assert third.returncode == 0 and "loaded from" not in third.stdout + third.stderr
