"""The run's model, built from ``cfg.model`` and ``cfg.method``: the one place both stages
(stages/continual.py, stages/heal.py) and the experiment scripts get it from.

In the order a stage calls them:
1. :func:`load_model` — the starting model: a healed/retrofitted checkpoint or a full export
   (``model.init_checkpoint``; an export's fact ledger comes with it), the tiny test model
   (``model.source=tiny``), or a pretrained base model (models/loading.py: hub, local
   directory, GGUF, offline catalogue);
2. :func:`maybe_retrofit` — memory layers added when the method trains them
   (``method.retrofit``; memory/retrofit.py), unless the model has them already;
3. :func:`prepare_memory` — the memory's data-fitted parts on the background corpus:
   input whitening (``model.memory.input_norm``; memory/whitening.py) and k-means keys
   (``model.memory.key_init=kmeans``; memory/key_init.py). An init checkpoint carries both;
4. :func:`background_stats` — SMF's background slot statistics, what the TF-IDF / KL
   selectors compare a batch against (selection/background.py).

Whitening and background statistics are cached under ``$SMF_CACHE`` keyed by the model, the
corpus and the batching, so a sweep computes them once.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def load_model(cfg: DictConfig):
    """(model, tokenizer, info) for cfg.model: the run's starting model, not yet retrofitted."""
    import torch

    from ..memory import load_retrofitted

    mcfg = cfg.model
    dtype = getattr(torch, mcfg.dtype)
    if mcfg.get("init_checkpoint"):
        from transformers import AutoTokenizer

        from ..errors import ConfigError
        from ..memory.ledger import FactLedger

        path = Path(mcfg.init_checkpoint)
        try:
            model = load_retrofitted(path, dtype=dtype)
        except FileNotFoundError as e:
            raise ConfigError(f"bad config: model.init_checkpoint={str(path)!r}: {e} A delta export holds only what its "
                              "run changed: continue from a full export (python -m smf_lightning.export RUN OUT).") from None
        tokenizer = AutoTokenizer.from_pretrained(path)
        info = dict(model.retrofit_meta.get("base", {}), init_checkpoint=str(path))
        # an export's fact ledger (memory/ledger.py): a continued run keeps its facts and never
        # overwrites their rows (methods/smf.py)
        ledger = FactLedger.read(path)
        if ledger is not None:
            model.fact_ledger = ledger
    elif mcfg.source == "tiny":
        from .tiny import tiny_qwen2, tiny_tokenizer

        model, tokenizer = tiny_qwen2(seed=int(cfg.seed)), tiny_tokenizer()
        info = {"name": "tiny", "source": "tiny", "note": "randomly initialised test model"}
    else:
        from .loading import load_base_model

        loaded = load_base_model(mcfg.name, source=mcfg.source, dtype=mcfg.dtype)
        model, tokenizer, info = loaded.model, loaded.tokenizer, dict(loaded.info)
    return model, tokenizer, info


def maybe_retrofit(cfg: DictConfig, model, info: dict):
    """Add memory layers when the method needs them (and the model has none yet); records the
    parameter counts and the memory config in ``info``."""
    from ..memory import MemoryConfig, memory_layers, param_counts, retrofit

    if cfg.method.get("retrofit") and not memory_layers(model):
        retrofit(model, MemoryConfig(**OmegaConf.to_container(cfg.model.memory, resolve=True)))
    info["param_counts"] = param_counts(model)
    if memory_layers(model):
        info["memory"] = model.memory_config.to_dict()
    return model


def fits_memory(cfg: DictConfig) -> bool:
    """Whether the run fits the memory's data-dependent parts itself: a fresh retrofit does;
    an init checkpoint carries its whitening and keys."""
    return bool(cfg.method.get("retrofit")) and not cfg.model.get("init_checkpoint")


def input_whitening(cfg: DictConfig, model, dm) -> dict:
    """Fit (or load from $SMF_CACHE/whitening) the memory input statistics on the background corpus."""
    from ..memory.whitening import load_or_fit_input_whitening

    key = {"corpus": dm.background_key(), "batch_size": dm.background_batch_size, "data_source": dm.source}
    batches = lambda: dm.background_batches(sort_by_length=True)  # noqa: E731
    if cfg.model.memory.get("input_norm") == "zca_within":
        n = int(cfg.model.memory.get("within_questions", 400))
        if cfg.model.memory.get("within_groups", "templates") == "rewordings":
            # one question and its model-written rewordings per group (data/rewording.py)
            groups = dm.rewording_group_batches(n)
            # the groups' token ids themselves: the kept rewordings depend on the styles, filters and generator
            key["rewording_groups"] = {"questions": n, "generator": dm.rewording_cache_name(),
                                       "content": batches_digest(groups)}
            batches = lambda: groups  # noqa: E731
        else:
            # one question under every training template per group: the within-question covariance
            key["template_groups"] = n
            batches = lambda: dm.template_group_batches(n)  # noqa: E731
    return load_or_fit_input_whitening(
        model, batches, Path(cfg.paths.cache_dir) / "whitening", key,
        loss_tokens_only=cfg.model.memory.get("whiten_on", "all") == "loss",
        progress=bool(cfg.trainer.enable_progress_bar),
    )


def batches_digest(batches: list[dict]) -> str:
    """A digest of collated batches' token ids, attention masks and groups (what a fit reads)."""
    import hashlib

    from ..memory.fingerprint import tensor_digest

    h = hashlib.blake2b(digest_size=12)
    for batch in batches:
        for name in ("input_ids", "attention_mask", "groups"):
            if name in batch:
                h.update(name.encode())
                tensor_digest(h, batch[name])
    return h.hexdigest()


def init_keys(cfg: DictConfig, model, batches) -> dict | None:
    """k-means sub-keys on ``batches`` when ``model.memory.key_init=kmeans`` (and the run fits
    the memory); the per-layer report, or None when the keys stay as they are."""
    if not fits_memory(cfg) or cfg.model.memory.get("key_init", "random") != "kmeans":
        return None
    from ..memory.key_init import init_keys_kmeans

    return init_keys_kmeans(model, batches, seed=int(cfg.model.memory.seed), progress=bool(cfg.trainer.enable_progress_bar))


def prepare_memory(cfg: DictConfig, model, info: dict, dm) -> None:
    """The continual stage's memory fitting on the background corpus of ``dm``: input
    whitening, then k-means keys (addressing reads the whitened input). Reports go into ``info``."""
    if not fits_memory(cfg):
        return
    if cfg.model.memory.get("input_norm", "none") != "none":
        info["input_whitening"] = input_whitening(cfg, model, dm)
    if cfg.model.memory.get("key_init", "random") == "kmeans":
        info["key_init"] = init_keys(cfg, model, dm.background_batches())


def background_stats(cfg: DictConfig, model, dm) -> dict:
    """Per-layer background slot statistics (docs/design.md §3), cached under $SMF_CACHE/background."""
    from ..methods import method_config
    from ..selection.background import load_or_compute_background_stats

    key = {"corpus": dm.background_key(), "batch_size": dm.background_batch_size, "data_source": dm.source,
           "batching": "length-sorted"}
    return load_or_compute_background_stats(
        model,
        lambda: dm.background_batches(sort_by_length=True),
        Path(cfg.paths.cache_dir) / "background",
        key,
        loss_tokens_only=getattr(method_config(cfg.method), "loss_tokens_only", True),
        progress=bool(cfg.trainer.enable_progress_bar),
    )


def skip_frequent_tokens(cfg: DictConfig, module, model, dm) -> None:
    """``method.skip_frequent_tokens = s > 0`` (SMF): the background corpus's most frequent tokens,
    a share s of its token occurrences, neither count for slot selection nor write read-gate keys
    (selection/frequent.py). Counted on the background batches, never on evaluation items."""
    share = float(cfg.method.get("skip_frequent_tokens", 0.0) or 0.0)
    if share <= 0 or not hasattr(module, "set_skipped_tokens"):
        return
    if dm is None:
        raise ValueError("method.skip_frequent_tokens counts the background's tokens: build the method with the "
                         "stream's data module (stages/continual.py build_method(..., dm=...)).")
    import logging

    import torch

    from ..selection.frequent import frequent_tokens, token_counts

    log = logging.getLogger(__name__)
    counts = token_counts(dm.background_batches(), model.get_input_embeddings().num_embeddings)
    mask = frequent_tokens(counts, share)
    module.set_skipped_tokens(mask)
    top = torch.nonzero(mask).squeeze(1)[torch.argsort(counts[mask], descending=True, stable=True)][:12]
    log.info("method.skip_frequent_tokens=%s: %d tokens (%.0f%% of the background's %d) do not write, e.g. %s",
             share, int(mask.sum()), 100.0 * float(counts[mask].sum()) / max(int(counts.sum()), 1), int(counts.sum()),
             [dm.tokenizer.decode([int(t)]) for t in top])
