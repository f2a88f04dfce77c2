"""Model-written rewordings of questions (data/rewording.py generates and filters them):

- of the stream's facts, as extra *training* questions (data.rewordings styles per question);
- of background questions, grouped with their question, as the corpus of the within-question
  covariance of ``model.memory.within_groups=rewordings`` (memory/whitening.py).

The base model writes them (greedy, cached per model fingerprint and generation settings).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from smf_lightning.data.facts import Fact
from smf_lightning.data.rewording import generate_rewordings, keep_rewordings, reword_cache_file
from smf_lightning.eval import scoring
from smf_lightning.eval.probe import default_cache_dir
from smf_lightning.streams.background import collate_groups
from smf_lightning.streams.encoding import FactEncoder
from smf_lightning.streams.probing import Prober

log = logging.getLogger(__name__)


class Rewriter:
    """Rewordings by the probed base model (``prober.model``) that fit the run (``encoder``:
    the same limits as a stream fact's questions)."""

    def __init__(self, prober: Prober, encoder: FactEncoder, *, max_new_tokens: int, generation_batch_size: int,
                 cache_dir: str | None = None):
        self.prober = prober
        self.encoder = encoder
        self.max_new_tokens = max_new_tokens
        self.generation_batch_size = generation_batch_size
        self.cache_dir = cache_dir

    def cache_file(self) -> Path:
        """Names the generator and prompts of the rewordings (keys caches built from them)."""
        return reword_cache_file(self.cache_dir or default_cache_dir().parent / "rewordings",
                                 self.prober.fingerprint(), self.max_new_tokens)

    def kept(self, facts: Sequence[Fact], n_styles: int) -> tuple[dict[str, tuple[str, ...]], Counter]:
        """(fact id -> its usable rewordings, counts by reason): each question rewritten in the first
        ``n_styles`` prompt styles by the generator (cached), then filtered (data/rewording.py)."""
        raw = generate_rewordings(self.prober.model, self.encoder.tokenizer, [f.question for f in facts], n_styles,
                                  self.max_new_tokens, self.generation_batch_size, self.cache_file(),
                                  generate=scoring.generate_greedy)  # looked up per call
        counts: Counter = Counter()
        kept = {}
        for f in facts:
            fits = lambda q, f=f: self.encoder.unfit_reason(Fact(f.id, q, f.answer, f.aliases)) is None  # noqa: E731
            kept[f.id] = keep_rewordings(f, raw[f.question], fits, counts)
        return kept, counts

    def stream_rewordings(self, tasks: Sequence[Sequence[Fact]], n_styles: int) -> tuple[dict[str, tuple[str, ...]], dict]:
        """(fact id -> its training rewordings, info["rewordings"]) of every stream fact's question."""
        facts = [f for task in tasks for f in task]
        reworded, counts = self.kept(facts, n_styles)
        info = {"per_question": n_styles, "cache_file": str(self.cache_file()), **dict(sorted(counts.items()))}
        log.info("Rewordings: %d kept of %d generated (%s)", counts["kept"], counts["generated"],
                 {k: v for k, v in counts.items() if k.startswith("dropped")})
        example = next((f for f in facts if reworded[f.id]), None)
        if example is not None:
            log.info("Rewording example: %r -> %r", example.question, list(reworded[example.id]))
        return reworded, info

    def group_batches(self, facts: Sequence[Fact], n_styles: int, template: str, questions_per_batch: int,
                      pad_id: int) -> list[dict]:
        """``facts`` (background questions), each with its kept rewordings, under ``template``,
        collated with ``groups`` (the question's index per row); questions left with no
        rewording are skipped."""
        kept, counts = self.kept(facts, n_styles)
        groups = [[Fact(f.id, q, f.answer, f.aliases) for q in (f.question, *kept[f.id])] for f in facts if kept[f.id]]
        if len(groups) < 2:
            raise ValueError(f"model.memory.within_groups=rewordings: only {len(groups)} of {len(facts)} background "
                             "questions kept a rewording; raise data.background.triviaqa or within_questions.")
        log.info("Rewording groups for whitening: %d questions, %d rewordings kept of %d generated",
                 len(groups), counts["kept"], counts["generated"])
        encoded = [[self.encoder.encode(f, template) for f in group] for group in groups]
        return collate_groups(encoded, questions_per_batch, pad_id)
