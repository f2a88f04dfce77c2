"""The checks FactStreamDataModule makes of its options (the keys of conf/data/*.yaml) when it is
constructed, before anything is read: a direct construction (tests, experiment scripts) learns
what is wrong and what to do instead. A run's composed config is checked the same way before
its model loads (config.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from smf_lightning.data.augment import AugmentSpec
from smf_lightning.data.documents import PASSAGE_SPLITS
from smf_lightning.data.facts import LOSS_ON, check_stream_size
from smf_lightning.data.rewording import STYLES as REWORDING_STYLES
from smf_lightning.eval.custom_suites import check_suite_config
from smf_lightning.streams.background import BACKGROUND_SOURCES
from smf_lightning.streams.known import KNOWN_SUITE
from smf_lightning.streams.prefixes import PREFIX_WORDS
from smf_lightning.streams.schedule import SCHEDULES
from smf_lightning.streams.stream import FACT_SOURCES


def check_options(*, facts: str, n_tasks: int, facts_per_task: int, passages_per_task: int | None,
                  chunk_overlap: int, max_seq_len: int, loss_on: str, suites: Mapping[str, Mapping],
                  background: Mapping[str, int], counts: Mapping[str, int], schedule: str,
                  rephrased_max_new_tokens: int, rewordings: int, path: str | None, known_items: int,
                  probe: bool, passage_split: str | None = None, augment: Mapping | None = None,
                  prefixes: int = 0, prefix_words: Sequence[int] = PREFIX_WORDS) -> None:
    """Raise ValueError on the first bad option; ``counts`` are the sizes that must be >= 1
    (batch sizes, max_seq_len, epochs_per_task), by option name."""
    if facts not in FACT_SOURCES:
        raise ValueError(f"Unknown fact source {facts!r}. Allowed: {', '.join(FACT_SOURCES)}.")
    if facts == "documents":
        if passages_per_task is None or facts_per_task != passages_per_task:
            raise ValueError(f"facts=documents counts passages: set passages_per_task (got {passages_per_task}), "
                             f"and facts_per_task to the same number (got {facts_per_task}).")
        if not 0 <= chunk_overlap < max_seq_len:
            raise ValueError(f"chunk_overlap must be in [0, max_seq_len={max_seq_len}), got {chunk_overlap}")
        if passage_split not in (None, *PASSAGE_SPLITS):
            raise ValueError(f"passage_split must be null, {' or '.join(PASSAGE_SPLITS)}; got {passage_split!r}")
    elif AugmentSpec.from_mapping(augment).enabled or passage_split is not None:
        raise ValueError(f"augment and passage_split apply to facts=documents only (facts={facts!r}).")
    check_stream_size(n_tasks, facts_per_task)
    if loss_on not in LOSS_ON:
        raise ValueError(f"Unknown loss_on {loss_on!r}; use one of: {', '.join(LOSS_ON)}.")
    for name, opts in suites.items():
        check_suite_config(name, opts)  # the keys only; a suite's own data is read when it is built
    for name in background:
        if name not in BACKGROUND_SOURCES:
            raise ValueError(f"Unknown background source {name!r}. Allowed: {', '.join(BACKGROUND_SOURCES)}.")
    for key, value in counts.items():
        if value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown schedule {schedule!r}; use one of: {', '.join(SCHEDULES)}.")
    if rephrased_max_new_tokens < 1:
        raise ValueError(f"rephrased_max_new_tokens must be >= 1, got {rephrased_max_new_tokens}")
    if not 0 <= rewordings <= len(REWORDING_STYLES):
        raise ValueError(f"rewordings must be in [0, {len(REWORDING_STYLES)}] (one per prompt style of "
                         f"data/rewording.py), got {rewordings}")
    check_prefixes(prefixes, prefix_words, background, facts)
    if facts == "file" and not path:
        raise ValueError("facts=file reads the facts from `path` (data.path=FILE); it is not set.")
    if known_items and not probe:
        raise ValueError("known_items > 0 needs probe=true: the known-facts suite is what the probe finds the model answers.")
    if known_items and KNOWN_SUITE in suites:
        raise ValueError(f"known_items > 0 and the {KNOWN_SUITE} suite: one known-facts suite per run; drop one.")


def check_prefixes(prefixes, prefix_words, background: Mapping[str, int], facts: str) -> None:
    """data.prefixes (context prefixes per fact, an integer >= 0) and data.prefix_words ([lo, hi]
    words, 1 <= lo <= hi): the prefixes are cut from the background's passages, so a run with
    prefixes needs background.lambada > 0; facts=documents has its own study material."""
    if isinstance(prefixes, bool) or not isinstance(prefixes, int) or prefixes < 0:
        raise ValueError(f"prefixes must be an integer >= 0 (context prefixes per fact; 0 = off), got {prefixes!r}")
    words = list(prefix_words) if isinstance(prefix_words, Sequence) and not isinstance(prefix_words, str) else None
    if (words is None or len(words) != 2 or not all(isinstance(w, int) and not isinstance(w, bool) for w in words)
            or not 1 <= words[0] <= words[1]):
        raise ValueError(f"prefix_words must be [lo, hi] with 1 <= lo <= hi (words per prefix), got {prefix_words!r}")
    if prefixes and facts == "documents":
        raise ValueError("prefixes apply to question/answer facts; facts=documents trains passages and their study "
                         "material (data.augment): set prefixes=0.")
    if prefixes and int(background.get("lambada", 0)) <= 0:
        raise ValueError(f"prefixes={prefixes} cuts its prefixes from the background's passages, but background.lambada "
                         "is 0: set background.lambada (e.g. 64) or prefixes=0.")
