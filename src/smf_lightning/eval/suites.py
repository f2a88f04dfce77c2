"""Held-out capability suites (the forgetting probes of the SMF papers) and fact recall.

Every suite has the same interface:

    suite.name, suite.primary_metric, suite.higher_is_better
    suite.evaluate(model, tokenizer, batch_size) -> dict[str, float]
    suite.last_items       per-item columns of the last evaluate call ("id", maybe "prediction",
                           the scores); the metrics are recomputed from them exactly by
    suite.aggregates       metric -> metrics.Aggregate (mean of item scores or a ratio of sums)

All scoring is batched (one forward per batch of left-padded sequences; greedy decoding
with a KV cache), see smf_lightning.eval.scoring. Subsets are fixed by a seed: the first
`n_items` of a seeded permutation of the dataset, so growing `n_items` keeps the smaller
subset as a prefix, and other users of the same dataset (the background corpus) take
items from the *end* of the same permutation and never overlap.

Suites come in kinds; the four built-in suites are instances of them, and a user's own suite
is any kind pointed at a file or dataset by config (eval/custom_suites.py, conf/data/facts_triviaqa.yaml):

| kind (class)                          | built-in instance | metrics (primary first)                     | what it is |
|---------------------------------------|-------------------|---------------------------------------------|------------|
| `qa` (QASuite)                        | `nq_open`         | f1 ↑, em ↑, answer_nll ↓                    | greedy answer vs gold answers, SQuAD normalisation (Lin et al. 2025 report NQ F1); NLL per token of the first gold answer |
| `multiple_choice` (MultipleChoiceSuite) | `hellaswag`     | acc_norm ↑, acc ↑                           | choice with the best log-likelihood per *character* of the ending (lm-evaluation-harness acc_norm: independent of the tokenizer, so Qwen and SmolLM numbers compare); acc = unnormalised sum |
| `perplexity` (PerplexitySuite)        | `gsm8k` (nll ↓, bits_per_byte ↓ only) | ppl ↓, nll ↓, bits_per_byte ↓ | token perplexity of a text, given its context if it has one (GSM8K: the gold worked solution and final answer given the question) |
| `last_word` (LambadaSuite)            | `lambada`         | last_word_ppl ↓, last_word_acc ↑, (passage_ppl ↓) | exp(mean NLL of the last word), greedy reproduces the last word, token perplexity of the whole passage (with score_passage=True) |
| fact recall (FactRecallSuite)         |                   | em ↑, contains ↑                            | greedy answer under one template; em = normalised exact match (no credit for "Niger Niger Niger"), contains = lenient alias containment |
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from smf_lightning.data.facts import Fact, FactTemplate, seeded_order
from smf_lightning.data.sources import ChoiceItem, MathItem, PassageItem, QAItem, load_source
from smf_lightning.eval.metrics import Aggregate, aggregate, exact_match, normalized_choice, recall_scores, token_f1
from smf_lightning.eval.scoring import (
    encode_context_continuation,
    generate_greedy,
    pad_token_id,
    score_choices,
    score_continuations,
    score_sequences,
)

SUITE_NAMES = ("nq_open", "hellaswag", "gsm8k", "lambada", "triviaqa_known")
# triviaqa_known (the locality probe of fact injection) is a FactRecallSuite over facts the base
# model answers; the datamodule builds it, since it needs the model's probe.


@dataclass(frozen=True)
class TextItem:
    """A text whose tokens a `perplexity` suite scores, after its `context` if it has one."""

    id: str
    text: str
    context: str | None = None


def _aggregate_all(aggregates: dict[str, Aggregate], columns: dict[str, list]) -> dict[str, float]:
    return {metric: aggregate(agg, columns) for metric, agg in aggregates.items()}


# Per-item F1 and EM are ours (metrics.token_f1 / exact_match), not torchmetrics' SQuAD: its
# normalisation is the same SQuAD v1.1 one, but it scores in float32 tensors and reports
# percentages, so F1 would change in the 7th digit (tests/test_intervals.py compares the two).


@dataclass
class QASuite:
    """Open questions (kind `qa`): greedy answer F1/EM against the gold answers and the NLL of
    the first gold answer."""

    items: Sequence[QAItem]
    prompt: str = "Question: {question}?\nAnswer:"
    max_new_tokens: int = 12
    generation_batch_size: int | None = None  # rows per greedy batch (None: batch_size); decoding is
    #   bound by reading the weights once per step, so larger batches are nearly free per row
    max_length: int = 512
    name: str = "qa"
    origin: str = ""  # where the items came from (hub/offline location, or the suite's file)
    primary_metric: str = "f1"
    higher_is_better: bool = True
    last_predictions: list[str] = field(default_factory=list, repr=False)
    last_items: dict[str, list] = field(default_factory=dict, repr=False)
    aggregates = {"f1": Aggregate("mean", "f1"), "em": Aggregate("mean", "em"),
                  "answer_nll": Aggregate("nll_ratio", "answer_logprob", "answer_tokens")}

    def _prompt(self, item: QAItem) -> str:
        return self.prompt.replace("{question}", item.question.rstrip("?"))

    def evaluate(self, model, tokenizer, batch_size: int) -> dict[str, float]:
        prompts = [self._prompt(it) for it in self.items]
        predictions = generate_greedy(
            model, tokenizer, prompts, self.max_new_tokens, self.generation_batch_size or batch_size
        )
        self.last_predictions = predictions
        scored = score_continuations(
            model, tokenizer, prompts, [" " + it.answers[0] for it in self.items], batch_size, self.max_length
        )
        self.last_items = {
            "id": [it.id for it in self.items],
            "prediction": list(predictions),
            "f1": [token_f1(p, it.answers) for p, it in zip(predictions, self.items)],
            "em": [exact_match(p, it.answers) for p, it in zip(predictions, self.items)],
            "answer_logprob": [s.sum_logprob for s in scored],
            "answer_tokens": [s.n_tokens for s in scored],
        }
        return _aggregate_all(self.aggregates, self.last_items)


@dataclass
class NQOpenSuite(QASuite):
    """NaturalQuestions-open (the built-in `qa` suite)."""

    name: str = "nq_open"


@dataclass
class MultipleChoiceSuite:
    """Multiple choice (kind `multiple_choice`): length-normalised (per character) log-likelihood
    choice accuracy. Each choice is scored after the context (rendered by `prompt`) and a space."""

    items: Sequence[ChoiceItem]
    prompt: str = "{context}"
    max_length: int = 512
    name: str = "multiple_choice"
    origin: str = ""  # where the items came from (hub/offline location, or the suite's file)
    primary_metric: str = "acc_norm"
    higher_is_better: bool = True
    last_items: dict[str, list] = field(default_factory=dict, repr=False)
    aggregates = {"acc_norm": Aggregate("mean", "acc_norm"), "acc": Aggregate("mean", "acc")}

    def evaluate(self, model, tokenizer, batch_size: int) -> dict[str, float]:
        endings = [[" " + e for e in it.endings] for it in self.items]
        contexts = [self.prompt.replace("{context}", it.ctx) for it in self.items]
        scored = score_choices(model, tokenizer, contexts, endings, batch_size, self.max_length)
        hits_norm, hits_raw = [], []
        for it, ends, choice_scores in zip(self.items, endings, scored):
            sums = [s.sum_logprob for s in choice_scores]
            hits_norm.append(float(normalized_choice(sums, [len(e) for e in ends]) == it.label))
            hits_raw.append(float(normalized_choice(sums, [1] * len(ends)) == it.label))
        self.last_items = {"id": [it.id for it in self.items], "acc_norm": hits_norm, "acc": hits_raw}
        return _aggregate_all(self.aggregates, self.last_items)


@dataclass
class HellaSwagSuite(MultipleChoiceSuite):
    """HellaSwag (the built-in `multiple_choice` suite)."""

    name: str = "hellaswag"


@dataclass
class PerplexitySuite:
    """Perplexity of texts (kind `perplexity`): the log-likelihood of every token of an item's
    text, given its context (rendered by `prompt`, then `separator`) when it has one. Without a
    context the text's first token has nothing to predict it (unless the tokenizer adds a BOS),
    so it is left out of tokens and bytes alike."""

    items: Sequence[TextItem]
    prompt: str = "{context}"
    separator: str = " "  # between the context and the text
    max_length: int = 1024  # longer items lose context tokens from the left (a context-free text: its start)
    name: str = "perplexity"
    origin: str = ""
    primary_metric: str = "ppl"
    higher_is_better: bool = False
    last_items: dict[str, list] = field(default_factory=dict, repr=False)
    aggregates = {"ppl": Aggregate("ppl_ratio", "logprob", "tokens"), "nll": Aggregate("nll_ratio", "logprob", "tokens"),
                  "bits_per_byte": Aggregate("bits_ratio", "logprob", "bytes")}

    def pairs(self) -> list[tuple[str | None, str]]:
        """(context or None, scored text) per item."""
        return [(None if it.context is None else self.prompt.replace("{context}", it.context),
                 it.text if it.context is None else self.separator + it.text) for it in self.items]

    def evaluate(self, model, tokenizer, batch_size: int) -> dict[str, float]:
        pairs = self.pairs()
        sequences: list = [None] * len(pairs)
        n_scored: list = [None] * len(pairs)
        nbytes: list = [None] * len(pairs)
        given = [i for i, (ctx, _) in enumerate(pairs) if ctx is not None]
        free = [i for i, (ctx, _) in enumerate(pairs) if ctx is None]
        if given:
            for i, (ids, n) in zip(given, encode_context_continuation(
                    tokenizer, [pairs[i][0] for i in given], [pairs[i][1] for i in given], self.max_length)):
                sequences[i], n_scored[i], nbytes[i] = ids, n, len(pairs[i][1].encode("utf-8"))
        for i, ids in zip(free, tokenizer([pairs[i][1] for i in free], add_special_tokens=True)["input_ids"] if free else ()):
            ids = list(ids[-self.max_length:])
            if len(ids) < 2:
                raise ValueError(f"{self.name}: item {self.items[i].id!r} is one token long and has no context; "
                                 f"there is nothing to score (give it a context field, or drop it).")
            sequences[i], n_scored[i] = ids, len(ids) - 1
            nbytes[i] = len(tokenizer.decode(ids[1:]).encode("utf-8"))  # the scored tokens' text
        scored = score_sequences(model, sequences, n_scored, batch_size, pad_token_id(tokenizer))
        self.last_items = {"id": [it.id for it in self.items]}
        columns = {"logprob": [s.sum_logprob for s in scored], "tokens": [s.n_tokens for s in scored], "bytes": nbytes}
        for agg in self.aggregates.values():  # the columns the suite's metrics read
            for column in agg.columns:
                self.last_items[column] = columns[column]
        return _aggregate_all(self.aggregates, self.last_items)


@dataclass
class GSM8KSuite(PerplexitySuite):
    """GSM8K (the built-in `perplexity` suite): NLL of the gold worked solution (and final
    answer) given the question."""

    items: Sequence[MathItem]
    prompt: str = "Question: {question}\nAnswer:"
    max_length: int = 768
    name: str = "gsm8k"
    primary_metric: str = "nll"
    aggregates = {"nll": Aggregate("nll_ratio", "logprob", "tokens"), "bits_per_byte": Aggregate("bits_ratio", "logprob", "bytes")}

    def continuation(self, item: MathItem) -> str:
        return f" {item.solution}\nThe answer is {item.answer}."

    def pairs(self) -> list[tuple[str | None, str]]:
        return [(self.prompt.replace("{question}", it.question), self.continuation(it)) for it in self.items]


@dataclass
class LambadaSuite:
    """Last-word prediction (kind `last_word`; the built-in LAMBADA suite, OpenAI version):
    last-word perplexity and accuracy, passage perplexity.

    One forward per batch; with `score_passage` it scores every passage token, so the last
    word's and the whole passage's numbers come from the same pass. Last-word accuracy = the greedy prediction
    reproduces all of the last word's tokens (lm-evaluation-harness `acc`)."""

    items: Sequence[PassageItem]
    score_passage: bool = False
    max_length: int = 512
    name: str = "lambada"
    origin: str = ""  # where the items came from (hub/offline location, or the suite's file)
    primary_metric: str = "last_word_ppl"
    higher_is_better: bool = False
    last_items: dict[str, list] = field(default_factory=dict, repr=False)

    @property
    def aggregates(self) -> dict[str, Aggregate]:
        # perplexities from summed log-probs (exp of the mean NLL), never a mean of per-item perplexities
        aggs = {"last_word_ppl": Aggregate("ppl_mean", "word_logprob"), "last_word_acc": Aggregate("mean", "word_greedy")}
        if self.score_passage:
            aggs["passage_ppl"] = Aggregate("ppl_ratio", "passage_logprob", "passage_tokens")
        return aggs

    def evaluate(self, model, tokenizer, batch_size: int) -> dict[str, float]:
        encoded = encode_context_continuation(
            tokenizer, [it.context for it in self.items], [" " + it.last_word for it in self.items], self.max_length
        )
        sequences = [ids for ids, _ in encoded]
        # Scoring every passage token needs the vocabulary projection at every position
        # (about a quarter more compute for Qwen2.5-0.5B), so it is opt-in.
        n_scored = [len(ids) - 1 if self.score_passage else n for ids, n in encoded]
        scored = score_sequences(model, sequences, n_scored, batch_size, pad_token_id(tokenizer))
        self.last_items = {
            "id": [it.id for it in self.items],
            "word_logprob": [float(s.logprobs[-n:].sum()) for s, (_, n) in zip(scored, encoded)],
            "word_greedy": [float(s.greedy[-n:].all()) for s, (_, n) in zip(scored, encoded)],
        }
        if self.score_passage:
            self.last_items["passage_logprob"] = [s.sum_logprob for s in scored]
            self.last_items["passage_tokens"] = [s.n_tokens for s in scored]
        return _aggregate_all(self.aggregates, self.last_items)


@dataclass
class FactRecallSuite:
    """Recall of `facts` under one template: greedy answer to the template's prompt."""

    facts: Sequence[Fact]
    template: FactTemplate
    max_new_tokens: int = 12
    generation_batch_size: int | None = None  # rows per greedy batch (None: batch_size)
    name: str = "fact_recall"
    origin: str = ""
    primary_metric: str = "em"
    higher_is_better: bool = True
    last_predictions: list[str] = field(default_factory=list, repr=False)
    last_items: dict[str, list] = field(default_factory=dict, repr=False)
    aggregates = {"em": Aggregate("mean", "em"), "contains": Aggregate("mean", "contains")}

    @property
    def items(self) -> Sequence[Fact]:
        return self.facts

    def evaluate(self, model, tokenizer, batch_size: int) -> dict[str, float]:
        prompts = [self.template.prompt(f.question) for f in self.facts]
        predictions = generate_greedy(
            model, tokenizer, prompts, self.max_new_tokens, self.generation_batch_size or batch_size
        )
        return self.score_predictions(predictions)

    def score_predictions(self, predictions: Sequence[str]) -> dict[str, float]:
        """{"em", "contains"} of greedy continuations (one per fact, in order); kept as
        last_predictions for per_fact()."""
        self.last_predictions = list(predictions)
        _, _, suffix = self.template.render("", "")
        scores = [recall_scores(p, suffix, f.aliases) for p, f in zip(predictions, self.facts, strict=True)]
        self.last_items = {"id": [f.id for f in self.facts], "prediction": list(predictions),
                           "em": [s[0] for s in scores], "contains": [s[1] for s in scores]}
        return _aggregate_all(self.aggregates, self.last_items)

    def per_fact(self) -> list[tuple[str, str, float]]:
        """(fact id, last prediction, exact match) from the last evaluate call."""
        _, _, suffix = self.template.render("", "")
        return [(f.id, p, recall_scores(p, suffix, f.aliases)[0]) for f, p in zip(self.facts, self.last_predictions)]


REPHRASED = "rephrased"  # the recall records' "template" of a fact's evaluation-only rephrasings


def evaluate_task_recall(model, tokenizer, task_suites: Mapping[int, Mapping[str, FactRecallSuite]], batch_size: int,
                         items: dict | None = None, scope: str = "fact_recall") -> dict[int, dict[str, dict[str, float]]]:
    """Fact recall of several tasks (task -> template name -> its FactRecallSuite): task ->
    template -> {"em", "contains"}; `items`, if given, receives each (task, template)'s
    last_items. `scope` names the kept prefix states of these prompts (one per task).

    One greedy pass per task over all its templates' prompts: batches are formed within a
    task, so each task's batches are the same at every evaluation point, however many tasks
    are seen. The frozen-prefix states kept for them (eval/prefix_states.py, a scope per task)
    then serve every later point; one pass over all tasks' prompts together would form other
    batches whenever a task is added, and nothing kept would come again."""
    from smf_lightning.eval.prefix_states import active_states

    states = active_states(model)
    results: dict[int, dict[str, dict[str, float]]] = {}
    for j, suites in task_suites.items():
        suites = dict(suites)
        prompts = [s.template.prompt(f.question) for s in suites.values() for f in s.facts]
        max_new = {s.max_new_tokens for s in suites.values()}
        if len(max_new) != 1:
            raise ValueError(f"task {j}: its recall suites decode different numbers of tokens ({sorted(max_new)})")
        with states.scope(f"{scope}/task{j}") if states is not None else contextlib.nullcontext():
            predictions = generate_greedy(model, tokenizer, prompts, max_new.pop(), batch_size) if prompts else []
        results[j], pos = {}, 0
        for name, suite in suites.items():
            n = len(suite.facts)
            results[j][name] = suite.score_predictions(predictions[pos:pos + n])
            if items is not None:
                items[j, name] = suite.last_items
            pos += n
    return results


_SUITE_CLASSES = {"nq_open": NQOpenSuite, "hellaswag": HellaSwagSuite, "gsm8k": GSM8KSuite, "lambada": LambadaSuite}
SUITE_KINDS = {"qa": QASuite, "multiple_choice": MultipleChoiceSuite, "perplexity": PerplexitySuite,
               "last_word": LambadaSuite}  # the kinds a suite of one's own can have (eval/custom_suites.py)
BUILTIN_KINDS = {"nq_open": "qa", "hellaswag": "multiple_choice", "gsm8k": "perplexity", "lambada": "last_word"}


def suite_subset_order(name: str, n_total: int, seed: int) -> list[int]:
    """The seeded permutation a suite takes its first items from (background takes the last)."""
    return seeded_order(n_total, seed, f"suite/{name}")


def build_suite(
    name: str,
    n_items: int,
    seed: int,
    source: str = "auto",
    data_root: str | None = None,
    **options,
):
    """A held-out suite over a fixed seeded subset of `n_items` items of dataset `name`.

    `options` go to the suite class (e.g. `prompt`, `max_new_tokens`, `max_length`).
    """
    if name not in _SUITE_CLASSES:
        raise ValueError(f"Unknown held-out suite {name!r}. Allowed suites: {', '.join(SUITE_NAMES)}.")
    data = load_source(name, source=source, data_root=data_root)
    if not 1 <= n_items <= len(data):
        raise ValueError(f"Suite {name!r}: n_items must be in [1, {len(data)}] (the dataset size); got {n_items}.")
    order = suite_subset_order(name, len(data), seed)[:n_items]
    return _SUITE_CLASSES[name](items=[data.items[i] for i in order], origin=f"{data.origin}:{data.location}", **options)
