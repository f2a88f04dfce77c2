"""Answer questions with an updated model, as the evaluation asks them, and say which taught
facts an answer read.

Prompts are the run's templates (data/facts.py ``FactTemplate.prompt``, the first training
template by default, as fact recall and the rephrased questions are asked) and answers are
eval/scoring.py's greedy decoding (first line, special tokens dropped): the same code, so an
answer equals the evaluation's prediction for the same prompt.

``Explainer``: at every position of the prompt every memory layer reads ``heads x knn`` rows
with softmax weights, each head's summing to 1 (memory/layer.py; a read-gated read of a written
row counts 0 when the gate closes). A taught fact's share is the read weight on the rows the
ledger says it owns, over the total read weight of the positions looked at (every head of every
memory layer); a row two facts share counts for both. ``positions="prompt"`` (the default) looks
at every position of the prompt: a fact trained under several wordings is carried mostly by the
question's own tokens, whose outputs the answer attends to, not by the answer position
(experiments/rephrase/REPHRASE.md, "Why a rewording is not recalled"); ``positions="answer"``
looks at the prompt's last token only (whose output predicts the answer's first token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from ..data.facts import FactTemplate, make_templates, split_templates
from ..errors import ConfigError
from ..eval.scoring import generate_greedy
from ..memory import memory_layers
from ..memory.ledger import FactLedger


@dataclass(frozen=True)
class AskSettings:
    """What the run's config says about asking: its templates, the training ones in order, the
    greedy tokens and batch size of fact recall."""

    templates: dict[str, FactTemplate]
    train_templates: tuple[str, ...]
    max_new_tokens: int
    batch_size: int

    @classmethod
    def from_config(cls, cfg: DictConfig) -> AskSettings:
        d = cfg.data
        # null drops an inherited template (as the data module reads them)
        templates = make_templates({n: t for n, t in d.templates.items() if t is not None})
        train, _ = split_templates(templates, list(d.heldout_templates))
        return cls(templates, train, int(d.recall_max_new_tokens), int(d.generation_batch_size))

    def template(self, name: str | None) -> FactTemplate:
        name = name or self.train_templates[0]
        if name not in self.templates:
            raise ConfigError(f"unknown template {name!r}; the run's templates: {', '.join(self.templates)}.")
        return self.templates[name]


def answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers to ``prompts`` (the evaluation's decoding: the first line)."""
    return generate_greedy(model, tokenizer, list(prompts), max_new_tokens, batch_size) if prompts else []


@dataclass
class Reading:
    fact: str
    share: float  # of the answer position's total read weight


EXPLAIN_POSITIONS = ("prompt", "answer")


class Explainer:
    """Which taught facts' rows a prompt reads, at every position or at the answer position (module doc)."""

    def __init__(self, model, tokenizer, ledger: FactLedger, positions: str = "prompt"):
        if positions not in EXPLAIN_POSITIONS:
            raise ConfigError(f"explain positions {positions!r}: use one of {', '.join(EXPLAIN_POSITIONS)}.")
        self.model, self.tokenizer, self.ledger = model, tokenizer, ledger
        self.positions = positions
        self.memories = memory_layers(model)
        self.owners = {i: ledger.owners(i) for i in self.memories}

    @torch.no_grad()
    def __call__(self, prompt: str, top: int = 5) -> list[Reading]:
        device = next(self.model.parameters()).device
        ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=True)
        self.model(input_ids=ids["input_ids"].to(device), attention_mask=ids["attention_mask"].to(device),
                   logits_to_keep=1)
        weight: dict[str, float] = {}
        total = 0.0
        for i, mem in self.memories.items():
            acc = mem.last_access
            at = slice(None) if self.positions == "prompt" else slice(-1, None)
            looked, weights = acc.indices[0, at], acc.weights[0, at]  # [positions, heads, knn]
            total += mem.heads * looked.shape[0]  # each head's softmax sums to 1 at each position
            owners = self.owners[i]
            for row, w in zip(looked.reshape(-1).tolist(), weights.reshape(-1).tolist()):
                for f in owners.get(row, ()):
                    weight[f] = weight.get(f, 0.0) + w
        ranked = sorted(((w / total, f) for f, w in weight.items() if w > 0), key=lambda x: (-x[0], x[1]))
        return [Reading(f, share) for share, f in ranked[:top]]
