"""Validate a composed Hydra config before anything heavy (model, data) is loaded.

Hydra already rejects unknown group options (``method=foo``); this catches bad values
inside groups, each error naming the key, the value and what is allowed.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from .errors import ConfigError  # noqa: F401  (raised here; importers take it from here or errors.py)
from .errors import need as _need

log = logging.getLogger(__name__)
SOURCES = ("auto", "hub", "offline", "tiny")
MEMORY_MODES = ("additive", "replace")
SUITES_AT = ("every_task", "first_last")  # callbacks.suites_at: when the held-out suites run


def validate_config(cfg: DictConfig) -> None:
    from .methods import method_class

    # the method checks its own keys (its typed Config) and what it needs of the rest (check_run_config)
    method = method_class(cfg.method)
    method_cfg = method.Config.from_mapping(cfg.method)
    ignored = sorted(k for k in cfg.method if method.Config.is_other_methods_key(k))
    if ignored:
        log.info("method %r ignores other methods' keys: %s", method_cfg.name, ", ".join(ignored))

    callbacks = cfg.get("callbacks", {})
    suites_at = callbacks.get("suites_at", "every_task")
    _need(suites_at in SUITES_AT, "callbacks.suites_at", suites_at, " | ".join(SUITES_AT))
    prefix = callbacks.get("eval_prefix_cache", True)
    _need(isinstance(prefix, bool), "callbacks.eval_prefix_cache", prefix, "true | false")
    resamples = callbacks.get("intervals", {}).get("resamples", 0)
    _need(isinstance(resamples, int) and not isinstance(resamples, bool) and resamples >= 0,
          "callbacks.intervals.resamples", resamples, "an integer >= 0 (bootstrap resamples; 0 = no intervals)")

    model = cfg.model
    _need(model.source in SOURCES, "model.source", model.source, " | ".join(SOURCES))
    if method.retrofits(method_cfg):
        mem = model.memory
        root = math.isqrt(int(mem.n_slots)) if int(mem.n_slots) > 0 else 0
        _need(root * root == int(mem.n_slots) and root > 0, "model.memory.n_slots", mem.n_slots, "a perfect square, e.g. 16384 (=128^2)")
        _need(1 <= int(mem.knn) <= root, "model.memory.knn", mem.knn, f"1..sqrt(n_slots)={root}")
        _need(mem.mode in MEMORY_MODES, "model.memory.mode", mem.mode, " | ".join(MEMORY_MODES))
        _need(mem.get("key_init", "random") in ("random", "kmeans"), "model.memory.key_init", mem.get("key_init"), "random | kmeans")
        _need(not (mem.get("output") == "direct" and mem.get("v_dim") is not None), "model.memory.v_dim", mem.get("v_dim"),
              "null with model.memory.output=direct (value rows live in the residual stream)")
        # Everything else (output, input_norm, whiten_on, score_scale, layers against the model's
        # depth) is checked by the memory config itself, the same check the retrofit runs.
        from .memory.layer import MemoryConfig

        n_layers = decoder_layer_count(model)  # reads config.json, never weights; refuses an unsupported model
        try:
            MemoryConfig(**OmegaConf.to_container(mem, resolve=True)).validate(n_layers=n_layers)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"bad config: model.{e} Fix it on the command line, e.g. `model.memory.KEY=...`.") from None
    method.check_run_config(cfg, method_cfg)

    _validate_data(cfg.data)
    _validate_trainer(cfg.trainer)
    _validate_debug(cfg.get("debug") or {}, cfg.data)

    d = cfg.data
    for key in ("n_tasks", "facts_per_task", "repeats_per_batch", "train_batch_size", "eval_batch_size"):
        if key in d:
            _need(int(d[key]) >= 1, f"data.{key}", d[key], "an integer >= 1")
    if "rephrased_max_new_tokens" in d:
        _need(int(d.rephrased_max_new_tokens) >= 1, "data.rephrased_max_new_tokens", d.rephrased_max_new_tokens,
              "an integer >= 1")
    if d.get("rewordings") is not None:
        from .data.rewording import STYLES

        _need(0 <= int(d.rewordings) <= len(STYLES), "data.rewordings", d.rewordings,
              f"0 (off) .. {len(STYLES)} (one rewording per prompt style: {', '.join(STYLES)})")
    if "prefixes" in d or "prefix_words" in d:
        from .streams.options import check_prefixes
        from .streams.prefixes import PREFIX_WORDS

        try:
            check_prefixes(d.get("prefixes", 0), list(d.get("prefix_words", PREFIX_WORDS)),
                           dict(d.get("background") or {}), str(d.get("facts", "triviaqa")))
        except ValueError as e:
            raise ConfigError(f"bad config: data.{e}") from None
    if d.get("rephrasings") or d.get("exclude_streams"):
        from .data.rephrasings import builtin_stream_ids, read_rephrasings

        if d.get("rephrasings"):
            read_rephrasings(str(d.rephrasings))  # a missing or malformed file stops here, naming the line
        builtin_stream_ids(list(d.get("exclude_streams") or []))
    if d.get("lead_stream"):
        from .streams.triviaqa_stream import check_lead_stream

        check_lead_stream(OmegaConf.to_container(d.lead_stream, resolve=True), facts=str(d.get("facts", "triviaqa")),
                          pool_size=int(d.probe_pool_size), n_tasks=int(d.n_tasks), facts_per_task=int(d.facts_per_task))
    ckpt = cfg.get("ckpt_path")
    if ckpt and not Path(ckpt).is_file():
        raise ConfigError(
            f"bad config: ckpt_path={ckpt!r} does not exist. Pass the checkpoints/last.ckpt of the "
            f"interrupted run (with the same overrides as that run), or drop ckpt_path to start afresh."
        )
    w = (cfg.get("logger") or {}).get("wandb") or {}  # logger.wandb=null, or a logger group without wandb
    _need(w.get("mode", "offline") in ("offline", "online", "disabled"), "logger.wandb.mode", w.get("mode"),
          "offline | online | disabled")


def decoder_layer_count(model_cfg: DictConfig) -> int | None:
    """The number of decoder layers of the model a config will load, read without loading its
    weights: from the offline catalogue (hub ids with a packaged equivalent share its
    architecture), an init checkpoint's config.json, or the config.json of a local directory or
    of a hub id in the local HF cache (the architecture built on the meta device, so a model the
    retrofit cannot take is refused here). None if unknown (the retrofit checks again once the
    model is loaded). ConfigError for a config.json that cannot be read or an architecture the
    retrofit does not support."""
    from .assets import ASSETS

    if model_cfg.get("init_checkpoint"):  # retrofitted already: its own config.json says how deep
        return _config_json_layers(Path(model_cfg.init_checkpoint), "model.init_checkpoint")
    if model_cfg.source == "tiny":
        from .models.tiny import TINY_LAYERS

        return TINY_LAYERS
    name = str(model_cfg.name)
    by_hub_id = {a.hub_equivalent: a for a in ASSETS.values() if a.hub_equivalent}
    asset = ASSETS.get(name) or by_hub_id.get(name)
    if asset is not None and asset.n_layers:
        return asset.n_layers
    path = Path(name).expanduser()
    if path.is_dir():
        return _architecture_layers(path, name)
    try:  # a hub id whose config is in the local HF cache (no network)
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a valid repo id, or no hub library
        return None
    return _architecture_layers(Path(cached).parent, name) if isinstance(cached, str) else None


def _read_config_json(folder: Path, key: str, value: str) -> dict | None:
    """``folder``/config.json as a dict; None if there is none (the loader says so); ConfigError
    naming ``key`` if it cannot be read or is not a JSON object."""
    import json

    f = folder / "config.json"
    if not f.is_file():
        return None
    try:
        config = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"bad config: {key}={value!r}: {f} cannot be read ({e.__class__.__name__}: {e}); "
                          "a model directory needs the config.json and *.safetensors that save_pretrained "
                          "writes.") from None
    if not isinstance(config, dict):
        raise ConfigError(f"bad config: {key}={value!r}: {f} is not a JSON object, so not a model config.")
    return config


def _config_json_layers(folder: Path, key: str = "model.name") -> int | None:
    config = _read_config_json(folder, key, str(folder))
    n = (config or {}).get("num_hidden_layers")
    return int(n) if n is not None else None


def _architecture_layers(folder: Path, name: str) -> int | None:
    """The decoder-layer count of the causal LM ``folder``/config.json describes, from the same
    layer list the retrofit uses (memory/retrofit.py decoder_layers) on a model built on the meta
    device: no weights are read or allocated."""
    import torch

    from .memory.retrofit import SUPPORTED, decoder_layers

    config = _read_config_json(folder, "model.name", name)
    if config is None:
        return None
    from transformers import AutoConfig, AutoModelForCausalLM

    what = f"{config.get('model_type')!r} ({', '.join(config.get('architectures') or []) or 'no architectures'})"

    def unsupported(e: Exception) -> ConfigError:
        return ConfigError(
            f"bad config: model.name={name!r}: {folder / 'config.json'} describes model_type {what}, which "
            f"transformers cannot build as a causal LM here ({e.__class__.__name__}: {str(e).splitlines()[0]}). "
            f"Supported: {SUPPORTED}."
        )

    try:
        hf_config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:  # unknown model_type, remote code only, bad fields
        raise unsupported(e) from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=False)
    except ValueError as e:  # no causal-LM class for this config (an encoder, a vision model, ...)
        raise unsupported(e) from None
    except Exception as e:  # a constructor that cannot run on the meta device: the retrofit checks after loading
        log.debug("could not build %s on the meta device: %r", name, e)
        n = getattr(hf_config, "num_hidden_layers", None)
        return int(n) if n is not None else None
    try:
        return len(decoder_layers(model))
    except ValueError as e:
        raise ConfigError(f"bad config: model.name={name!r} is unsupported: {e}") from None


def _validate_data(d: DictConfig) -> None:
    """The fact stream's options that need no data or model to check."""
    from .data.facts import LOSS_ON
    from .streams.background import BACKGROUND_SOURCES
    from .streams.stream import FACT_SOURCES

    if "facts" in d:
        _need(d.facts in FACT_SOURCES, "data.facts", d.facts, " | ".join(FACT_SOURCES))
        if d.facts == "file":  # the file is read and checked here, before the model loads
            from .data.fact_file import validate_file_config

            validate_file_config(d)
        if d.facts == "documents":  # a user's passages are read and checked here too
            from .data.documents import validate_documents_config

            validate_documents_config(d)
            from .data.augment import GENERATED_KINDS

            augment = d.get("augment") or {}
            if augment.get("generator") is not None and set(augment.get("kinds") or []) & set(GENERATED_KINDS):
                _locate_generator(str(augment.generator))
    if "schedule" in d:
        from .streams.schedule import SCHEDULES

        _need(d.schedule in SCHEDULES, "data.schedule", d.schedule, " | ".join(SCHEDULES))
    if "epochs_per_task" in d:
        _need(int(d.epochs_per_task) >= 1, "data.epochs_per_task", d.epochs_per_task, "an integer >= 1")
    if "loss_on" in d:
        _need(d.loss_on in LOSS_ON, "data.loss_on", d.loss_on, " | ".join(LOSS_ON))
    if "templates" in d and "heldout_templates" in d:
        names = [name for name, text in d.templates.items() if text is not None]  # null drops a template
        held = d.heldout_templates
        held = list(held) if isinstance(held, ListConfig | list | tuple) else [held]
        unknown = [h for h in held if h not in names]
        _need(not unknown, "data.heldout_templates", held, f"names of data.templates ({', '.join(names)})")
        _need(len(held) >= 1, "data.heldout_templates", held, "at least one template name (never trained on)")
        _need(len(set(names) - set(held)) >= 1, "data.heldout_templates", held,
              "a subset of data.templates that leaves at least one template to train on")
    if d.get("suites"):  # suites of one's own are read and checked here, before the model loads
        from .eval.custom_suites import validate_suites

        validate_suites(OmegaConf.to_container(d.suites, resolve=True))
    for name in d.get("background") or {}:
        _need(name in BACKGROUND_SOURCES, f"data.background.{name}", name, "sources " + " | ".join(BACKGROUND_SOURCES))


def _locate_generator(name: str) -> None:
    """data.augment.generator can be loaded (found without reading its weights)."""
    from .models.loading import ModelLoadError, locate_model

    try:
        locate_model(name)
    except ModelLoadError as e:
        raise ConfigError(f"bad config: data.augment.generator={name!r} cannot be loaded: {e} Use null (the model "
                          "being trained), a local model directory, a hub id or an offline model name.") from None


# Strategies that run SMF data-parallel with one slot selection for all ranks
# (docs/usage.md "Scaling out", selection/distributed.py). ddp_spawn starts its processes itself; ddp re-runs the command line
# in every rank, so it suits a single run (or processes a cluster started, e.g. SLURM tasks).
DATA_PARALLEL = ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")


def _validate_trainer(t: DictConfig) -> None:
    """Several devices need an explicit data-parallel strategy; ``ddp`` cannot run inside a
    Hydra multirun of the basic launcher (Lightning relaunches sys.argv, i.e. the whole sweep)."""
    devices = t.get("devices", 1)
    shown = devices if not isinstance(devices, ListConfig) else list(devices)
    one = devices in (1, "1") or (isinstance(devices, ListConfig | list) and len(devices) == 1)
    if devices == "auto":
        import torch

        one = torch.cuda.device_count() <= 1
    strategy = t.get("strategy")
    strategy = "auto" if strategy is None else strategy
    if not isinstance(strategy, str):  # a strategy object from a _target_ config: the user's choice
        return
    if not one:
        _need(strategy in DATA_PARALLEL, "trainer.devices", shown,
              f"1, or several devices with trainer.strategy={' | '.join(DATA_PARALLEL)} "
              f"(got trainer.strategy={strategy}; ddp_spawn also works inside a sweep)")
    else:
        _need(strategy in ("auto", "single_device"), "trainer.strategy", strategy,
              "auto | single_device with one device (a data-parallel strategy needs trainer.devices > 1)")
    _need(int(t.get("num_nodes", 1)) == 1, "trainer.num_nodes", t.get("num_nodes"), "1")
    if strategy == "ddp" and _in_basic_multirun():
        _need(False, "trainer.strategy", strategy,
              "ddp_spawn inside a --multirun sweep (Lightning's ddp re-runs sys.argv, i.e. the whole sweep, in "
              "every rank), or hydra/launcher=slurm with one job per sweep point (docs/usage.md, section Scaling out)")


def _in_basic_multirun() -> bool:
    """Inside a --multirun whose jobs run in this process (Hydra's basic launcher)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return False
        hc = HydraConfig.get()
        return hc.mode == RunMode.MULTIRUN and "BasicLauncher" in str(hc.launcher.get("_target_", ""))
    except (ImportError, ValueError, AttributeError):
        return False


def _validate_debug(debug, d: DictConfig) -> None:
    from .interrupt import DEBUG_SIGNALS

    stop = debug.get("stop_after_task")
    n_tasks = int(d.get("n_tasks", 1))
    _need(stop is None or (isinstance(stop, int) and 0 <= stop < n_tasks), "debug.stop_after_task", stop,
          f"null or a task index 0..{n_tasks - 1}")
    sig = debug.get("signal")
    _need(sig is None or sig in DEBUG_SIGNALS, "debug.signal", sig, "null | " + " | ".join(DEBUG_SIGNALS))
    if sig is not None:
        at = debug.get("signal_at_step")
        _need(isinstance(at, int) and at >= 1, "debug.signal_at_step", at, "an optimizer step >= 1")
