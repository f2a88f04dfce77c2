"""How the stream's facts become token sequences, and which facts fit.

Every sequence that is trained on or fitted to (training batches, background statistics,
whitening, the read gate's keys, key init) is encoded by :meth:`FactEncoder.encode`, so this is
where evaluation-only rephrasings are refused: they must never feed any of those.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

from smf_lightning.data.facts import Fact, FactTemplate, TrainingExample, encode_example, qa_item_to_fact
from smf_lightning.data.sources import QAItem
from smf_lightning.text import normalize_answer


class FactEncoder:
    """A fact under a named template -> a TrainingExample (data/facts.encode_example), for the
    run's tokenizer, templates and loss_on; and whether a fact fits the run's limits
    (max_answer_words, max_seq_len tokens under every template)."""

    def __init__(self, tokenizer, templates: Mapping[str, FactTemplate], *, loss_on: str, max_seq_len: int,
                 max_answer_words: int):
        self.tokenizer = tokenizer
        self.templates = templates
        self.loss_on = loss_on
        self.max_seq_len = max_seq_len
        self.max_answer_words = max_answer_words
        self.eval_only: dict[str, str] = {}  # normalised evaluation-only question -> what it is

    def forbid_rephrasings(self, tasks: Sequence[Sequence[Fact]], questions: Sequence[str] = ()) -> None:
        """From now on, refuse to encode the stream facts' evaluation-only rephrasings, and
        ``questions`` (facts=documents: the questions attached to the passages, which only measure)."""
        self.eval_only = {normalize_answer(q): "question attached to a passage" for q in questions}
        self.eval_only.update({normalize_answer(r): f"rephrasing of fact {f.id}" for task in tasks for f in task
                               for r in f.rephrased})

    def encode(self, fact: Fact, template_name: str, loss_on: str | None = None, prefix: str = "") -> TrainingExample:
        what = self.eval_only.get(normalize_answer(fact.question)) if self.eval_only else None
        if what is not None:
            raise ValueError(
                f"{fact.question!r} (used for {fact.id}) is an evaluation-only {what}: it must never "
                "be trained on or used for slot selection, whitening, background statistics or the read gate."
            )
        return encode_example(
            self.tokenizer, self.templates[template_name], fact.question, fact.answer, loss_on or self.loss_on, fact.id,
            prefix=prefix,
        )

    def prefixed(self, fact: Fact, template_name: str, prefix_words: Sequence[str]) -> TrainingExample | None:
        """``fact`` under ``template_name`` after a context prefix (data.prefixes): the words of
        ``prefix_words``, as many from the front as fit max_seq_len, then a line break; None if not
        even one word fits. The template keeps its name behind ``prefix:``."""
        for n in range(len(prefix_words), 0, -1):
            ex = self.encode(fact, template_name, prefix=" ".join(prefix_words[:n]) + "\n")
            if len(ex.input_ids) <= self.max_seq_len:
                return dataclasses.replace(ex, template=f"prefix:{template_name}")
        return None

    def training_examples(self, facts: Sequence[Fact], templates: Sequence[str],
                          questions: Callable[[Fact], Sequence[str]]) -> list[TrainingExample]:
        """Fact by fact, each of its ``questions(fact)`` (in order) under every one of
        ``templates``, all with the fact's id and answer."""
        return [
            self.encode(Fact(fact.id, question, fact.answer, fact.aliases), name)
            for fact in facts
            for question in questions(fact)
            for name in templates
        ]

    def eligible(self, item: QAItem) -> bool:
        """Short answers, and every template's sequence fits max_seq_len tokens."""
        if len(item.answers[0].split()) > self.max_answer_words:
            return False
        fact = qa_item_to_fact(item)
        return all(len(self.encode(fact, name).input_ids) <= self.max_seq_len for name in self.templates)

    def unfit_reason(self, fact: Fact) -> str | None:
        """Why ``fact`` cannot be trained on ("answer_too_long", "sequence_too_long" under some
        template for one of its training questions), or None if it fits."""
        if len(fact.answer.split()) > self.max_answer_words:
            return "answer_too_long"
        for question in fact.training_questions():
            variant = Fact(fact.id, question, fact.answer, fact.aliases)
            if any(len(self.encode(variant, name).input_ids) > self.max_seq_len for name in self.templates):
                return "sequence_too_long"
        return None
