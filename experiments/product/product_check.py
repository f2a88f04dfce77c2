"""Product check: the promises of docs/usage.md "Using the updated model", measured on a real run.

A finished quickstart run (``python -m smf_lightning.train experiment=facts_seq_quick``: 3 tasks x
10 TriviaQA facts) is asked, exported, loaded, made to forget and continued, with the product's own
code (src/smf_lightning/product/, memory/ledger.py), and every promise is counted:

1. ask: every taught fact's question under the run's first training template, asked as
   ``python -m smf_lightning.ask`` asks it (product/answer.py, one call for all questions), against
   the run's own prediction after its last task (items/after_task_<last>/fact_recall.csv, rows of
   that template): identical answers / facts, and recall (exact match, eval/suites.py's scoring);
   ``--explain``: how often a fact's own question lists the fact, and first.
2. export: a full and a delta export of the run (product/exports.py, as ``python -m
   smf_lightning.export`` writes them): sizes in bytes and the delta's share; each loaded with
   ``smf_lightning.load`` and its logits compared with the run's model, bit for bit (sha256 of the
   float32 logits at every position, one prompt per forward, no padding), on every stream prompt
   (each fact under each template, held-out ones too) and on the suite prompts the run exposes
   (the known-facts suite triviaqa_known, nq_open and LAMBADA's passages; a tiny run has no
   triviaqa_known).
3. forget: the first N facts of the last task (stream order; ``--forget N``, default 3) forgotten
   from the full export into a new export (product/edit.py, as ``python -m smf_lightning.forget``
   does): their recall on the base model (the run's own "before" evaluation), on the run and after
   forgetting; the other facts' recall before and after; the share of other facts that shared a
   restored row (forget's report); and the logits of the suite prompts, 20 short words and the
   facts' own prompts before vs after, split by whether the prompt reads a restored row (any
   position, any head: the rows the memory addresses, before the read gate). The promise:
   identical when it reads none.
4. continue: one more task of new facts trained on the full export (``model.init_checkpoint``,
   the run's own overrides, ``data.n_tasks=1``; TriviaQA: ``data.exclude_streams`` = the built-in
   streams holding the run's facts, so none comes back; synthetic facts: the next data seed; the
   held-out suites but one dropped, only recall is read), then the continued model asked the new
   and the old questions: new-task recall, and the old facts' recall after minus before (BWT-like).

Every step prints a progress line and its seconds, and is skipped when its results are already in
``--out`` for the same run (exports and the continued run are reused when complete): a stopped check
resumes where it stopped. Results: ``--out``/product_check.json (everything), product_check.csv
(step, measure, value), product_check_facts.csv (per fact), and the table in
experiments/product/PRODUCT.md between its markers.

    python experiments/product/product_check.py --train              # trains the quickstart, then 1-4
    python experiments/product/product_check.py --run RUN_DIR        # a finished quickstart run
    python experiments/product/product_check.py --tiny               # smoke check on experiment=tiny
    python experiments/product/product_check.py --run RUN_DIR --redo forget continue
"""

from __future__ import annotations

import argparse
import csv
import gc
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from smf_lightning.eval.metrics import last_task_point

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PAGE = HERE / "PRODUCT.md"
STEPS = ("ask", "export", "forget", "continue")

# the quickstart as docs/usage.md runs it; the tiny smoke run as tests/test_product.py does (the
# recipe's read gate on, so write keys are part of every check)
QUICKSTART = ["experiment=facts_seq_quick"]
TINY = ["experiment=tiny", "logger.wandb.mode=disabled", "callbacks.plots=false", "model.memory.read_gate=0.5"]
# the continued run only needs recall: no held-out suites, no plots, no wandb files
CONTINUE_QUIET = ["logger.wandb.mode=disabled", "callbacks.plots=false"]
# suites whose prompts the logit checks read: the known-facts suite (locality), open QA and, in
# another format than the facts' QA templates, LAMBADA's passages
SUITE_PROMPTS = ("triviaqa_known", "nq_open", "lambada")
# short prompts for the forget check, as tests/test_product.py uses: a one- or two-token prompt
# addresses few rows, so some read none of the restored ones even in a small memory
WORDS = ["the", "a", "of", "Paris", "memory", "one", "two", "slot", "fox", "dog", "capital", "1925", "year",
         "crane", "novel", "who", "what", "when", "The cat", "In 1990"]
# the continued run's one held-out suite, the first of these it has (16 GSM8K solutions scored: seconds)
KEEP_SUITE = ("gsm8k", "lambada", "nq_open", "hellaswag")


def log(msg: str) -> None:
    print(f"[product] {msg}", flush=True)


def runs_dir(name: str) -> Path:
    """Where this check's runs and exports live, outside the work tree (as experiments/study.py's
    runs_dir: $SMF_STUDY_RUNS, default <SMF cache>/study_runs)."""
    base = os.environ.get("SMF_STUDY_RUNS") or Path(os.environ.get("SMF_CACHE") or Path.home() / ".cache" / "smf_lightning") / "study_runs"
    return Path(base) / name


@contextmanager
def timed(record: dict, key: str):
    t0 = time.perf_counter()
    yield
    record[key] = round(time.perf_counter() - t0, 1)


# ---- runs ---------------------------------------------------------------------------------------
def train(run_dir: Path, overrides: list[str]) -> float:
    """``python -m smf_lightning.train`` into ``run_dir`` (resumed from its last checkpoint if an
    earlier launch stopped); its output goes to ``run_dir``.out. Seconds taken."""
    if (run_dir / "summary.json").is_file():
        log(f"  {run_dir} is finished already")
        return 0.0
    cmd = [sys.executable, "-m", "smf_lightning.train", *overrides, f"hydra.run.dir={run_dir}"]
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        cmd.append(f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    out = run_dir.with_name(run_dir.name + ".out")
    log(f"  training: {' '.join(cmd[1:])}  (log: {out})")
    env = dict(os.environ, WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    with out.open("a") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not (run_dir / "summary.json").is_file():
        raise SystemExit(f"training failed (exit {rc}); see {out}")
    return time.perf_counter() - t0


def read_items(run_dir: Path, point: str) -> dict[tuple[str, str], dict]:
    """(template, fact id) -> the row of items/<point>/fact_recall.csv (task, template, id,
    prediction, em, contains); the rephrased rows (several per fact) are left out."""
    path = run_dir / "items" / point / "fact_recall.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        return {(r["template"], r["id"]): r for r in csv.DictReader(f) if r["template"] != "rephrased"}


def last_point(run_dir: Path) -> str:
    point = last_task_point(run_dir)
    if point is None:
        raise SystemExit(f"{run_dir} has no items/after_task_*/fact_recall.csv: not a finished run")
    return point


def run_overrides(run_dir: Path) -> list[str]:
    """The run's own overrides, and its config search path when it had one (a study's rows live on
    their study's search path, which Hydra records among its own overrides, not the run's)."""
    import yaml

    path, hydra = run_dir / ".hydra" / "overrides.yaml", run_dir / ".hydra" / "hydra.yaml"
    overrides = list(yaml.safe_load(path.read_text()) or []) if path.is_file() else []
    search = (yaml.safe_load(hydra.read_text()) or {}).get("hydra", {}).get("searchpath") if hydra.is_file() else None
    if search:
        overrides.append(f"hydra.searchpath=[{','.join(search)}]")
    return overrides


def override_key(o: str) -> str:
    return o.split("=", 1)[0].lstrip("+~")


# ---- models -------------------------------------------------------------------------------------
@torch.no_grad()
def prompt_logits(model, tokenizer, prompt: str) -> tuple[str, torch.Tensor, dict[int, set[int]]]:
    """One prompt alone (no padding): sha256 of the logits at every position, the last position's
    logits, and per memory layer the rows any position addressed (before the read gate)."""
    from smf_lightning.memory import memory_layers

    enc = tokenizer(prompt, return_tensors="pt")
    logits = model(**enc).logits[0].float().contiguous()
    digest = hashlib.sha256(logits.numpy().tobytes()).hexdigest()
    reads = {i: set(m.last_access.indices.reshape(-1).tolist()) for i, m in memory_layers(model).items()}
    return digest, logits[-1].clone(), reads


def logit_pass(model, tokenizer, prompts: list[str]) -> list[tuple[str, torch.Tensor, dict]]:
    return [prompt_logits(model, tokenizer, p) for p in prompts]


def compare(ref: list, got: list) -> dict:
    """Bit-identical prompts of ``got`` against ``ref`` (logit_pass outputs), with the largest
    last-position difference where they differ."""
    same = [a[0] == b[0] for a, b in zip(ref, got)]
    diffs = [float((a[1] - b[1]).abs().max()) for a, b, s in zip(ref, got, same) if not s]
    return {"identical": sum(same), "prompts": len(same), "max_abs_diff_last": max(diffs, default=0.0)}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class Recall:
    """Asking facts under the run's first training template and scoring the answers as the
    evaluation does (product/answer.py answers, eval/suites.py FactRecallSuite.score_predictions)."""

    def __init__(self, config):
        from smf_lightning.product.answer import AskSettings

        self.settings = AskSettings.from_config(config)
        self.template = self.settings.template(None)

    def prompts(self, facts) -> list[str]:
        return [self.template.prompt(f.question) for f in facts]

    def ask(self, model, tokenizer, facts) -> tuple[list[str], list[float]]:
        """(answers, exact match per fact); all facts in one call, as ``ask`` batches them."""
        from smf_lightning.eval.suites import FactRecallSuite
        from smf_lightning.product.answer import answers

        preds = answers(model, tokenizer, self.prompts(facts), self.settings.max_new_tokens, self.settings.batch_size)
        suite = FactRecallSuite(list(facts), self.template, self.settings.max_new_tokens, self.settings.batch_size)
        suite.score_predictions(preds)
        return preds, [float(x) for x in suite.last_items["em"]]


def mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


# ---- the check ----------------------------------------------------------------------------------
class ProductCheck:
    def __init__(self, run_dir: Path, out: Path, work: Path, n_forget: int, tiny: bool, redo: set[str],
                 page: bool = True):
        self.run_dir, self.out, self.work, self.n_forget, self.tiny = run_dir.resolve(), out, work, n_forget, tiny
        self.page = page  # fill PRODUCT.md's table (the default results folder only)
        self.results_file = out / "product_check.json"
        self.full, self.delta = work / "exports" / "full", work / "exports" / "delta"
        self.forgot, self.cont_dir = work / "exports" / "forgot", work / "continue"
        self.stream_file = work / "stream.json"
        self.results = self._load_results(redo)
        self._run = None

    def _load_results(self, redo: set[str]) -> dict:
        fresh = {"run": str(self.run_dir), "tiny": self.tiny, "work": str(self.work), "steps": {}}
        if not self.results_file.is_file():
            return fresh
        old = json.loads(self.results_file.read_text())
        if old.get("run") != str(self.run_dir):
            log(f"{self.results_file} holds another run's results ({old.get('run')}): starting afresh")
            return fresh
        for step in redo:
            old["steps"].pop(step, None)
        return old

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.results["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads()}
        tmp = self.results_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        os.replace(tmp, self.results_file)
        with (self.out / "product_check.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "measure", "value"])
            for step, res in self.results["steps"].items():
                for k, v in flatten({k: v for k, v in res.items() if k not in PER_FACT_KEYS}):
                    w.writerow([step, k, v])
        self._write_facts_csv()
        if self.page:
            write_table(self.results, tiny=self.tiny)

    def _write_facts_csv(self) -> None:
        if not self.stream_file.is_file():
            return
        stream = json.loads(self.stream_file.read_text())
        per = {}
        for step, res in self.results["steps"].items():
            for fid, row in res.get("per_fact", {}).items():
                per.setdefault(fid, {}).update({f"{step}.{k}": v for k, v in row.items()})
        cols = sorted({k for row in per.values() for k in row}, key=lambda k: (STEPS.index(k.split(".")[0]), k))
        with (self.out / "product_check_facts.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["task", "id", "question", "answer", *cols])
            for fact in stream["facts"]:
                row = per.get(fact["id"], {})
                w.writerow([fact["task"], fact["id"], fact["question"], fact["answer"], *(row.get(c, "") for c in cols)])
            for fid, new in self.results["steps"].get("continue", {}).get("new_per_fact", {}).items():
                row = {f"continue.{k}": v for k, v in new.items()}  # the continued run's new task
                w.writerow(["new", fid, new["question"], new["answer"], *(row.get(c, "") for c in cols)])

    # -- the run, opened once and only when a step needs its model
    @property
    def run(self):
        if self._run is None:
            from smf_lightning.product.open import load_run

            t0 = time.perf_counter()
            log(f"opening the run {self.run_dir} (rebuilt as it was built; caches make it quick)")
            self._run = load_run(self.run_dir)
            self.results.setdefault("timings", {})["open_run_s"] = round(time.perf_counter() - t0, 1)
            if not self._run.ledger.facts:
                raise SystemExit(f"{self.run_dir} has no fact ledger (trained before the ledger existed, or not "
                                 "an SMF run): train it again.")
            self._write_stream()
        return self._run

    def close_run(self) -> None:
        if self._run is not None:
            self._run = None
            gc.collect()

    def _write_stream(self) -> None:
        """The stream's facts (with the aliases scoring needs) and the suite prompts, so later
        steps need not rebuild the run."""
        from smf_lightning.eval.suites import FactRecallSuite, LambadaSuite, QASuite

        dm = self._run.datamodule
        facts = [{"task": j, "id": f.id, "question": f.question, "answer": f.answer, "aliases": list(f.aliases)}
                 for j in range(dm.n_tasks) for f in dm.task_facts(j)]
        suites = dm.heldout_suites()
        prompts = {}
        for name in SUITE_PROMPTS:
            s = suites.get(name)
            if isinstance(s, FactRecallSuite):
                prompts[name] = [s.template.prompt(f.question) for f in s.facts]
            elif isinstance(s, QASuite):
                prompts[name] = [s._prompt(it) for it in s.items]  # the suite's own prompt
            elif isinstance(s, LambadaSuite):
                prompts[name] = [f"{it.context} {it.last_word}" for it in s.items]  # the passage it scores
        stream = {"facts": facts, "facts_source": dm.facts_source, "seed": dm.seed, "n_tasks": dm.n_tasks,
                  "templates": list(dm.templates), "suite_prompts": prompts}
        self.work.mkdir(parents=True, exist_ok=True)
        self.stream_file.write_text(json.dumps(stream, indent=1))

    def stream(self) -> dict:
        if not self.stream_file.is_file():
            _ = self.run
        return json.loads(self.stream_file.read_text())

    def facts(self):
        from smf_lightning.data.facts import Fact

        return [Fact(f["id"], f["question"], f["answer"], tuple(f["aliases"])) for f in self.stream()["facts"]]

    def stream_prompts(self, fact_ids=None) -> list[str]:
        from smf_lightning.product.answer import AskSettings

        templates = AskSettings.from_config(self.config()).templates
        return [t.prompt(f.question) for f in self.facts() if fact_ids is None or f.id in fact_ids
                for t in templates.values()]

    def config(self):
        from omegaconf import OmegaConf

        return OmegaConf.load(self.run_dir / ".hydra" / "config.yaml")

    def done(self, step: str) -> bool:
        return step in self.results["steps"]

    def record(self, step: str, res: dict) -> None:
        self.results["steps"][step] = res
        self.save()

    # ---- 1. ask ---------------------------------------------------------------------------------
    def ask(self) -> None:
        from smf_lightning.product.answer import Explainer

        res: dict = {}
        t0 = time.perf_counter()
        run, facts, recall = self.run, self.facts(), Recall(self.config())
        point = last_point(self.run_dir)
        items = read_items(self.run_dir, point)
        with timed(res, "ask_s"):
            preds, em = recall.ask(run.model, run.tokenizer, facts)
        ref = [items.get((recall.template.name, f.id)) for f in facts]
        missing = [f.id for f, r in zip(facts, ref) if r is None]
        if missing:
            raise SystemExit(f"items/{point}/fact_recall.csv has no {recall.template.name} row for {missing[:3]}")
        explain = Explainer(run.model, run.tokenizer, run.ledger)
        per_fact, listed, first = {}, 0, 0
        with timed(res, "explain_s"):
            for f, p, a, e, r in zip(facts, recall.prompts(facts), preds, em, ref):
                readings = explain(p)
                own = next((x.share for x in readings if x.fact == f.id), 0.0)
                listed += own > 0
                first += bool(readings) and readings[0].fact == f.id
                per_fact[f.id] = {"answer": a, "run_prediction": r["prediction"], "identical": a == r["prediction"],
                                  "em": e, "run_em": float(r["em"]), "explain_own_share": round(own, 4),
                                  "explain_top": readings[0].fact if readings else ""}
        res.update(point=point, template=recall.template.name, facts=len(facts),
                   identical=sum(v["identical"] for v in per_fact.values()), recall=mean(em),
                   run_recall=mean(float(r["em"]) for r in ref), explain_positions=explain.positions,
                   explain_own_listed=listed, explain_own_first=first,
                   seconds=round(time.perf_counter() - t0, 1), per_fact=per_fact)
        self.record("ask", res)
        log(f"step 1/4 ask: {res['identical']}/{res['facts']} answers identical to the run's predictions; recall "
            f"{res['recall']:.3f} (run's evaluation {res['run_recall']:.3f}); --explain lists a fact for its own question "
            f"{listed}/{len(facts)} ({first} first) [{res['seconds']} s]")

    # ---- 2. export and load -------------------------------------------------------------------
    def _export_done(self, path: Path, kind: str) -> bool:
        meta = path / "export.json"
        return meta.is_file() and json.loads(meta.read_text()).get("kind") == kind and \
            json.loads(meta.read_text()).get("exported_from") == str(self.run_dir)

    def ensure_exports(self, timings: dict | None = None) -> None:
        """The full and the delta export of the run, as ``python -m smf_lightning.export`` writes them."""
        import shutil

        from smf_lightning.methods import method_class
        from smf_lightning.product.base_model import build_start
        from smf_lightning.product.exports import write_export

        timings = {} if timings is None else timings
        for kind, path in (("full", self.full), ("delta", self.delta)):
            if self._export_done(path, kind):
                continue
            shutil.rmtree(path, ignore_errors=True)  # a foreign or partial one (write_export renames into place)
            run = self.run
            with timed(timings, f"export_{kind}_s"):
                start = None
                if kind == "delta":
                    if not method_class(run.config.method).memory_only:
                        raise SystemExit(f"method {run.config.method.name} trains weights outside the memory: no delta")
                    start, _ = build_start(run.base, run.model.memory_config.to_dict(), expected=run.base["fingerprint"])
                write_export(path, run.model, run.tokenizer, run.ledger, run.config, run.base, str(self.run_dir), start)
                del start
                gc.collect()
            log(f"  wrote the {kind} export {path} [{timings[f'export_{kind}_s']} s]")

    def export(self) -> None:
        import smf_lightning

        res: dict = {}
        t0 = time.perf_counter()
        self.ensure_exports(res)
        meta = {k: json.loads((p / "export.json").read_text()) for k, p in (("full", self.full), ("delta", self.delta))}
        res.update(full_bytes=meta["full"]["bytes"], delta_bytes=meta["delta"]["bytes"],
                   delta_share=meta["delta"]["bytes"] / meta["full"]["bytes"],
                   full_dir_bytes=dir_bytes(self.full), delta_dir_bytes=dir_bytes(self.delta),
                   delta_rows=meta["delta"].get("delta_rows"), facts_in_ledger=meta["full"]["facts"])
        res["delta_dir_share"] = res["delta_dir_bytes"] / res["full_dir_bytes"]
        sets = {"stream": self.stream_prompts(), **self.stream()["suite_prompts"]}
        run = self.run
        with timed(res, "run_logits_s"):
            ref = {name: logit_pass(run.model, run.tokenizer, ps) for name, ps in sets.items()}
        tokenizer = run.tokenizer
        del run
        self.close_run()  # one model in memory at a time from here
        for kind, path in (("full", self.full), ("delta", self.delta)):
            with timed(res, f"load_{kind}_s"):
                model = smf_lightning.load(path)
            with timed(res, f"{kind}_logits_s"):
                res[f"{kind}_logits"] = {name: compare(ref[name], logit_pass(model, tokenizer, ps)) for name, ps in sets.items()}
            res[f"{kind}_identical"] = all(c["identical"] == c["prompts"] for c in res[f"{kind}_logits"].values())
            del model
            gc.collect()
        res["seconds"] = round(time.perf_counter() - t0, 1)
        self.record("export", res)
        counts = lambda k: ", ".join(f"{n} {c['identical']}/{c['prompts']}" for n, c in res[f"{k}_logits"].items())  # noqa: E731
        log(f"step 2/4 export: full {res['full_bytes']:,} B, delta {res['delta_bytes']:,} B ({res['delta_share']:.3%}); "
            f"logits identical to the run: full [{counts('full')}], delta [{counts('delta')}] [{res['seconds']} s]")

    # ---- 3. forget ------------------------------------------------------------------------------
    def forget_ids(self) -> list[str]:
        """The first N facts of the last task, in stream order."""
        stream = self.stream()
        last = [f["id"] for f in stream["facts"] if f["task"] == stream["n_tasks"] - 1]
        if not 1 <= self.n_forget <= len(last):
            raise SystemExit(f"--forget {self.n_forget}: the last task has {len(last)} facts")
        return last[: self.n_forget]

    def forget(self) -> None:
        import shutil

        from smf_lightning.product.edit import forget
        from smf_lightning.product.exports import write_export
        from smf_lightning.product.open import open_model

        res: dict = {}
        t0 = time.perf_counter()
        self.ensure_exports()
        self.close_run()
        ids = self.forget_ids()
        facts = self.facts()
        others = [f for f in facts if f.id not in ids]
        recall = Recall(self.config())
        sets = {**self.stream()["suite_prompts"], "words": WORDS, "other_facts": self.stream_prompts({f.id for f in others}),
                "forgotten_facts": self.stream_prompts(set(ids))}
        before_items = read_items(self.run_dir, "before")
        asked = self.results["steps"]["ask"]["per_fact"]

        with timed(res, "load_full_s"):
            e = open_model(self.full)
        rows = {i: r.clone() for i, r in e.ledger.fact_rows(ids).items()}
        with timed(res, "before_logits_s"):
            before = {name: logit_pass(e.model, e.tokenizer, ps) for name, ps in sets.items()}
        with timed(res, "forget_s"):  # what python -m smf_lightning.forget does
            report = forget(e.model, e.ledger, ids)
            shutil.rmtree(self.forgot, ignore_errors=True)
            write_export(self.forgot, e.model, e.tokenizer, e.ledger, e.config, e.meta["base"], str(self.full))
        del e
        gc.collect()
        with timed(res, "load_forgot_s"):
            after_model = open_model(self.forgot)
        with timed(res, "after_logits_s"):
            after = {name: logit_pass(after_model.model, after_model.tokenizer, ps) for name, ps in sets.items()}
        with timed(res, "ask_s"):  # every fact, as step 1 asked them (the same batches)
            preds, em = recall.ask(after_model.model, after_model.tokenizer, facts)
        del after_model
        gc.collect()

        def reads_restored(reads: dict) -> bool:
            return any(reads.get(i, set()) & set(r.tolist()) for i, r in rows.items())

        logits = {}
        for name in sets:
            split = {"reads_none": ([], []), "reads_some": ([], [])}
            for b, a in zip(before[name], after[name]):
                side = split["reads_some" if reads_restored(b[2]) else "reads_none"]
                side[0].append(b)
                side[1].append(a)
            logits[name] = {k: compare(b, a) for k, (b, a) in split.items()}
        em_after = dict(zip((f.id for f in facts), em))
        pred_after = dict(zip((f.id for f in facts), preds))
        base = [before_items.get((recall.template.name, i)) for i in ids]
        per_fact = {f.id: {"forgotten": f.id in ids, "answer_after": pred_after[f.id], "em_after": em_after[f.id],
                           "shared_rows_restored": report.shared.get(f.id, (0, 0))[0]} for f in facts}
        res.update(
            forgotten=ids, questions=[next(f.question for f in facts if f.id == i) for i in ids],
            restored_rows={str(i): n for i, n in report.restored.items()},
            forgotten_recall_base=mean(float(b["em"]) for b in base) if all(base) else None,
            forgotten_recall_before=mean(asked[i]["em"] for i in ids),
            forgotten_recall_after=mean(em_after[i] for i in ids),
            other_facts=len(others),
            other_recall_before=mean(asked[f.id]["em"] for f in others),
            other_recall_after=mean(em_after[f.id] for f in others),
            other_answers_changed=sum(pred_after[f.id] != asked[f.id]["answer"] for f in others),
            other_facts_sharing_rows=len(report.shared),
            other_facts_sharing_share=len(report.shared) / len(others) if others else None,
            shared={f: {"restored": n, "rows": t} for f, (n, t) in report.shared.items()},
            logits=logits, seconds=round(time.perf_counter() - t0, 1), per_fact=per_fact)
        none_ok = all(c["reads_none"]["identical"] == c["reads_none"]["prompts"] for c in logits.values())
        res["reads_none_identical"] = none_ok
        self.record("forget", res)
        suite = ", ".join(f"{n} none {c['reads_none']['identical']}/{c['reads_none']['prompts']} some "
                          f"{c['reads_some']['identical']}/{c['reads_some']['prompts']}" for n, c in logits.items())
        log(f"step 3/4 forget {', '.join(ids)}: their recall base {fmt(res['forgotten_recall_base'])} -> run "
            f"{fmt(res['forgotten_recall_before'])} -> forgotten {fmt(res['forgotten_recall_after'])}; other facts "
            f"{fmt(res['other_recall_before'])} -> {fmt(res['other_recall_after'])}, {len(report.shared)}/{len(others)} "
            f"shared rows; logits identical (reading restored rows: none / some): {suite} [{res['seconds']} s]")

    # ---- 4. continue ----------------------------------------------------------------------------
    def continue_overrides(self) -> list[str]:
        """The run's own overrides, one new task on the full export, new facts, no held-out suites."""
        from smf_lightning.data.rephrasings import builtin_stream_ids

        stream, cfg = self.stream(), self.config()
        mine = ["model.init_checkpoint", "data.n_tasks", "data.seed", "data.exclude_streams", "ckpt_path",
                *(override_key(o) for o in CONTINUE_QUIET)]
        overrides = run_overrides(self.run_dir)
        kept = [o for o in overrides
                if not any(override_key(o) == k for k in mine) and not override_key(o).startswith("data.suites")]
        added = {override_key(o).split(".")[2] for o in overrides if o.startswith("+data.suites.")}
        new = [f"model.init_checkpoint={self.full}", "data.n_tasks=1", *CONTINUE_QUIET]
        # one cheap suite stays, so the continued run reports one capability figure too; the
        # known-facts suite would probe the export afresh
        suites = [n for n in cfg.data.suites if n not in added]
        keep = next((n for n in KEEP_SUITE if n in suites), None)
        new += [f"~data.suites.{name}" for name in suites if name != keep]
        old_ids = {f["id"] for f in stream["facts"]}
        if stream["facts_source"] == "triviaqa":
            # the built-in streams that hold the run's facts, smallest first, until all are covered
            # (data.exclude_streams drops them from the probe pool; the quickstart's are "quick")
            sizes = {s: builtin_stream_ids([s]) for s in ("quick", "dev", "test")}
            exclude, left = [], set(old_ids)
            for s in sorted(sizes, key=lambda s: len(sizes[s])):
                if left & sizes[s]:
                    exclude.append(s)
                    left -= sizes[s]
            if left:
                log(f"  warning: {len(left)} of the run's facts are in no built-in stream; the continued run may "
                    "draw them again (counted as overlap)")
            new.append(f"data.exclude_streams=[{','.join(exclude)}]")
        elif stream["facts_source"] == "synthetic":
            new.append(f"data.seed={int(stream['seed']) + 1}")  # the generator's other facts
        else:
            raise SystemExit(f"continue: data.facts={stream['facts_source']} has no way to draw new facts here "
                             "(triviaqa and synthetic do)")
        return kept + new

    def continue_(self) -> None:
        from smf_lightning.product.open import load_run

        res: dict = {}
        t0 = time.perf_counter()
        self.ensure_exports()
        self.close_run()
        overrides = self.continue_overrides()
        res["command"] = "python -m smf_lightning.train " + " ".join(overrides) + f" hydra.run.dir={self.cont_dir}"
        res["train_s"] = round(train(self.cont_dir, overrides), 1)
        facts = self.facts()
        asked = self.results["steps"]["ask"]["per_fact"]
        with timed(res, "open_s"):
            cont = load_run(self.cont_dir)
        recall = Recall(cont.config)
        new_facts = list(cont.datamodule.task_facts(0))
        old_ids = {f.id for f in facts}
        with timed(res, "ask_s"):
            old_preds, old_em = recall.ask(cont.model, cont.tokenizer, facts)  # the same batches as step 1
            new_preds, new_em = recall.ask(cont.model, cont.tokenizer, new_facts)
        new_ids = [f.id for f in new_facts]
        shared_rows = {}
        for i in cont.ledger.layers:
            old_rows = cont.ledger.fact_rows([f for f in old_ids if f in cont.ledger.facts]).get(i)
            new_rows = cont.ledger.fact_rows(new_ids).get(i)
            if old_rows is not None and new_rows is not None:
                shared_rows[str(i)] = int(torch.isin(new_rows, old_rows).sum())
        items = read_items(self.cont_dir, last_point(self.cont_dir))
        ref = [items.get((recall.template.name, i)) for i in new_ids]
        old_before = mean(asked[f.id]["em"] for f in facts)
        res.update(
            new_facts=len(new_facts), new_ids=new_ids, overlap_with_old=len(old_ids & set(new_ids)),
            old_facts_in_ledger=sum(f.id in cont.ledger.facts for f in facts),
            new_rows_shared_with_old=shared_rows,
            new_recall=mean(new_em), new_recall_run=mean(float(r["em"]) for r in ref) if all(ref) else None,
            new_identical_to_run=sum(r is not None and p == r["prediction"] for p, r in zip(new_preds, ref)),
            old_recall_before=old_before, old_recall_after=mean(old_em),
            old_recall_delta=mean(old_em) - old_before,
            old_answers_changed=sum(p != asked[f.id]["answer"] for f, p in zip(facts, old_preds)),
            per_fact={f.id: {"answer_after": p, "em_after": e} for f, p, e in zip(facts, old_preds, old_em)},
            new_per_fact={f.id: {"question": f.question, "answer": f.answer, "answer_after": p, "em_after": e}
                          for f, p, e in zip(new_facts, new_preds, new_em)})
        del cont
        gc.collect()
        res["seconds"] = round(time.perf_counter() - t0, 1)
        self.record("continue", res)
        log(f"step 4/4 continue: new task recall {fmt(res['new_recall'])} (run's evaluation {fmt(res['new_recall_run'])}, "
            f"{res['overlap_with_old']} new facts among the old); old facts {fmt(old_before)} -> {fmt(res['old_recall_after'])} "
            f"(delta {res['old_recall_delta']:+.3f}); new rows shared with old: {shared_rows} [{res['seconds']} s]")

    def all(self) -> None:
        for i, step in enumerate(STEPS, 1):
            if self.done(step):
                log(f"step {i}/4 {step}: done already ({self.results_file}; --redo {step} to measure again)")
                continue
            log(f"step {i}/4 {step} ...")
            getattr(self, "continue_" if step == "continue" else step)()
        self.close_run()
        self.save()


PER_FACT_KEYS = ("per_fact", "new_per_fact", "shared")  # in product_check_facts.csv and the JSON, not the CSV


def flatten(d: dict, prefix: str = ""):
    """(dotted key, value) of every scalar in nested dicts; lists become one cell."""
    for k, v in d.items():
        if isinstance(v, dict):
            yield from flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", " ".join(map(str, v)) if isinstance(v, list) else v


def fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


# ---- PRODUCT.md ---------------------------------------------------------------------------------
def markers(tiny: bool) -> tuple[str, str]:
    tag = "product_check_tiny" if tiny else "product_check"
    return f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"


def table(results: dict) -> str:
    s = results["steps"]
    rows = []

    def row(step, promise, measured, seconds=None):
        rows.append(f"| {step} | {promise} | {measured} | {'' if seconds is None else seconds} |")

    if "ask" in s:
        a = s["ask"]
        row("ask", f"answers = the run's own predictions ({a['template']}, {a['point']})",
            f"{a['identical']}/{a['facts']} identical; recall {fmt(a['recall'])} (run {fmt(a['run_recall'])})", a["seconds"])
        row("ask --explain", "a fact's own question lists the fact (first)",
            f"{a['explain_own_listed']}/{a['facts']} ({a['explain_own_first']} first)")
    if "export" in s:
        e = s["export"]
        row("export", "delta size vs full (weights file; whole folder)",
            f"{e['delta_bytes']:,} B vs {e['full_bytes']:,} B: {e['delta_share']:.3%}; folders {e['delta_dir_share']:.3%}",
            e["seconds"])
        for kind in ("full", "delta"):
            counts = ", ".join(f"{n} {c['identical']}/{c['prompts']}" for n, c in e[f"{kind}_logits"].items())
            row(f"load {kind}", "logits bit-identical to the run's model", counts)
    if "forget" in s:
        f = s["forget"]
        row("forget", f"recall of the {len(f['forgotten'])} forgotten facts: base / run / after",
            f"{fmt(f['forgotten_recall_base'])} / {fmt(f['forgotten_recall_before'])} / {fmt(f['forgotten_recall_after'])}",
            f["seconds"])
        row("forget", "other facts' recall before / after (answers changed)",
            f"{fmt(f['other_recall_before'])} / {fmt(f['other_recall_after'])} ({f['other_answers_changed']} of {f['other_facts']})")
        row("forget", "other facts sharing a restored row", f"{f['other_facts_sharing_rows']}/{f['other_facts']}")
        for name, c in f["logits"].items():
            row("forget", f"{name} prompts bit-identical after: reading no restored row / some",
                f"{c['reads_none']['identical']}/{c['reads_none']['prompts']} / {c['reads_some']['identical']}/{c['reads_some']['prompts']}")
    if "continue" in s:
        c = s["continue"]
        row("continue", "new task recall (the continued run's evaluation)",
            f"{fmt(c['new_recall'])} ({fmt(c['new_recall_run'])}); {c['overlap_with_old']} new facts among the old", c["seconds"])
        row("continue", "old facts' recall before / after (delta)",
            f"{fmt(c['old_recall_before'])} / {fmt(c['old_recall_after'])} ({c['old_recall_delta']:+.3f})")
        row("continue", "old facts kept in the ledger; new rows on old facts' rows",
            f"{c['old_facts_in_ledger']}/{len(s.get('ask', {}).get('per_fact', {})) or '?'}; {c['new_rows_shared_with_old']}")
    head = ["| step | promise | measured | seconds |", "|---|---|---|---|"]
    t = results.get("timings", {})
    foot = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v} s" for k, v in t.items())
    lines = [f"Run: `{results['run']}`", "", *head, *rows, *(["", f"Also: {foot}."] if foot else [])]
    return "\n".join(lines) if rows else "(not run yet)"


def write_table(results: dict, tiny: bool) -> None:
    if not PAGE.is_file():
        return
    begin, end = markers(tiny)
    text = PAGE.read_text()
    if begin not in text or end not in text:
        log(f"warning: {PAGE} has no {begin} ... {end} markers; table not written")
        return
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    PAGE.write_text(head + begin + "\n" + table(results) + "\n" + end + tail)


# ---- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--run", type=Path, help="a finished run of python -m smf_lightning.train experiment=facts_seq_quick")
    src.add_argument("--train", action="store_true",
                     help="train that run first, into $SMF_STUDY_RUNS/product/quickstart (kept: a second call reuses it)")
    ap.add_argument("--tiny", action="store_true",
                    help="smoke check: experiment=tiny instead of the quickstart (trained into product_tiny/tiny unless --run)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default experiments/product/results, results/tiny with --tiny; "
                         "only the default fills PRODUCT.md's table)")
    ap.add_argument("--work", type=Path, default=None,
                    help="exports and the continued run (default $SMF_STUDY_RUNS/product[_tiny]/<run>)")
    ap.add_argument("--forget", type=int, default=None,
                    help="facts to forget: the first N of the last task (default 3; 1 with --tiny, whose tasks have 2)")
    ap.add_argument("--redo", nargs="*", default=[], choices=STEPS, help="measure these steps again")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not (args.run or args.train or args.tiny):
        ap.error("give --run RUN_DIR, --train or --tiny")

    root = runs_dir("product_tiny" if args.tiny else "product")
    if args.run is None:
        run_dir = root / ("tiny" if args.tiny else "quickstart")
        log(f"step 0: the {'tiny' if args.tiny else 'quickstart'} run in {run_dir}")
        t = train(run_dir, TINY if args.tiny else QUICKSTART)
    else:
        run_dir, t = args.run.expanduser(), 0.0
        if not (run_dir / "summary.json").is_file():
            raise SystemExit(f"{run_dir} is not a finished run (no summary.json)")
    run_dir = run_dir.resolve()
    out = args.out or (HERE / "results" / ("tiny" if args.tiny else ""))
    tag = run_dir.name if run_dir.parent == root else hashlib.sha1(str(run_dir).encode()).hexdigest()[:10]
    work = args.work or root / f"work-{tag}"
    n_forget = args.forget if args.forget is not None else (1 if args.tiny else 3)
    check = ProductCheck(run_dir, out, work, n_forget, args.tiny, set(args.redo), page=args.out is None)
    if t:
        check.results.setdefault("timings", {})["train_run_s"] = round(t, 1)
    cmd = ["python", "experiments/product/product_check.py", *(argv if argv is not None else sys.argv[1:])]
    check.results["command"] = " ".join(cmd)
    log(f"run {run_dir}; work {work}; results {out}")
    t0 = time.perf_counter()
    check.all()
    print(table(check.results), flush=True)
    log(f"done in {time.perf_counter() - t0:.0f} s: {check.results_file}, {out / 'product_check.csv'}, "
        f"{out / 'product_check_facts.csv'}" + (f"; table in {PAGE}" if check.page else ""))


if __name__ == "__main__":
    main()
