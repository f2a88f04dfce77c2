"""Study material for a documents stream (``data.augment``; data/augment.py writes the prompts
and filters): the generator writes it per passage (greedy, batched, cached), the kept items
become training sequences beside (or instead of) the passage's own chunks.

Every sequence made from a passage carries the passage's id as fact_id, so with
``method.select_per=fact`` a passage's chunks, questions and restatements share its slots.
The generator is the model being trained (``generator: null``, its base weights, before any
retrofit) or a model of its own, loaded as models/loading.py loads a base model and dropped
once the material is written (a model on the CPU is moved to the GPU, when there is one, for
the generation only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from smf_lightning.data.augment import QA_KINDS, AugmentSpec, StudyItem, evaluation_questions, generate_material, study_items
from smf_lightning.data.augment import augment_cache_file
from smf_lightning.data.documents import Passage, passage_examples
from smf_lightning.data.facts import Fact, TrainingExample
from smf_lightning.eval import scoring
from smf_lightning.streams.encoding import FactEncoder
from smf_lightning.streams.probing import Prober

log = logging.getLogger(__name__)
_SHOWN_PASSAGES = 20  # passages without material named in the log; the rest only counted


class Augmenter:
    """The study material of a stream's passages (``spec``), for the run's tokenizer, training
    templates and limits (``encoder``); ``prober`` holds the base model (the default generator)."""

    def __init__(self, spec: AugmentSpec, prober: Prober, encoder: FactEncoder, *, train_templates: Sequence[str],
                 max_seq_len: int, chunk_overlap: int, generation_batch_size: int, cache_dir: str | None = None):
        self.spec = spec
        self.prober = prober
        self.encoder = encoder
        self.train_templates = tuple(train_templates)
        self.max_seq_len, self.chunk_overlap = max_seq_len, chunk_overlap
        self.generation_batch_size = generation_batch_size
        self.cache_dir = cache_dir

    def cache_path(self) -> Path:
        from smf_lightning.assets import cache_root

        return Path(self.cache_dir).expanduser() if self.cache_dir else cache_root() / "augment"

    # ------------------------------------------------------------------ generation

    def augment(self, passages: Sequence[Passage], evaluation: Sequence[str]) -> tuple[dict[str, list[StudyItem]], dict]:
        """(passage id -> its items, kept and dropped, info): the material of every kind of the spec
        for ``passages``; ``evaluation`` are the questions no item may state (data/augment.py)."""
        spec = self.spec
        texts = list(dict.fromkeys(p.text for p in passages))
        raw: dict[str, dict[str, str]] = {}
        info: dict = {"kinds": list(spec.kinds), "include_passage": spec.include_passage,
                      "generator": spec.generator or "the model being trained", "per_passage":
                      {k: spec.per_passage[k] for k in spec.kinds}, "max_new_tokens": spec.max_new_tokens}
        if spec.generated_kinds():
            with self._generator() as (model, tokenizer, fingerprint):
                info["generator_fingerprint"] = fingerprint
                info["cache_files"] = {}
                for kind in spec.generated_kinds():
                    cache_file = augment_cache_file(self.cache_path(), fingerprint, kind, spec.prompt(kind),
                                                    spec.max_new_tokens)
                    raw[kind] = generate_material(model, tokenizer, texts, spec.prompt(kind), spec.max_new_tokens,
                                                  self.generation_batch_size, cache_file, generate=_generate, label=kind)
                    info["cache_files"][kind] = str(cache_file)
        forbidden = evaluation_questions(evaluation)
        items = {p.id: study_items(p.id, p.text, spec, {k: raw[k][p.text] for k in raw}, evaluation=forbidden,
                                   unfit=lambda q, a, pid=p.id: self.encoder.unfit_reason(Fact(pid, q, a, (a,))),
                                   max_answer_words=self.encoder.max_answer_words)
                 for p in passages}
        info.update(_counts(spec, items))
        self._log(info, items)
        return items, info

    @contextlib.contextmanager
    def _generator(self):
        """(model, tokenizer, fingerprint) of the generator, on the GPU when there is one."""
        import torch

        from smf_lightning.eval.probe import model_fingerprint

        if self.spec.generator is None:
            model, tokenizer, fingerprint = self.prober.model, self.prober.tokenizer, self.prober.fingerprint()
        else:
            from smf_lightning.models.loading import load_base_model

            log.info("loading the augmentation generator %s", self.spec.generator)
            loaded = load_base_model(self.spec.generator, source="auto", dtype=self.spec.generator_dtype)
            model, tokenizer = loaded.model, loaded.tokenizer
            fingerprint = model_fingerprint(model)
        device = next(model.parameters()).device if model is not None else None
        move = device is not None and device.type == "cpu" and torch.cuda.is_available()
        try:
            if move:
                model.to("cuda")
            yield model, tokenizer, fingerprint
        finally:
            if move:
                model.to(device)
            if self.spec.generator is not None:
                del model
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def _log(self, info: dict, items: Mapping[str, list[StudyItem]]) -> None:
        for kind, c in info["per_kind"].items():
            log.info("Augmented (%s): %d generated, %d kept, dropped %s", kind, c["generated"], c["kept"], c["dropped"])
        bare = info["passages_without_material_ids"]
        if bare:
            log.warning("Augmented: %d of %d passages kept no study material (trained on %s): %s%s", len(bare),
                        len(items), "their own text only" if self.spec.include_passage else "nothing",
                        ", ".join(bare[:_SHOWN_PASSAGES]), " ..." if len(bare) > _SHOWN_PASSAGES else "")
        example = next((it for its in items.values() for it in its if it.kept and it.kind == "qa"), None)
        if example is not None:
            log.info("Augmented example (%s): %r -> %r", example.passage_id, example.question, example.answer)

    # ------------------------------------------------------------------ training sequences

    def passage_sequences(self, passage: Passage, items: Sequence[StudyItem]) -> list[TrainingExample]:
        """The passage's training sequences: its chunks (include_passage), each kept question under
        every training template (the loss of data.augment.qa_loss_on), its kept restatements joined
        and chunked as a passage is; all with fact_id = the passage id."""
        out = (passage_examples(self.encoder.tokenizer, passage, self.max_seq_len, self.chunk_overlap)
               if self.spec.include_passage else [])
        kept = [it for it in items if it.kept]
        for it in kept:
            if it.kind in QA_KINDS:
                out += [dataclasses.replace(self.encoder.encode(Fact(passage.id, it.question, it.answer, (it.answer,)),
                                                                name, self.spec.qa_loss_on), template=f"{it.kind}:{name}")
                        for name in self.train_templates]
        restated = " ".join(it.text for it in kept if it.kind == "paraphrase")
        if restated:
            chunks = passage_examples(self.encoder.tokenizer, Passage(passage.id, restated, ()), self.max_seq_len,
                                      self.chunk_overlap)
            out += [dataclasses.replace(c, template=f"paraphrase:{c.template}") for c in chunks]
        return out


def write_augmented(out_dir: str | Path, task_passages: Sequence[Sequence[Passage]],
                    items: Mapping[str, Sequence[StudyItem]]) -> list[Path]:
    """``out_dir``/augmented/task_<k>.jsonl: every item of task k's passages, kept or dropped and why."""
    folder = Path(out_dir) / "augmented"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, passages in enumerate(task_passages):
        path = folder / f"task_{k}.jsonl"
        path.write_text("".join(json.dumps(it.record()) + "\n" for p in passages for it in items.get(p.id, ())))
        paths.append(path)
    return paths


def _generate(model, tokenizer, prompts, max_new_tokens, batch_size):
    # several lines per continuation (pairs, restatements): no stop at the first newline
    return scoring.generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size, stop_at_newline=False)


def _counts(spec: AugmentSpec, items: Mapping[str, list[StudyItem]]) -> dict:
    """summary.json's data.documents.augmented counts: generated, kept, dropped by reason, per kind."""
    per_kind = {}
    for kind in spec.kinds:
        of_kind = [it for its in items.values() for it in its if it.kind == kind]
        dropped = Counter(it.reason for it in of_kind if not it.kept)
        per_kind[kind] = {"generated": len(of_kind), "kept": sum(it.kept for it in of_kind),
                          "dropped": dict(sorted(dropped.items()))}
    dropped_all = Counter()
    for c in per_kind.values():
        dropped_all.update(c["dropped"])
    bare = [pid for pid, its in items.items() if not any(it.kept for it in its)]
    return {"generated": sum(c["generated"] for c in per_kind.values()), "kept": sum(c["kept"] for c in per_kind.values()),
            "dropped": dict(sorted(dropped_all.items())), "per_kind": per_kind,
            "passages_without_material": len(bare), "passages_without_material_ids": bare}
