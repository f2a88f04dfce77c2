"""Context prefixes (data.prefixes; docs/design.md "Context prefixes"): each fact also trained after
runs of words cut from the background's passages, as WISE's random prefixes."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from smf_lightning.data.facts import Fact, TrainingExample
from smf_lightning.streams.encoding import FactEncoder

PREFIX_WORDS = (8, 24)  # data.prefix_words when a config leaves it out (conf/data/facts_triviaqa.yaml)


def prefixed_examples(facts: Sequence[Fact], *, k: int, words: tuple[int, int], passages: Sequence,
                      questions: Callable[[Fact], Sequence[str]], templates: Sequence[str], encoder: FactEncoder,
                      seed: int) -> list[TrainingExample]:
    """k more sequences per fact, each one of its ``questions(fact)`` (in turn) under one of the
    training ``templates`` (in turn) after a context prefix: a run of ``words`` = (lo, hi)
    consecutive words (their number drawn from lo..hi) of one of the background ``passages``,
    chosen by ``seed`` and the fact's id (the same on every pass, so a batch comes again as it
    was). The prefix is read through but is never a target and never selects or keys the fact's
    slots (facts.TrainingExample.prefix_len); the question's own positions then read in other
    contexts. A sequence that does not fit max_seq_len even with a one-word prefix is left out."""
    out = []
    for fact in facts:
        asked = questions(fact)
        for j in range(k):
            rng = random.Random(f"{seed}:{fact.id}:prefix{j}")
            text = rng.choice(passages).text.split()
            n = min(rng.randint(*words), len(text))
            start = rng.randrange(len(text) - n + 1)
            variant = Fact(fact.id, asked[j % len(asked)], fact.answer, fact.aliases)
            ex = encoder.prefixed(variant, templates[j % len(templates)], text[start:start + n])
            if ex is not None:
                out.append(ex)
    return out
