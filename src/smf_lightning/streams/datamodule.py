"""FactStreamDataModule: the continual-learning data of one run.

Holds the fact stream (tasks of facts the base model does not know), serves the current
task's training batches, and hands out everything evaluation and slot statistics need:
fact-recall suites per task and template, the held-out capability suites, and the
background corpus. Constructor keyword arguments are exactly the keys of
conf/data/*.yaml (the defaults live there, not here), plus the tokenizer and the model
to probe, which the training script passes in.

    dm = FactStreamDataModule(tokenizer=tok, probe_model=base_model, **data_cfg)
    dm.setup()                         # loads data, probes the model (cached), builds the stream
    for i in range(dm.n_tasks):
        dm.set_task(i)
        trainer.fit(module, train_dataloaders=dm.train_dataloader())
        for j in dm.seen_tasks: dm.recall_suites(j)["qa"].evaluate(model, tok, dm.eval_batch_size)

It composes the two layers below it (streams/__init__.py): the data layer's units (data/:
sources, facts and templates, facts files, documents, rephrasings, rewording filters) and the
evaluation layer's (eval/: the probe of what the base model knows, greedy generation for
rewordings, the held-out and recall suites); the background corpus's items come from
streams/background.py.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import partial

import lightning as L
import torch
from torch.utils.data import DataLoader

from smf_lightning.data import documents
from smf_lightning.data.fact_file import FactFile, FactFileError, FactFileSpec, read_fact_file, stream_shortfall
from smf_lightning.data.facts import (
    LOSS_ON,
    Fact,
    FactTemplate,
    TrainingExample,
    collate_examples,
    check_stream_size,
    encode_example,
    make_templates,
    qa_item_to_fact,
    seeded_order,
    split_into_tasks,
    split_templates,
    synthetic_facts,
)
from smf_lightning.data.rewording import STYLES as REWORDING_STYLES
from smf_lightning.data.rewording import generate_rewordings, keep_rewordings, reword_cache_file
from smf_lightning.data.rephrasings import builtin_stream_ids, check_rephrasings, read_rephrasings
from smf_lightning.data.sources import PassageItem, QAItem, load_source
from smf_lightning.eval import scoring
from smf_lightning.eval.custom_suites import build_custom_suite, check_suite_config, is_custom
from smf_lightning.eval.probe import (
    DEFAULT_PROBE_PROMPT,
    default_cache_dir,
    model_fingerprint,
    probe_cache_file,
    probe_model,
)
from smf_lightning.eval.scoring import pad_token_id
from smf_lightning.eval.suites import REPHRASED, FactRecallSuite, build_suite, evaluate_task_recall
from smf_lightning.streams.background import BACKGROUND_SOURCES, background_items
from smf_lightning.text import normalize_answer

log = logging.getLogger(__name__)

FACT_SOURCES = ("triviaqa", "synthetic", "file", "documents")
SCHEDULES = ("sequential", "interleaved")
KNOWN_SUITE = "triviaqa_known"
FILE_KNOWN_SUITE = "file_known"  # facts=file with known_items > 0: the file's records the model answers


class FactStreamDataModule(L.LightningDataModule):
    def __init__(
        self,
        tokenizer=None,
        probe_model=None,
        *,
        facts: str,
        n_tasks: int,
        facts_per_task: int,
        seed: int,
        templates: Mapping[str, str],
        heldout_templates: Sequence[str],
        loss_on: str,
        train_batch_size: int,
        repeats_per_batch: int,
        max_seq_len: int,
        schedule: str = "sequential",
        epochs_per_task: int = 1,
        probe_prompt: str,
        probe_pool_size: int,
        probe_max_new_tokens: int,
        probe_batch_size: int,
        probe_templates: bool,
        max_answer_words: int,
        recall_max_new_tokens: int,
        eval_batch_size: int,
        generation_batch_size: int,
        suites: Mapping[str, Mapping],
        background: Mapping[str, int],
        background_batch_size: int,
        background_max_len: int,
        source: str = "auto",
        data_root: str | None = None,
        cache_dir: str | None = None,
        model_fingerprint: str | None = None,
        path: str | None = None,
        format: str = "auto",
        split: str | None = None,
        fields: Mapping[str, str] | None = None,
        list_separator: str = "|",
        skip_invalid: bool = False,
        probe: bool = True,
        known_items: int = 0,
        passages_per_task: int | None = None,
        chunk_overlap: int = 0,
        require_qa: bool = True,
        example_max_answer_words: int = 5,
        rephrased_max_new_tokens: int,
        rephrasings: str | None = None,
        exclude_streams: Sequence[str] = (),
        rewordings: int = 0,
        rewording_max_new_tokens: int = 40,
        order_seed: int | None = None,
    ):
        """
        tokenizer, probe_model: the run's tokenizer and its *base* model (probed for
            unknown TriviaQA facts; not needed for facts=synthetic or a cached probe with
            `model_fingerprint` given).
        The other arguments are documented in conf/data/facts_triviaqa.yaml; path ... known_items
        (facts=file only) in conf/data/facts_file.yaml; passages_per_task ... example_max_answer_words
        (facts=documents only: a task is passages, facts_per_task = passages_per_task) in
        conf/data/documents.yaml.
        """
        super().__init__()
        if facts not in FACT_SOURCES:
            raise ValueError(f"Unknown fact source {facts!r}. Allowed: {', '.join(FACT_SOURCES)}.")
        if facts == "documents":
            if passages_per_task is None or facts_per_task != passages_per_task:
                raise ValueError(f"facts=documents counts passages: set passages_per_task (got {passages_per_task}), "
                                 f"and facts_per_task to the same number (got {facts_per_task}).")
            if not 0 <= chunk_overlap < max_seq_len:
                raise ValueError(f"chunk_overlap must be in [0, max_seq_len={max_seq_len}), got {chunk_overlap}")
        check_stream_size(n_tasks, facts_per_task)
        if loss_on not in LOSS_ON:
            raise ValueError(f"Unknown loss_on {loss_on!r}; use one of: {', '.join(LOSS_ON)}.")
        for name, opts in suites.items():
            check_suite_config(name, opts)  # the keys only; a suite's own data is read when it is built
        for name in background:
            if name not in BACKGROUND_SOURCES:
                raise ValueError(f"Unknown background source {name!r}. Allowed: {', '.join(BACKGROUND_SOURCES)}.")
        for key, value in dict(train_batch_size=train_batch_size, repeats_per_batch=repeats_per_batch,
                               eval_batch_size=eval_batch_size, generation_batch_size=generation_batch_size,
                               background_batch_size=background_batch_size,
                               probe_batch_size=probe_batch_size, max_seq_len=max_seq_len,
                               epochs_per_task=epochs_per_task).items():
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        self.tokenizer = tokenizer
        self.probe_model = probe_model
        self.facts_source = facts
        self.n_tasks = n_tasks
        self.facts_per_task = facts_per_task
        self.seed = seed
        # null drops a template inherited from another data yaml (Hydra merges dicts; a user's
        # yaml with its own templates sets the inherited ones to null)
        self.templates = make_templates({name: text for name, text in templates.items() if text is not None})
        self.train_templates, self.heldout_templates = split_templates(self.templates, list(heldout_templates))
        self.loss_on = loss_on
        if schedule not in SCHEDULES:
            raise ValueError(f"Unknown schedule {schedule!r}; use one of: {', '.join(SCHEDULES)}.")
        self.schedule = schedule
        self.epochs_per_task = epochs_per_task
        self.train_batch_size = train_batch_size
        self.repeats_per_batch = repeats_per_batch
        self.max_seq_len = max_seq_len
        self.probe_prompt = probe_prompt or DEFAULT_PROBE_PROMPT
        self.probe_pool_size = probe_pool_size
        self.probe_max_new_tokens = probe_max_new_tokens
        self.probe_batch_size = probe_batch_size
        self.probe_templates = bool(probe_templates)
        self.max_answer_words = max_answer_words
        self.recall_max_new_tokens = recall_max_new_tokens
        if rephrased_max_new_tokens < 1:
            raise ValueError(f"rephrased_max_new_tokens must be >= 1, got {rephrased_max_new_tokens}")
        self.rephrased_max_new_tokens = rephrased_max_new_tokens
        self.rephrasings = rephrasings
        self.exclude_streams = tuple(exclude_streams or ())
        self._eval_only: dict[str, str] = {}  # normalised evaluation-only question -> its fact id (see _encode)
        if not 0 <= rewordings <= len(REWORDING_STYLES):
            raise ValueError(f"rewordings must be in [0, {len(REWORDING_STYLES)}] (one per prompt style of "
                             f"data/rewording.py), got {rewordings}")
        self.order_seed = self.seed if order_seed is None else int(order_seed)
        self.rewordings = int(rewordings)
        self.rewording_max_new_tokens = int(rewording_max_new_tokens)
        self._reworded: dict[str, tuple[str, ...]] = {}  # fact id -> its generated training rewordings
        self.eval_batch_size = eval_batch_size
        self.generation_batch_size = generation_batch_size
        self.suite_options = {name: dict(opts) for name, opts in suites.items()}
        self.background_sizes = {name: int(n) for name, n in background.items() if int(n) > 0}
        self.background_batch_size = background_batch_size
        self.background_max_len = background_max_len
        self.source = source
        self.data_root = data_root
        self.cache_dir = cache_dir
        self.model_fingerprint = model_fingerprint
        if facts == "file" and not path:
            raise ValueError("facts=file reads the facts from `path` (data.path=FILE); it is not set.")
        self.file_spec = (FactFileSpec(str(path), format, split, fields, list_separator, bool(skip_invalid))
                          if path and facts == "file" else None)
        self.document_spec = (documents.DocumentSpec(path and str(path), format, split, fields, bool(skip_invalid),
                                                     bool(require_qa), int(example_max_answer_words))
                              if facts == "documents" else None)
        self.chunk_overlap = int(chunk_overlap)
        self._task_passages: tuple[tuple[documents.Passage, ...], ...] = ()
        self.probe_file = bool(probe)
        self.known_items = int(known_items)
        if self.known_items and not self.probe_file:
            raise ValueError("known_items > 0 needs probe=true: the known-facts suite is what the probe finds the model answers.")
        if self.known_items and KNOWN_SUITE in self.suite_options:
            raise ValueError(f"known_items > 0 and the {KNOWN_SUITE} suite: one known-facts suite per run; drop one.")
        self.current_task = 0
        self.tasks: tuple[tuple[Fact, ...], ...] | None = None
        self.info: dict = {}
        self._train_examples: dict[int, list[TrainingExample]] = {}
        self._background_facts: list[Fact] = []
        self._background_passages: list[PassageItem] = []
        self._heldout_suites: dict | None = None
        self._known: list[Fact] = []
        self._pool_end = 0

    # ------------------------------------------------------------------ building

    def setup(self, stage: str | None = None) -> None:
        """Build the stream (idempotent): load or invent facts, probe, split into tasks."""
        if self.tasks is not None:
            return
        if self.tokenizer is None:
            raise ValueError("FactStreamDataModule needs the run's tokenizer (tokenizer=...).")
        if self.facts_source == "file":
            self.tasks = self._file_stream()
        elif self.facts_source == "documents":
            self.tasks = self._document_stream()
        else:
            if self.facts_source == "synthetic":
                needed = self.n_tasks * self.facts_per_task
                candidates = synthetic_facts(needed, self.seed)
                self.info = {"facts": "synthetic", "facts_origin": f"synthetic(seed={self.seed})"}
                where = " from the synthetic generator"
            else:
                candidates, where = self._probe_triviaqa()
            self.tasks = split_into_tasks(candidates, self.n_tasks, self.facts_per_task, self.seed, where)
            if self.facts_source == "triviaqa" and self.rephrasings:
                self.tasks = self._attach_rephrasings(self.tasks)
        self._eval_only = {normalize_answer(r): f.id for task in self.tasks for f in task for r in f.rephrased}
        if self.rewordings and self.facts_source != "documents":
            self._reword_stream()
        if KNOWN_SUITE in self.suite_options:  # probed now, on the base model (before any retrofit)
            opts = self.suite_options[KNOWN_SUITE]
            self._known = self._known_facts(int(opts["n_items"]))
        self._build_background()
        self.info.update(
            n_tasks=self.n_tasks, facts_per_task=self.facts_per_task, seed=self.seed,
            train_templates=list(self.train_templates), heldout_templates=list(self.heldout_templates),
            loss_on=self.loss_on,
            rephrased={"facts": sum(bool(f.rephrased) for t in self.tasks for f in t),
                       "questions": sum(len(f.rephrased) for t in self.tasks for f in t),
                       "template": self.train_templates[0], "max_new_tokens": self.rephrased_max_new_tokens},
            background={name: n for name, n in self.background_sizes.items()},
            task_fact_ids=[[f.id for f in task] for task in self.tasks],  # which facts, in stream order
        )

    def _eligible(self, item: QAItem) -> bool:
        """Short answers, and every template's sequence fits max_seq_len tokens."""
        if len(item.answers[0].split()) > self.max_answer_words:
            return False
        fact = qa_item_to_fact(item)
        return all(len(self._encode(fact, name).input_ids) <= self.max_seq_len for name in self.templates)

    def _probe_triviaqa(self) -> tuple[list[Fact], str]:
        """Unknown TriviaQA facts: a seeded pool, probed with the probe prompt; with
        probe_templates, candidates (in stream order) are also probed under every template and
        dropped if any of them elicits an alias, until the stream is full."""
        data = load_source("triviaqa", source=self.source, data_root=self.data_root)
        order = seeded_order(len(data), self.seed, "triviaqa/pool")
        n_bg = self.background_sizes.get("triviaqa", 0)
        if self.probe_pool_size + n_bg > len(data):
            raise ValueError(
                f"probe_pool_size ({self.probe_pool_size}) + background triviaqa ({n_bg}) exceed the "
                f"{len(data)} TriviaQA questions; lower one of them."
            )
        pool = []
        end = 0  # positions of the order examined for the pool
        for pos in order[: len(data) - n_bg]:  # background QA takes questions from the other end
            if len(pool) == self.probe_pool_size:
                break
            end += 1
            if self._eligible(data.items[pos]):
                pool.append(data.items[pos])
        self._pool_end = end  # the known-facts suite scans the order from here on
        if self.exclude_streams:  # facts of other built-in streams (the test stream never shares a fact with dev)
            excluded = builtin_stream_ids(self.exclude_streams)
            pool = [it for it in pool if it.id not in excluded]
        fingerprint = self._fingerprint()
        records, cache_file = self._probe(pool, self.probe_prompt, fingerprint)
        misses = [it for it in pool if not records[it.id].known]
        probe_info = {"pool": len(pool), "known": len(pool) - len(misses), "unknown": len(misses),
                      "model_fingerprint": fingerprint, "cache_file": str(cache_file)}
        where = f" (the probe found {len(misses)} unknown among {len(pool)} probed TriviaQA questions"
        if self.probe_templates:
            needed = self.n_tasks * self.facts_per_task
            candidates = [misses[i] for i in seeded_order(len(misses), self.seed, "stream")]
            kept, checked = self._unknown_under_templates(candidates, needed, fingerprint)
            probe_info.update(template_checked=checked, template_known=checked - len(kept))
            where += f"; {len(kept)} of the {checked} checked were also unknown under every template"
            misses = kept
        self.info = {"facts": "triviaqa", "facts_origin": f"{data.origin}:{data.location}", "probe": probe_info}
        log.info("Probe: %d TriviaQA facts unknown to the model (%s)", len(misses), probe_info)
        return [qa_item_to_fact(it) for it in misses], where + ")"

    def _unknown_under_templates(self, candidates: list[QAItem], needed: int, fingerprint: str,
                                 dataset: str = "triviaqa") -> tuple[list[QAItem], int]:
        """(kept, checked): `candidates` in order, probed in chunks under every template, the ones
        no template elicits kept, until `needed` are kept or the candidates run out."""
        kept, checked = [], 0
        while len(kept) < needed and checked < len(candidates):
            chunk = candidates[checked: checked + (needed - len(kept)) * 5 // 4 + 4]
            checked += len(chunk)
            known = set()
            for template in self.templates.values():
                recs, _ = self._probe(chunk, template.prompt("{question}"), fingerprint, dataset)
                known |= {i for i, r in recs.items() if r.known}
            kept += [it for it in chunk if it.id not in known]
        return kept, checked

    def _file_stream(self) -> tuple[tuple[Fact, ...], ...]:
        """The stream from the facts file (data/fact_file.py): valid records, then those that fit
        (max_answer_words, max_seq_len under every template and question), with probe=true
        only those the model does not know (as for TriviaQA: the probe prompt, then every
        template with probe_templates), split by the records' task labels or by seed. Every
        count (read, skipped and why, filtered, known, used) goes to info["file"] and the log."""
        ff = read_fact_file(self.file_spec)
        fits, filtered = [], {"answer_too_long": 0, "sequence_too_long": 0}
        for fact in ff.facts:
            reason = self._unfit_reason(fact)
            if reason:
                filtered[reason] += 1
            fits.append(reason is None)
        usable = FactFile(ff.location, ff.format, [f for f, ok in zip(ff.facts, fits) if ok],
                          [t for t, ok in zip(ff.tasks, fits) if ok], [w for w, ok in zip(ff.where, fits) if ok],
                          ff.n_read, ff.skipped)
        note = (f"; {filtered['answer_too_long']} with an answer over max_answer_words={self.max_answer_words}, "
                f"{filtered['sequence_too_long']} over max_seq_len={self.max_seq_len} tokens") if any(filtered.values()) else ""
        problem = stream_shortfall(usable, self.n_tasks, self.facts_per_task, note)
        if problem:
            raise FactFileError(problem)
        labels = usable.task_labels[: self.n_tasks] or [None]
        groups = {label: [f for f, t in zip(usable.facts, usable.tasks) if t == label] for label in labels}
        per_group = self.facts_per_task if labels != [None] else self.n_tasks * self.facts_per_task
        file_info = {**ff.counts(), "filtered": filtered, "usable": len(usable.facts)}
        if self.probe_file:
            groups, file_info["probe"] = self._probe_file_groups(groups, per_group, ff.digest())
        if labels == [None]:
            tasks = split_into_tasks(groups[None], self.n_tasks, self.facts_per_task, self.seed)
        else:
            tasks = tuple(split_into_tasks(groups[label], 1, self.facts_per_task, self.seed)[0] for label in labels)
            file_info["task_labels"] = labels
        file_info["used"] = sum(len(t) for t in tasks)
        file_info["used_paraphrases"] = sum(len(f.paraphrases) for t in tasks for f in t)
        self.info = {"facts": "file", "facts_origin": f"file:{ff.location}", "file": file_info}
        known = f", {file_info['probe']['known']} of {file_info['probe']['probed']} probed known" if self.probe_file else ""
        log.info("Facts file %s: %d records read, %d skipped %s, %d valid, %d too long%s; %d used in the stream",
                 ff.location, ff.n_read, file_info["skipped_total"], file_info["skipped"], len(ff.facts),
                 sum(filtered.values()), known, file_info["used"])
        return tasks

    def _document_stream(self) -> tuple[tuple[Fact, ...], ...]:
        """Passages (data/documents.py) split into tasks of passages_per_task, by the records'
        task labels or by seed; a task's facts are its passages' questions (what recall
        measures), its training examples the passages' chunks (training_examples)."""
        df = documents.read_documents(self.document_spec, self.data_root)
        problem = documents.stream_shortfall(df, self.n_tasks, self.facts_per_task)
        if problem:
            raise documents.DocumentError(problem)
        labels = df.task_labels[: self.n_tasks]
        if labels:
            self._task_passages = tuple(
                split_into_tasks([p for p, t in zip(df.passages, df.tasks) if t == label], 1, self.facts_per_task,
                                 self.seed)[0] for label in labels)
        else:
            self._task_passages = split_into_tasks(df.passages, self.n_tasks, self.facts_per_task, self.seed)
        for j, passages in enumerate(self._task_passages):
            if not any(p.qa for p in passages):
                raise documents.DocumentError(
                    f"documents {df.location}: task {labels[j] if labels else j} has no questions on any of its passages "
                    f"({', '.join(p.id for p in passages)}), so nothing would measure it; attach qa pairs.")
        chunks = [sum(len(self._passage_chunks(p)) for p in passages) for passages in self._task_passages]
        info = {**df.counts(), "passages_per_task": self.facts_per_task, "chunk_overlap": self.chunk_overlap,
                "max_seq_len": self.max_seq_len, "chunks_per_task": chunks,
                "qa_per_task": [sum(len(p.qa) for p in passages) for passages in self._task_passages],
                "task_passage_ids": [[p.id for p in passages] for passages in self._task_passages],
                **({"task_labels": labels} if labels else {})}
        self.info = {"facts": "documents", "facts_origin": f"documents:{df.location}", "documents": info}
        log.info("Documents %s: %s; %d tasks x %d passages, %s chunks, %s questions per task", df.location,
                 df.describe(), self.n_tasks, self.facts_per_task, chunks, info["qa_per_task"])
        return tuple(tuple(f for p in passages for f in p.qa) for passages in self._task_passages)

    def _passage_chunks(self, passage) -> list[TrainingExample]:
        return documents.passage_examples(self.tokenizer, passage, self.max_seq_len, self.chunk_overlap)

    def _unfit_reason(self, fact: Fact) -> str | None:
        if len(fact.answer.split()) > self.max_answer_words:
            return "answer_too_long"
        for question in fact.training_questions():
            variant = Fact(fact.id, question, fact.answer, fact.aliases)
            if any(len(self._encode(variant, name).input_ids) > self.max_seq_len for name in self.templates):
                return "sequence_too_long"
        return None

    def _probe_file_groups(self, groups: dict, needed: int, digest: str) -> tuple[dict, dict]:
        """Drop the facts the model knows from each task group: a group's facts are probed under
        the probe prompt (every fact of a task label; without labels a seeded pool of
        probe_pool_size), then, with probe_templates, under every template until `needed` are
        kept. The ones answered exactly are the file_known suite's candidates. Probes are cached
        per file content (an edited file is probed afresh)."""
        fingerprint = self._fingerprint()
        dataset = f"file-{digest}"
        by_id = {f.id: f for facts in groups.values() for f in facts}
        kept_groups, known_all, info = {}, [], {"probed": 0, "known": 0, "template_known": 0, "model_fingerprint": fingerprint}
        for label, facts in groups.items():
            if label is None:
                facts = [facts[i] for i in seeded_order(len(facts), self.seed, "file/pool")[: self.probe_pool_size]]
            items = [QAItem(f.id, f.question, f.aliases) for f in facts]
            records, cache_file = self._probe(items, self.probe_prompt, fingerprint, dataset)
            misses = [it for it in items if not records[it.id].known]
            known_all += [by_id[it.id] for it in items if records[it.id].exact_match == 1.0]
            info["probed"] += len(items)
            info["known"] += len(items) - len(misses)
            info["cache_file"] = str(cache_file)
            if self.probe_templates:
                candidates = [misses[i] for i in seeded_order(len(misses), self.seed, f"stream/{label}")]
                kept, checked = self._unknown_under_templates(candidates, needed, fingerprint, dataset)
                info["template_known"] += checked - len(kept)
                misses = kept
            kept_groups[label] = [by_id[it.id] for it in misses]
            if len(misses) < needed:
                what = f"task {label!r}" if label is not None else "the stream"
                more = (f" raise data.probe_pool_size (probed {len(items)} of {len(groups[label])})," 
                        if len(items) < len(groups[label]) else "")
                raise FactFileError(
                    f"facts file {self.file_spec.path}: only {len(misses)} facts for {what} are unknown to the model "
                    f"({len(items)} probed, {info['known']} known under the probe prompt, {info['template_known']} "
                    f"under a template), {needed} needed;{more} add facts, lower data.facts_per_task / data.n_tasks, "
                    f"or keep the facts the model knows with data.probe=false."
                )
        if self.known_items:
            if len(known_all) < self.known_items:
                raise FactFileError(
                    f"file_known: only {len(known_all)} records of {self.file_spec.path} are answered exactly by the model "
                    f"under the probe prompt ({info['probed']} probed); lower data.known_items."
                )
            chosen = seeded_order(len(known_all), self.seed, "file_known")[: self.known_items]
            self._known = [known_all[i] for i in sorted(chosen)]
        log.info("Probe of the facts file: %s", info)
        return kept_groups, info

    def _fingerprint(self) -> str:
        if self.model_fingerprint is not None:
            return self.model_fingerprint
        if self.probe_model is None:
            raise ValueError(
                "facts=triviaqa and the triviaqa_known suite need the base model to probe what it knows: pass "
                "probe_model=<base model> (or model_fingerprint=<fingerprint of a cached probe>)."
            )
        self.model_fingerprint = model_fingerprint(self.probe_model)
        return self.model_fingerprint

    def _probe(self, items, prompt: str, fingerprint: str, dataset: str = "triviaqa"):
        cache_dir = self.cache_dir or default_cache_dir()
        cache_file = probe_cache_file(cache_dir, fingerprint, prompt, self.probe_max_new_tokens, dataset)
        if self.probe_model is None and not cache_file.exists():
            raise ValueError(
                f"No cached probe at {cache_file} for model_fingerprint={fingerprint[:16]}...; pass probe_model=<base model>."
            )
        records = probe_model(
            self.probe_model, self.tokenizer, items, prompt=prompt, max_new_tokens=self.probe_max_new_tokens,
            batch_size=self.probe_batch_size, cache_file=cache_file, fingerprint=fingerprint,
        )
        return records, cache_file

    def known_template(self) -> FactTemplate:
        """The prompt of the triviaqa_known suite: the probe prompt (few-shot "Question: ...
        Answer: ..."), under which the suite's facts were found known."""
        return FactTemplate("probe", self.probe_prompt + " {answer}\n")

    def _known_facts(self, n_items: int) -> list[Fact]:
        """The triviaqa_known suite (locality): TriviaQA questions the base model answers exactly
        under the probe prompt (so the suite scores 1.0 before training), taken from the seeded
        order after the stream's probe pool and before the background's questions: disjoint from
        both. Known under *every* template as well would be stricter, but this model answers in
        the odd templates so rarely (1 of 82 probe hits was right under all five) that no suite
        of useful size exists."""
        data = load_source("triviaqa", source=self.source, data_root=self.data_root)
        order = seeded_order(len(data), self.seed, "triviaqa/pool")
        n_bg = self.background_sizes.get("triviaqa", 0)
        region = [data.items[p] for p in order[self._pool_end: len(data) - n_bg]]
        fingerprint = self._fingerprint()
        known: list[QAItem] = []
        checked, step = 0, 256
        while len(known) < n_items and checked < len(region):
            chunk = [it for it in region[checked: checked + step] if self._eligible(it)]
            checked += step
            records, _ = self._probe(chunk, self.probe_prompt, fingerprint)
            known += [it for it in chunk if records[it.id].exact_match == 1.0]
        if len(known) < n_items:
            raise ValueError(
                f"triviaqa_known: only {len(known)} TriviaQA questions are answered exactly by the model "
                f"(n_items={n_items} asked, {min(checked, len(region))} checked); lower data.suites.triviaqa_known.n_items."
            )
        log.info("Known-facts suite: %d TriviaQA facts the model answers (%d checked)", n_items, checked)
        return [qa_item_to_fact(it) for it in known[:n_items]]

    def _build_background(self) -> None:
        """The background corpus's items (streams/background.py)."""
        self._background_facts, self._background_passages = background_items(
            self.background_sizes, stream_size=self.n_tasks * self.facts_per_task, seed=self.seed,
            suite_options=self.suite_options, source=self.source, data_root=self.data_root)

    def _kept_rewordings(self, facts: Sequence[Fact], n_styles: int) -> tuple[dict[str, tuple[str, ...]], Counter]:
        """(fact id -> its usable rewordings, counts by reason): each question rewritten in the first
        ``n_styles`` prompt styles by the generator (cached), then filtered (data/rewording.py)."""
        raw = generate_rewordings(self.probe_model, self.tokenizer, [f.question for f in facts], n_styles,
                                  self.rewording_max_new_tokens, self.generation_batch_size, self._rewording_cache(),
                                  generate=scoring.generate_greedy)  # looked up per call
        counts: Counter = Counter()
        kept = {}
        for f in facts:
            fits = lambda q, f=f: self._unfit_reason(Fact(f.id, q, f.answer, f.aliases)) is None  # noqa: E731
            kept[f.id] = keep_rewordings(f, raw[f.question], fits, counts)
        return kept, counts

    def _reword_stream(self) -> None:
        """The training rewordings of every stream fact's question (data/rewording.py); counts go to
        info["rewordings"]."""
        facts = [f for task in self.tasks for f in task]
        self._reworded, counts = self._kept_rewordings(facts, self.rewordings)
        self.info["rewordings"] = {"per_question": self.rewordings, "cache_file": str(self._rewording_cache()),
                                   **dict(sorted(counts.items()))}
        log.info("Rewordings: %d kept of %d generated (%s)", counts["kept"], counts["generated"],
                 {k: v for k, v in counts.items() if k.startswith("dropped")})
        example = next((f for f in facts if self._reworded[f.id]), None)
        if example is not None:
            log.info("Rewording example: %r -> %r", example.question, list(self._reworded[example.id]))

    def _attach_rephrasings(self, tasks):
        """The stream's TriviaQA facts with their evaluation-only rephrasings (data.rephrasings:
        the package's own, or a JSONL file of {id, rephrased}); facts without one keep none."""
        table = read_rephrasings(self.rephrasings)
        out = []
        for task in tasks:
            facts = []
            for f in task:
                texts = table.get(f.id, ())
                facts.append(Fact(f.id, f.question, f.answer, f.aliases, f.paraphrases,
                                  check_rephrasings(texts, f.training_questions(), f"{self.rephrasings}: {f.id}")))
            out.append(tuple(facts))
        return tuple(out)

    def _encode(self, fact: Fact, template_name: str, loss_on: str | None = None) -> TrainingExample:
        """Every sequence that is trained on or fitted to (training batches, background
        statistics, whitening, the read gate's keys, key init) is encoded here, so this is
        where evaluation-only rephrasings are refused: they must never feed any of those."""
        owner = self._eval_only.get(normalize_answer(fact.question)) if self._eval_only else None
        if owner is not None:
            raise ValueError(
                f"{fact.question!r} (used for {fact.id}) is an evaluation-only rephrasing of fact {owner}: it must never "
                "be trained on or used for slot selection, whitening, background statistics or the read gate."
            )
        return encode_example(
            self.tokenizer, self.templates[template_name], fact.question, fact.answer, loss_on or self.loss_on, fact.id
        )

    def _require_stream(self) -> tuple[tuple[Fact, ...], ...]:
        if self.tasks is None:
            self.setup()
        return self.tasks  # type: ignore[return-value]

    # ------------------------------------------------------------------ training

    def set_task(self, task_index: int) -> None:
        """Make `task_index` (0-based) the current task: train_dataloader serves its facts."""
        if not 0 <= task_index < self.n_tasks:
            raise IndexError(f"task_index must be in [0, {self.n_tasks - 1}], got {task_index}")
        self.current_task = task_index

    @property
    def seen_tasks(self) -> range:
        """Tasks trained so far, including the current one."""
        return range(self.current_task + 1)

    def task_facts(self, task_index: int) -> tuple[Fact, ...]:
        return self._require_stream()[task_index]

    def training_examples(self, task_index: int) -> list[TrainingExample]:
        """The task's training sequences, fact by fact, each fact under every *training*
        template (held-out templates never appear here), for its question and then each of its
        paraphrases (same fact id, same answer). facts=documents: the chunks of the task's
        passages, in order (data/documents.py)."""
        if task_index not in self._train_examples and self.facts_source == "documents":
            self._require_stream()  # passages' chunks; fact_id = passage id (per-passage slot selection)
            self._train_examples[task_index] = [ex for p in self._task_passages[task_index] for ex in self._passage_chunks(p)]
        if task_index not in self._train_examples:
            self._train_examples[task_index] = [
                self._encode(Fact(fact.id, question, fact.answer, fact.aliases), name)
                for fact in self.task_facts(task_index)
                for question in (*fact.training_questions(), *self._reworded.get(fact.id, ()))
                for name in self.train_templates
            ]
        return self._train_examples[task_index]

    def train_batches(self, task_index: int) -> list[list[TrainingExample]]:
        """The task's batches, in training order, each repeated repeats_per_batch times in a row.

        schedule=sequential: consecutive chunks of train_batch_size examples in stream order
        (one fact after another, as in docs/design.md §9); epochs_per_task passes over them.
        schedule=interleaved: the task's examples are shuffled once (seeded per task) into
        batches that mix facts, and each of the epochs_per_task passes visits all of those
        batches in a new seeded order, so every fact comes back once per pass (DOTS: batch 16,
        ~19 exposures per fact). Batches keep their composition across passes, so the
        frozen-prefix cache (method.prefix_cache >= batches per task) serves every pass after
        the first."""
        examples = self.training_examples(task_index)
        size = self.train_batch_size
        if self.schedule == "interleaved":
            order = seeded_order(len(examples), self.order_seed, f"task{task_index}/batches")
            shuffled = [examples[i] for i in order]
            chunks = [shuffled[i:i + size] for i in range(0, len(shuffled), size)]
            batches = []
            for epoch in range(self.epochs_per_task):
                batches += [chunks[i] for i in seeded_order(len(chunks), self.order_seed, f"task{task_index}/pass{epoch}")]
        else:
            chunks = [examples[i:i + size] for i in range(0, len(examples), size)]
            batches = chunks * self.epochs_per_task
        return [chunk for chunk in batches for _ in range(self.repeats_per_batch)]

    def collate(self, examples) -> dict:
        """A training batch of `examples` (the collation train_dataloader uses)."""
        return collate_examples(examples, pad_id=pad_token_id(self.tokenizer))

    def train_dataloader(self) -> DataLoader:
        # Under a Trainer, one epoch is one task (reload_dataloaders_every_n_epochs=1): the
        # loader is requested at the start of each epoch, before any epoch hook runs.
        if self.trainer is not None:
            self.set_task(self.trainer.current_epoch)
        batches = self.train_batches(self.current_task)
        sampler = None
        if self.trainer is not None and self.trainer.world_size > 1:
            # DDP: rank r takes batches r, r + W, ... in schedule order (step k: batch k*W + r), so a
            # step of W ranks x batch b sees what one process with batch W*b would. Lightning's own
            # distributed sampler would shuffle a training loader's batches.
            from torch.utils.data import DistributedSampler

            sampler = DistributedSampler(batches, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank,
                                         shuffle=False)
        return DataLoader(
            batches, batch_size=None, shuffle=False, sampler=sampler,
            collate_fn=partial(collate_examples, pad_id=pad_token_id(self.tokenizer)),
        )

    def state_dict(self) -> dict:
        """Saved in Lightning checkpoints, so a resumed run continues with the same task."""
        return {"current_task": self.current_task}

    def load_state_dict(self, state_dict: dict) -> None:
        self.set_task(int(state_dict["current_task"]))

    # ------------------------------------------------------------------ evaluation

    def recall_suites(self, task_index: int) -> dict[str, FactRecallSuite]:
        """Fact-recall suites for one task: one per template (training and held-out), keyed by
        template name; see train_templates / heldout_templates."""
        facts = self.task_facts(task_index)
        return {
            name: FactRecallSuite(facts, self.templates[name], self.recall_max_new_tokens, self.generation_batch_size,
                                  name=f"task{task_index}/{name}")
            for name in (*self.train_templates, *self.heldout_templates)
        }

    def evaluate_recall(self, model, tokenizer, tasks: Sequence[int], batch_size: int | None = None,
                        items: dict | None = None) -> dict[int, dict[str, dict[str, float]]]:
        """Recall of every fact of `tasks` under every template: task -> template -> {"em",
        "contains"}; one greedy pass per task over all its templates (see
        eval/suites.evaluate_task_recall). Same numbers as recall_suites(j)[t].evaluate(...).
        `items`, if given, receives each (task, template)'s per-fact columns
        (FactRecallSuite.last_items) for intervals and items/ files."""
        results = evaluate_task_recall(model, tokenizer, {j: self.recall_suites(j) for j in tasks},
                                       batch_size or self.generation_batch_size, items)
        rephrased = {j: {REPHRASED: s} for j in tasks if (s := self.rephrased_suite(j)) is not None}
        if rephrased:  # its own pass: a longer decoding than the templates' (rephrased_max_new_tokens)
            for j, r in evaluate_task_recall(model, tokenizer, rephrased, batch_size or self.generation_batch_size,
                                             items, scope=REPHRASED).items():
                results[j].update(r)
        return results

    def rephrased_suite(self, task_index: int) -> FactRecallSuite | None:
        """Recall of the task's facts asked in other words (each fact's `rephrased` questions,
        one item per rephrasing, the fact's id on each) under the first training template;
        None if no fact of the task has one. Decodes rephrased_max_new_tokens tokens, so an
        answer after a short preamble ("The city is ...") is still seen by "contains"."""
        facts = [Fact(f.id, r, f.answer, f.aliases) for f in self.task_facts(task_index) for r in f.rephrased]
        if not facts:
            return None
        return FactRecallSuite(facts, self.templates[self.train_templates[0]], self.rephrased_max_new_tokens,
                               self.generation_batch_size, name=f"task{task_index}/{REPHRASED}")

    def heldout_suites(self) -> dict:
        """The held-out capability suites configured in `suites`, built once."""
        if self._heldout_suites is None:
            self._heldout_suites = {}
            for name, opts in self.suite_options.items():
                if is_custom(opts):  # a suite kind over the user's own file or dataset
                    self._heldout_suites[name] = build_custom_suite(
                        name, opts, self.seed, generation_batch_size=self.generation_batch_size)
                    continue
                opts = dict(opts)
                n_items = int(opts.pop("n_items"))
                if name == KNOWN_SUITE:
                    self._require_stream()
                    self._heldout_suites[name] = FactRecallSuite(
                        self._known, self.known_template(), self.recall_max_new_tokens, self.generation_batch_size,
                        name=KNOWN_SUITE, origin="triviaqa (answered exactly by the base model under the probe prompt)")
                    continue
                if name == "nq_open":
                    opts.setdefault("generation_batch_size", self.generation_batch_size)
                self._heldout_suites[name] = build_suite(
                    name, n_items, self.seed, source=self.source, data_root=self.data_root, **opts
                )
            if self.facts_source == "file" and self.known_items:
                self._require_stream()
                self._heldout_suites[FILE_KNOWN_SUITE] = FactRecallSuite(
                    self._known, self.known_template(), self.recall_max_new_tokens, self.generation_batch_size,
                    name=FILE_KNOWN_SUITE, origin=f"{self.file_spec.path} (answered exactly by the base model under the probe prompt)")
            self.info["suites"] = {n: s.origin for n, s in self._heldout_suites.items()}
        return self._heldout_suites

    # ------------------------------------------------------------------ background

    def background_examples(self) -> list[TrainingExample]:
        """The background corpus (docs/design.md §3, §9): QA text in the stream's *training*
        templates but about other questions (so template tokens look ordinary, not
        fact-specific), plus LAMBADA passages, in a seeded shuffled order. loss_mask follows
        loss_on for QA text and covers every passage token for LAMBADA; sequences are
        truncated to background_max_len tokens."""
        self._require_stream()
        examples = [
            self._encode(fact, self.train_templates[i % len(self.train_templates)])
            for i, fact in enumerate(self._background_facts)
        ]
        for passage in self._background_passages:
            ids = self.tokenizer(passage.text, add_special_tokens=True)["input_ids"]
            examples.append(TrainingExample(tuple(ids), (False,) + (True,) * (len(ids) - 1), f"lambada-{passage.id}", "passage"))
        examples = [
            TrainingExample(e.input_ids[: self.background_max_len], e.loss_mask[: self.background_max_len], e.fact_id, e.template)
            for e in examples
        ]
        order = seeded_order(len(examples), self.seed, "background")
        return [examples[i] for i in order]

    def background_batches(self, batch_size: int | None = None, sort_by_length: bool = False) -> list[dict]:
        """Collated background batches (same keys as training batches)."""
        size = batch_size or self.background_batch_size
        examples = self.background_examples()
        if not examples:
            raise ValueError("The background corpus is empty: set at least one count in `background`.")
        if sort_by_length:
            # Batches of similar length (stable sort of the seeded order): short QA sequences are not
            # padded to the length of a LAMBADA passage (statistics over all batches do not need the
            # shuffled order; k-means key init, which may stop early, does).
            examples = sorted(examples, key=lambda e: len(e.input_ids))
        pad_id = pad_token_id(self.tokenizer)
        return [collate_examples(examples[i:i + size], pad_id) for i in range(0, len(examples), size)]

    def template_group_batches(self, n_questions: int, questions_per_batch: int = 8) -> list[dict]:
        """The first ``n_questions`` QA facts of the background, each under every *training*
        template, collated with ``groups`` (the question's index per row): the corpus of the
        within-question covariance of ``model.memory.input_norm=zca_within`` (memory/whitening.py)."""
        self._require_stream()
        facts = self._background_facts[:n_questions]
        if len(facts) < 2 or len(self.train_templates) < 2:
            raise ValueError(
                f"input_norm=zca_within needs >= 2 background questions and >= 2 training templates; got "
                f"{len(facts)} and {len(self.train_templates)} (data.background.triviaqa, data.templates)."
            )
        pad_id = pad_token_id(self.tokenizer)
        batches = []
        for start in range(0, len(facts), questions_per_batch):
            chunk = range(start, min(start + questions_per_batch, len(facts)))
            examples = [self._encode(facts[q], name) for q in chunk for name in self.train_templates]
            batch = collate_examples(examples, pad_id)
            batch["groups"] = torch.tensor([q for q in chunk for _ in self.train_templates])
            batches.append(batch)
        return batches

    def rewording_group_batches(self, n_questions: int, questions_per_batch: int = 8) -> list[dict]:
        """The first ``n_questions`` QA facts of the background, each with its model-written rewordings
        (data/rewording.py, data.rewordings styles or 3, the same filters as a stream fact's), under the first
        training template, collated with ``groups`` (the question's index per row): the corpus of
        ``model.memory.within_groups=rewordings``. Questions left with no rewording are skipped."""
        self._require_stream()
        facts = self._background_facts[:n_questions]
        # as many styles as the stream's facts are trained with (3 when they are not reworded)
        kept, counts = self._kept_rewordings(facts, self.rewordings or 3)
        groups = [[Fact(f.id, q, f.answer, f.aliases) for q in (f.question, *kept[f.id])] for f in facts if kept[f.id]]
        if len(groups) < 2:
            raise ValueError(f"model.memory.within_groups=rewordings: only {len(groups)} of {len(facts)} background "
                             "questions kept a rewording; raise data.background.triviaqa or within_questions.")
        log.info("Rewording groups for whitening: %d questions, %d rewordings kept of %d generated",
                 len(groups), counts["kept"], counts["generated"])
        pad_id = pad_token_id(self.tokenizer)
        template = self.train_templates[0]
        batches = []
        for start in range(0, len(groups), questions_per_batch):
            chunk = groups[start:start + questions_per_batch]
            batch = collate_examples([self._encode(f, template) for g in chunk for f in g], pad_id)
            batch["groups"] = torch.tensor([start + q for q, g in enumerate(chunk) for _ in g])
            batches.append(batch)
        return batches

    def _rewording_cache(self):
        return reword_cache_file(self.cache_dir or default_cache_dir().parent / "rewordings",
                                 self.model_fingerprint or self._fingerprint(), self.rewording_max_new_tokens)

    def rewording_cache_name(self) -> str:
        """Names the generator and prompts of the rewordings (keys caches built from them)."""
        return self._rewording_cache().name

    def background_key(self) -> dict:
        """What determines the background corpus (for the background-statistics cache key)."""
        return {"background": dict(self.background_sizes), "seed": self.seed, "templates": list(self.train_templates),
                "template_texts": [self.templates[n].text for n in self.train_templates], "loss_on": self.loss_on,
                "max_len": self.background_max_len, "facts": self.facts_source}
