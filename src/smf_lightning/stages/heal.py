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
   (heal_corpus.py: training and held-out passages never overlap, and the items the held-out
   capability suites use are never trained on), measure the unmodified base model's held-out
   perplexity once, retrofit, optionally k-means the keys on the training text
   (models/build.py, memory/key_init.py);
2. run (heal_training.py): dense AdamW over all memory parameters, everything else frozen,
   held-out perplexity every ``eval_every`` steps; stop at the target ratio to the base
   perplexity or at the step budget;
3. save: the healed model with ``save_retrofitted`` (loadable via ``model.init_checkpoint``),
   ``heal_summary.json``, and ``heal_metrics.csv`` and ``heal_ppl.png`` (heal_outputs.py) in
   the run directory.

The stage runs its own loop, not a Lightning Trainer: it reads ``trainer.threads`` and
``trainer.enable_progress_bar`` only, and no logger or callback.
"""

from __future__ import annotations

import json
import logging

from ..config import ConfigError
from ..memory import memory_layers, param_counts, save_retrofitted
from ..models.build import init_keys, load_model, maybe_retrofit
from . import start_run
from .heal_corpus import HEAL_SOURCES, build_healing_corpus, make_batches, training_batches
from .heal_outputs import plot_healing, write_metrics_csv
from .heal_training import MEMORY_PARAM_KINDS, heal_memory, memory_parameters, perplexity

log = logging.getLogger("smf_lightning")

SUMMARY_FILE = "heal_summary.json"
CHECKPOINT_DIR = "healed"


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
