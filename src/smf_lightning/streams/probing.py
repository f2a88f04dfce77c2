"""The probe of the base model as the stream builders ask it: which of these facts does the
model already answer, under the probe prompt or under every training template.

eval/probe.py runs the greedy probe and caches its records; this keys the cache by the model's
fingerprint, the prompt and the dataset, so a second run with the same model reads the records
instead of generating (and needs no model at all when ``model_fingerprint`` is given).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from smf_lightning.data.facts import FactTemplate
from smf_lightning.data.sources import QAItem
from smf_lightning.eval.probe import default_cache_dir, model_fingerprint, probe_cache_file, probe_model


class Prober:
    """The base model (``model``, may be None with a cached probe), its tokenizer and the probe's
    settings (data.probe_prompt, probe_max_new_tokens, probe_batch_size, cache_dir)."""

    def __init__(self, model, tokenizer, *, prompt: str, max_new_tokens: int, batch_size: int,
                 cache_dir: str | None = None, fingerprint: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.model_fingerprint = fingerprint  # given, or computed on first use

    def fingerprint(self) -> str:
        if self.model_fingerprint is not None:
            return self.model_fingerprint
        if self.model is None:
            raise ValueError(
                "facts=triviaqa and the triviaqa_known suite need the base model to probe what it knows: pass "
                "probe_model=<base model> (or model_fingerprint=<fingerprint of a cached probe>)."
            )
        self.model_fingerprint = model_fingerprint(self.model)
        return self.model_fingerprint

    def probe(self, items: Sequence[QAItem], prompt: str | None = None, dataset: str = "triviaqa"):
        """(item id -> probe record, cache file) of ``items`` under ``prompt`` (default: the probe prompt)."""
        prompt = self.prompt if prompt is None else prompt
        fingerprint = self.fingerprint()
        cache_dir = self.cache_dir or default_cache_dir()
        cache_file = probe_cache_file(cache_dir, fingerprint, prompt, self.max_new_tokens, dataset)
        if self.model is None and not cache_file.exists():
            raise ValueError(
                f"No cached probe at {cache_file} for model_fingerprint={fingerprint[:16]}...; pass probe_model=<base model>."
            )
        records = probe_model(
            self.model, self.tokenizer, items, prompt=prompt, max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size, cache_file=cache_file, fingerprint=fingerprint,
        )
        return records, cache_file

    def unknown_under_templates(self, candidates: Sequence[QAItem], needed: int, templates: Mapping[str, FactTemplate],
                                dataset: str = "triviaqa") -> tuple[list[QAItem], int]:
        """(kept, checked): ``candidates`` in order, probed in chunks under every template, the ones
        no template elicits kept, until ``needed`` are kept or the candidates run out."""
        kept, checked = [], 0
        while len(kept) < needed and checked < len(candidates):
            chunk = candidates[checked: checked + (needed - len(kept)) * 5 // 4 + 4]
            checked += len(chunk)
            known = set()
            for template in templates.values():
                recs, _ = self.probe(chunk, template.prompt("{question}"), dataset)
                known |= {i for i, r in recs.items() if r.known}
            kept += [it for it in chunk if it.id not in known]
        return kept, checked
