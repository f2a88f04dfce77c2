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

It coordinates; every job is a module of its own in this package (streams/__init__.py lists
them): options.py checks the options, stream.py and one builder per ``data.facts`` kind build
the stream, schedule.py orders a task's batches, suites.py and background.py serve evaluation
and slot statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

import lightning as L
from torch.utils.data import DataLoader

from smf_lightning.data import documents
from smf_lightning.data.augment import AugmentSpec, StudyItem
from smf_lightning.data.fact_file import FactFileSpec
from smf_lightning.data.facts import Fact, TrainingExample, collate_examples, make_templates, split_templates
from smf_lightning.eval.probe import DEFAULT_PROBE_PROMPT
from smf_lightning.eval.scoring import pad_token_id
from smf_lightning.eval.suites import FactRecallSuite
from smf_lightning.streams.augmentation import Augmenter, write_augmented
from smf_lightning.streams.background import background_items, collate_background, collate_template_groups, encode_background
from smf_lightning.streams.document_stream import document_stream
from smf_lightning.streams.encoding import FactEncoder
from smf_lightning.streams.file_stream import file_stream
from smf_lightning.streams.known import FILE_KNOWN_SUITE, KNOWN_SUITE, known_suite, known_triviaqa_facts
from smf_lightning.streams.options import check_options
from smf_lightning.streams.probing import Prober
from smf_lightning.streams.prefixes import PREFIX_WORDS, prefixed_examples
from smf_lightning.streams.rewordings import Rewriter
from smf_lightning.streams.schedule import task_batches
from smf_lightning.streams.stream import Stream, synthetic_stream
from smf_lightning.streams.suites import build_heldout_suites, evaluate_recall, task_recall_suites, task_rephrased_suite
from smf_lightning.streams.triviaqa_stream import triviaqa_stream


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
        probe: bool | None = None,
        known_items: int = 0,
        passages_per_task: int | None = None,
        chunk_overlap: int = 0,
        require_qa: bool = True,
        example_max_answer_words: int = 5,
        passage_split: str | None = None,
        augment: Mapping | None = None,
        rephrased_max_new_tokens: int,
        rephrasings: str | None = None,
        exclude_streams: Sequence[str] = (),
        rewordings: int = 0,
        rewording_max_new_tokens: int = 40,
        prefixes: int = 0,
        prefix_words: Sequence[int] = PREFIX_WORDS,
        order_seed: int | None = None,
        lead_stream: Mapping[str, int] | None = None,
    ):
        """
        tokenizer, probe_model: the run's tokenizer and its *base* model (probed for
            unknown TriviaQA facts; not needed for facts=synthetic or a cached probe with
            `model_fingerprint` given).
        The other arguments are documented in conf/data/facts_triviaqa.yaml; path ... known_items
        (facts=file only) in conf/data/facts_file.yaml; passages_per_task ... augment (facts=documents
        only: a task is passages, facts_per_task = passages_per_task) in conf/data/documents.yaml.
        """
        super().__init__()
        # null (a run saved before documents were probed): facts=file probes, facts=documents does not
        probe = facts != "documents" if probe is None else bool(probe)
        check_options(facts=facts, n_tasks=n_tasks, facts_per_task=facts_per_task, passages_per_task=passages_per_task,
                      chunk_overlap=chunk_overlap, max_seq_len=max_seq_len, loss_on=loss_on, suites=suites,
                      schedule=schedule, rephrased_max_new_tokens=rephrased_max_new_tokens,
                      rewordings=rewordings, prefixes=prefixes, prefix_words=prefix_words, background=background,
                      path=path, known_items=known_items, probe=probe,
                      passage_split=passage_split, augment=augment,
                      counts=dict(train_batch_size=train_batch_size, repeats_per_batch=repeats_per_batch,
                                  eval_batch_size=eval_batch_size, generation_batch_size=generation_batch_size,
                                  background_batch_size=background_batch_size, probe_batch_size=probe_batch_size,
                                  max_seq_len=max_seq_len, epochs_per_task=epochs_per_task))

        # the stream: what it is made of and how big
        self.tokenizer = tokenizer
        self.facts_source = facts
        self.n_tasks, self.facts_per_task, self.seed = n_tasks, facts_per_task, seed
        self.file_spec = (FactFileSpec(str(path), format, split, fields, list_separator, bool(skip_invalid))
                          if path and facts == "file" else None)
        self.document_spec = (documents.DocumentSpec(path and str(path), format, split, fields, bool(skip_invalid),
                                                     bool(require_qa), int(example_max_answer_words))
                              if facts == "documents" else None)
        self.chunk_overlap = int(chunk_overlap)
        self.passage_split = passage_split
        self.augment = AugmentSpec.from_mapping(augment)  # off unless facts=documents sets kinds
        self.source, self.data_root, self.cache_dir = source, data_root, cache_dir
        # null drops a template inherited from another data yaml (Hydra merges dicts; a user's
        # yaml with its own templates sets the inherited ones to null)
        self.templates = make_templates({name: text for name, text in templates.items() if text is not None})
        self.train_templates, self.heldout_templates = split_templates(self.templates, list(heldout_templates))
        self.loss_on, self.max_seq_len = loss_on, max_seq_len
        self.rephrasings = rephrasings
        self.exclude_streams = tuple(exclude_streams or ())
        self.lead_stream = dict(lead_stream) if lead_stream else None  # facts=triviaqa: triviaqa_stream.py
        self.rewordings = int(rewordings)
        self.prefixes, self.prefix_words = int(prefixes), (int(prefix_words[0]), int(prefix_words[1]))
        # the probe: which facts the base model already knows
        self.probe_prompt = probe_prompt or DEFAULT_PROBE_PROMPT
        self.probe_pool_size = probe_pool_size
        self.probe_templates = bool(probe_templates)
        self.probe_file = bool(probe)
        self.known_items = int(known_items)
        # the schedule: batches and passes
        self.schedule, self.epochs_per_task = schedule, epochs_per_task
        self.train_batch_size, self.repeats_per_batch = train_batch_size, repeats_per_batch
        self.order_seed = self.seed if order_seed is None else int(order_seed)
        # evaluation and the background corpus
        self.recall_max_new_tokens = recall_max_new_tokens
        self.rephrased_max_new_tokens = rephrased_max_new_tokens
        self.eval_batch_size, self.generation_batch_size = eval_batch_size, generation_batch_size
        self.suite_options = {name: dict(opts) for name, opts in suites.items()}
        self.background_sizes = {name: int(n) for name, n in background.items() if int(n) > 0}
        self.background_batch_size, self.background_max_len = background_batch_size, background_max_len

        self.encoder = FactEncoder(tokenizer, self.templates, loss_on=loss_on, max_seq_len=max_seq_len,
                                   max_answer_words=max_answer_words)
        self.prober = Prober(probe_model, tokenizer, prompt=self.probe_prompt, max_new_tokens=probe_max_new_tokens,
                             batch_size=probe_batch_size, cache_dir=cache_dir, fingerprint=model_fingerprint)
        self.rewriter = Rewriter(self.prober, self.encoder, max_new_tokens=int(rewording_max_new_tokens),
                                 generation_batch_size=generation_batch_size, cache_dir=cache_dir)
        self.augmenter = Augmenter(self.augment, self.prober, self.encoder, train_templates=self.train_templates,
                                   max_seq_len=max_seq_len, chunk_overlap=self.chunk_overlap,
                                   generation_batch_size=generation_batch_size, cache_dir=cache_dir)

        self.current_task = 0
        self.tasks: tuple[tuple[Fact, ...], ...] | None = None
        self.info: dict = {}
        self._task_passages: tuple[tuple[documents.Passage, ...], ...] = ()  # facts=documents
        self._augmented: dict[str, list[StudyItem]] = {}  # passage id -> its study material (data.augment)
        self._reworded: dict[str, tuple[str, ...]] = {}  # fact id -> its generated training rewordings
        self._known: list[Fact] = []  # the known-facts suite's facts (triviaqa_known or file_known)
        self._train_examples: dict[int, list[TrainingExample]] = {}
        self._background_facts: list[Fact] = []
        self._background_passages: list = []
        self._heldout_suites: dict | None = None

    @property
    def model_fingerprint(self) -> str | None:
        """The base model's fingerprint: given (data.model_fingerprint), or computed by the probe; None before."""
        return self.prober.model_fingerprint

    # ------------------------------------------------------------------ building

    def setup(self, stage: str | None = None) -> None:
        """Build the stream (idempotent): load or invent facts, probe, split into tasks; then the
        rewordings, the known-facts suite's facts and the background corpus's items."""
        if self.tasks is not None:
            return
        if self.tokenizer is None:
            raise ValueError("FactStreamDataModule needs the run's tokenizer (tokenizer=...).")
        stream = self._build_stream()
        self.tasks, self.info = stream.tasks, stream.info
        self._task_passages, self._known = stream.task_passages, stream.known
        self.encoder.forbid_rephrasings(self.tasks, stream.evaluation_questions)
        if self.augment.enabled:  # after forbid: nothing generated may encode an evaluation question
            self._augmented, self.info["documents"]["augmented"] = self.augmenter.augment(
                [p for task in self._task_passages for p in task], stream.evaluation_questions)
            sizes = self.info["documents"]["augmented"]["sequences_per_task"] = [
                len(self.training_examples(j)) for j in range(self.n_tasks)]
            if 0 in sizes:  # include_passage=false and no passage of a task kept any material
                raise documents.DocumentError(
                    f"task {sizes.index(0)} has nothing to train on: none of its passages kept study material "
                    "(the log says why); set data.augment.include_passage=true.")
        if self.rewordings and self.facts_source != "documents":
            self._reworded, self.info["rewordings"] = self.rewriter.stream_rewordings(self.tasks, self.rewordings)
        if KNOWN_SUITE in self.suite_options:  # probed now, on the base model (before any retrofit)
            self._known = known_triviaqa_facts(
                int(self.suite_options[KNOWN_SUITE]["n_items"]), prober=self.prober, eligible=self.encoder.eligible,
                seed=self.seed, pool_end=stream.pool_end, n_background=self.background_sizes.get("triviaqa", 0),
                source=self.source, data_root=self.data_root)
        self._background_facts, self._background_passages = background_items(
            self.background_sizes, stream_size=self.n_tasks * self.facts_per_task, seed=self.seed,
            suite_options=self.suite_options, source=self.source, data_root=self.data_root)
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

    def _build_stream(self) -> Stream:
        """The stream of ``data.facts`` (stream.py lists the builders)."""
        shape = dict(n_tasks=self.n_tasks, facts_per_task=self.facts_per_task, seed=self.seed)
        if self.facts_source == "file":
            return file_stream(self.file_spec, **shape, encoder=self.encoder,
                               prober=self.prober if self.probe_file else None, pool_size=self.probe_pool_size,
                               probe_templates=self.probe_templates, known_items=self.known_items)
        if self.facts_source == "documents":
            return document_stream(self.document_spec, **shape, data_root=self.data_root, tokenizer=self.tokenizer,
                                   max_seq_len=self.max_seq_len, chunk_overlap=self.chunk_overlap,
                                   passage_split=self.passage_split, prober=self.prober if self.probe_file else None,
                                   probe_templates=self.templates if self.probe_templates else None)
        if self.facts_source == "synthetic":
            return synthetic_stream(**shape)
        return triviaqa_stream(**shape, pool_size=self.probe_pool_size,
                               n_background=self.background_sizes.get("triviaqa", 0), encoder=self.encoder,
                               prober=self.prober, probe_templates=self.probe_templates,
                               exclude_streams=self.exclude_streams, rephrasings=self.rephrasings,
                               source=self.source, data_root=self.data_root, lead_stream=self.lead_stream)

    def _encode(self, fact: Fact, template_name: str, loss_on: str | None = None) -> TrainingExample:
        """``fact`` under a template (encoding.py: never an evaluation-only rephrasing)."""
        return self.encoder.encode(fact, template_name, loss_on)

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

    def training_questions(self, fact: Fact) -> tuple[str, ...]:
        """Every question ``fact`` is trained under (each under every training template): its
        question, its paraphrases, then its generated rewordings (data.rewordings)."""
        self._require_stream()
        return (*fact.training_questions(), *self._reworded.get(fact.id, ()))

    def training_examples(self, task_index: int) -> list[TrainingExample]:
        """The task's training sequences, fact by fact, each fact under every *training*
        template (held-out templates never appear here), for its question, each of its
        paraphrases and its rewordings (same fact id, same answer; encoding.py).
        facts=documents: passage by passage, its chunks and its study material (augmentation.py);
        fact_id = passage id (per-passage slot selection)."""
        if task_index not in self._train_examples and self.facts_source == "documents":
            self._require_stream()
            self._train_examples[task_index] = [
                ex for p in self._task_passages[task_index]
                for ex in self.augmenter.passage_sequences(p, self._augmented.get(p.id, ()))
            ]
        if task_index not in self._train_examples:
            facts = self.task_facts(task_index)
            self._train_examples[task_index] = [  # then data.prefixes more per fact (prefixes.py)
                *self.encoder.training_examples(facts, self.train_templates, self.training_questions),
                *prefixed_examples(facts, k=self.prefixes, words=self.prefix_words, passages=self._background_passages,
                                   questions=self.training_questions, templates=self.train_templates,
                                   encoder=self.encoder, seed=self.seed)]
        return self._train_examples[task_index]

    def train_batches(self, task_index: int) -> list[list[TrainingExample]]:
        """The task's batches, in training order, each repeated repeats_per_batch times in a row
        (data.schedule, schedule.py)."""
        return task_batches(self.training_examples(task_index), task_index, schedule=self.schedule,
                            batch_size=self.train_batch_size, epochs=self.epochs_per_task,
                            repeats=self.repeats_per_batch, order_seed=self.order_seed)

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

    def write_augmented(self, out_dir) -> None:
        """facts=documents with data.augment: every generated item into out_dir/augmented/task_<k>.jsonl."""
        if self.augment.enabled:
            write_augmented(out_dir, self._task_passages, self._augmented)

    def state_dict(self) -> dict:
        """Saved in Lightning checkpoints, so a resumed run continues with the same task."""
        return {"current_task": self.current_task}

    def load_state_dict(self, state_dict: dict) -> None:
        self.set_task(int(state_dict["current_task"]))

    # ------------------------------------------------------------------ evaluation

    def recall_suites(self, task_index: int) -> dict[str, FactRecallSuite]:
        """Fact-recall suites for one task: one per template (training and held-out), keyed by
        template name; see train_templates / heldout_templates."""
        return task_recall_suites(task_index, self.task_facts(task_index), self.templates,
                                  (*self.train_templates, *self.heldout_templates), self.recall_max_new_tokens,
                                  self.generation_batch_size)

    def evaluate_recall(self, model, tokenizer, tasks: Sequence[int], batch_size: int | None = None,
                        items: dict | None = None) -> dict[int, dict[str, dict[str, float]]]:
        """Recall of every fact of `tasks` under every template (and rephrased): task -> template ->
        {"em", "contains"}; the same numbers as recall_suites(j)[t].evaluate(...) in fewer greedy
        passes (suites.py). `items`, if given, receives each (task, template)'s per-fact columns
        (FactRecallSuite.last_items) for intervals and items/ files."""
        rephrased = {j: s for j in tasks if (s := self.rephrased_suite(j)) is not None}
        return evaluate_recall(model, tokenizer, {j: self.recall_suites(j) for j in tasks}, rephrased,
                               batch_size or self.generation_batch_size, items)

    def rephrased_suite(self, task_index: int) -> FactRecallSuite | None:
        """The task's facts asked in other words, under the first training template (suites.py)."""
        return task_rephrased_suite(task_index, self.task_facts(task_index), self.templates[self.train_templates[0]],
                                    self.rephrased_max_new_tokens, self.generation_batch_size)

    def heldout_suites(self) -> dict:
        """The held-out capability suites configured in `suites`, built once (suites.py), with
        the run's known-facts suite (known.py) among them."""
        if self._heldout_suites is None:
            known_among = {KNOWN_SUITE: "triviaqa"} if KNOWN_SUITE in self.suite_options else {}
            if self.facts_source == "file" and self.known_items:
                known_among[FILE_KNOWN_SUITE] = self.file_spec.path
            if known_among:
                self._require_stream()
            known = {name: known_suite(name, self._known, where, probe_prompt=self.probe_prompt,
                                       max_new_tokens=self.recall_max_new_tokens,
                                       generation_batch_size=self.generation_batch_size)
                     for name, where in known_among.items()}
            self._heldout_suites = build_heldout_suites(
                self.suite_options, seed=self.seed, source=self.source, data_root=self.data_root,
                generation_batch_size=self.generation_batch_size, known=known)
            self.info["suites"] = {n: s.origin for n, s in self._heldout_suites.items()}
        return self._heldout_suites

    # ------------------------------------------------------------------ background

    def background_examples(self) -> list[TrainingExample]:
        """The background corpus's sequences (background.py), in a seeded order."""
        self._require_stream()
        return encode_background(
            self._background_facts, self._background_passages, encode=self.encoder.encode,
            templates=self.train_templates, tokenizer=self.tokenizer, max_len=self.background_max_len, seed=self.seed)

    def background_batches(self, batch_size: int | None = None, sort_by_length: bool = False) -> list[dict]:
        """Collated background batches (same keys as training batches)."""
        return collate_background(self.background_examples(), batch_size or self.background_batch_size,
                                  pad_token_id(self.tokenizer), sort_by_length)

    def template_group_batches(self, n_questions: int, questions_per_batch: int = 8) -> list[dict]:
        """The first ``n_questions`` QA facts of the background, each under every training template,
        with ``groups``: the corpus of ``model.memory.input_norm=zca_within`` (background.py)."""
        self._require_stream()
        return collate_template_groups(
            self._background_facts[:n_questions], encode=self.encoder.encode, templates=self.train_templates,
            questions_per_batch=questions_per_batch, pad_id=pad_token_id(self.tokenizer))

    def rewording_group_batches(self, n_questions: int, questions_per_batch: int = 8) -> list[dict]:
        """The first ``n_questions`` QA facts of the background, each with its model-written
        rewordings, under the first training template, with ``groups``: the corpus of
        ``model.memory.within_groups=rewordings`` (rewordings.py)."""
        self._require_stream()
        # as many styles as the stream's facts are trained with (3 when they are not reworded)
        return self.rewriter.group_batches(self._background_facts[:n_questions], self.rewordings or 3,
                                           self.train_templates[0], questions_per_batch, pad_token_id(self.tokenizer))

    def rewording_cache_name(self) -> str:
        """Names the generator and prompts of the rewordings (keys caches built from them)."""
        return self.rewriter.cache_file().name

    def background_key(self) -> dict:
        """What determines the background corpus (for the background-statistics cache key)."""
        return {"background": dict(self.background_sizes), "seed": self.seed, "templates": list(self.train_templates),
                "template_texts": [self.templates[n].text for n in self.train_templates], "loss_on": self.loss_on,
                "max_len": self.background_max_len, "facts": self.facts_source}
