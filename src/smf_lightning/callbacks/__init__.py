"""Lightning callbacks of a run, built from the ``callbacks`` config group, and the Hydra
callback that summarises a multirun sweep (sweep.py).

The project's own callbacks — where their ideas live:
- evaluation.py (``callbacks.evaluation``): fact recall and held-out suites before training
  and after every task, and every output file of a run (summary.json, accuracy matrices,
  heldout.csv, items/, plots) — docs/design.md §8;
- slot_stats.py (``callbacks.slot_stats``): SMF's per-step slot statistics (slot_stats.csv);
- checkpoint.py (``callbacks.checkpoint``): ``checkpoints/last.ckpt`` after every task (resume);
- lm_eval.py (``callbacks.lm_eval``, optional): lm-evaluation-harness tasks at the first and
  last evaluation points, recorded beside ours (lm_eval.json, summary.json).

Every entry of ``conf/callbacks/`` with a ``_target_`` is a callback that Hydra instantiates,
so a user adds any Lightning callback without code, e.g.
``+callbacks.lr_monitor._target_=lightning.pytorch.callbacks.LearningRateMonitor``, and drops
one with ``callbacks.NAME=null`` or ``callbacks.NAME.enabled=false``. The keys without a
``_target_`` (``suites_at``, ``plots``, ``intervals``, ...) are the settings the entries read.

Order by construction: the evaluation callback comes first and the task checkpoint last,
whatever the order of the entries, so every task's checkpoint holds that task's evaluation
results and every other callback's state at the task's end.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ..config import ConfigError
from ..errors import target_class
from ..interrupt import SelfSignal
from .checkpoint import TaskCheckpoint
from .evaluation import ContinualEvaluation
from .lm_eval import LmEvalHarness, check_lm_eval_config
from .slot_stats import SlotStatsLogger

# keys of conf/callbacks/ that configure the entries instead of being callbacks themselves
SETTINGS = ("suites_at", "plots", "eval_prefix_cache", "cache_before_eval", "intervals")
MEMORY_ONLY = (SlotStatsLogger,)  # they read a memory method's slot selection: left out of other methods' runs


def _is_off(entry) -> bool:
    """null, false, "none" (the old ``callbacks.progress_bar=none``) or ``enabled: false``."""
    if entry is None or entry is False or entry == "none":
        return True
    return OmegaConf.is_dict(entry) and entry.get("enabled", True) is False


def callback_entries(cfg: DictConfig) -> dict[str, DictConfig]:
    """name -> config of every callback the run builds (settings and disabled entries left out),
    each checked to name an importable Lightning callback class."""
    from lightning.pytorch.callbacks import Callback

    group = cfg.get("callbacks")
    if group is None:
        return {}
    if not OmegaConf.is_dict(group):
        raise ConfigError(
            f"callbacks must be a mapping NAME -> callback config (lightning-hydra-template's convention), got "
            f"{type(group).__name__}; add one with `+callbacks.NAME._target_=package.Class`.")
    entries = {}
    for name, entry in group.items():
        if name in SETTINGS or _is_off(entry):
            continue
        if not OmegaConf.is_dict(entry) or "_target_" not in entry:
            if name == "progress_bar":  # was a string option (tqdm | none) before the bar became an entry
                raise ConfigError(
                    f"callbacks.progress_bar={entry!r}: the progress bar is a callback config now "
                    f"(conf/callbacks/default.yaml: tqdm by default); drop the override, or set callbacks.progress_bar=null.")
            raise ConfigError(
                f"callbacks.{name}={OmegaConf.to_container(entry) if OmegaConf.is_config(entry) else entry!r} is "
                f"neither a setting ({', '.join(SETTINGS)}) nor a callback config: give it a _target_, e.g. "
                f"`+callbacks.{name}._target_=lightning.pytorch.callbacks.LearningRateMonitor`.")
        target_class(f"callbacks.{name}", entry._target_, Callback)
        entries[name] = entry
    return entries


def check_callbacks_config(cfg: DictConfig) -> None:
    """The callbacks of a continual run can be built and keep the run's guarantees: one
    evaluation (it writes the results), at most one task checkpoint. Runs before loading."""
    from hydra.utils import get_class

    entries = callback_entries(cfg)
    evaluations = [n for n, e in entries.items() if issubclass(get_class(e._target_), ContinualEvaluation)]
    checkpoints = [n for n, e in entries.items() if issubclass(get_class(e._target_), TaskCheckpoint)]
    if len(evaluations) != 1:
        raise ConfigError(
            f"the continual stage needs exactly one evaluation callback (a ContinualEvaluation: it measures recall "
            f"and writes summary.json and the run's files), found {len(evaluations)}"
            + (f" ({', '.join('callbacks.' + n for n in evaluations)})" if evaluations else "")
            + ". Keep callbacks.evaluation of conf/callbacks/default.yaml and drop the others.")
    for name, entry in entries.items():
        if issubclass(get_class(entry._target_), LmEvalHarness):
            check_lm_eval_config(entry, f"callbacks.{name}")
    if len(checkpoints) > 1:
        raise ConfigError(
            f"more than one task checkpoint ({', '.join('callbacks.' + n for n in checkpoints)}): they would write "
            f"the same checkpoints/last.ckpt. Keep one (callbacks.checkpoint).")


def build_callbacks(cfg: DictConfig, dm, tokenizer, run_info: dict, before_cache=None):
    """(callbacks in Trainer order, the evaluation callback) for a continual run's Trainer.

    The evaluation callback gets the run's data, tokenizer and settings (``run_info``) here;
    every other entry is built from its config alone."""
    from hydra.utils import get_class, instantiate

    from ..methods import method_class

    check_callbacks_config(cfg)
    memory_only = method_class(cfg.method).memory_only
    first, middle, last = [], [], []
    for name, entry in callback_entries(cfg).items():
        cls = get_class(entry._target_)
        if issubclass(cls, MEMORY_ONLY) and not memory_only:
            continue
        if issubclass(cls, LmEvalHarness) and not entry.tasks:  # tasks: [] is off
            continue
        kwargs = OmegaConf.to_container(entry, resolve=True)
        kwargs.pop("enabled", None)  # ours, not the callback's: false leaves the entry out
        if issubclass(cls, ContinualEvaluation):
            make = instantiate(kwargs, _partial_=True)
            first.append(make(datamodule=dm, tokenizer=tokenizer, run_info=run_info, before_cache=before_cache,
                              prefix_states=_eval_prefix_states(cfg)))
        elif issubclass(cls, TaskCheckpoint):
            last.append(instantiate(kwargs))
        else:
            middle.append(instantiate(kwargs))
    debug = cfg.get("debug") or {}
    if debug.get("signal"):  # deterministic stand-in for an external SIGTERM / SIGINT (tests)
        middle.append(SelfSignal(str(debug.signal), int(debug.signal_at_step)))
    return first + middle + last, first[0]


def _eval_prefix_states(cfg: DictConfig):
    """The evaluation's frozen-prefix store (callbacks.eval_prefix_cache), or None."""
    prefix_cache = cfg.callbacks.get("eval_prefix_cache", True)
    if not isinstance(prefix_cache, bool):
        raise ValueError(f"callbacks.eval_prefix_cache={prefix_cache!r}: use true or false")
    from ..methods import method_class

    if not (prefix_cache and method_class(cfg.method).memory_only):  # everything below the memory must stay frozen
        return None
    from ..eval.prefix_states import EvalPrefixStates

    return EvalPrefixStates()


__all__ = ["ContinualEvaluation", "LmEvalHarness", "SlotStatsLogger", "TaskCheckpoint", "build_callbacks",
           "check_callbacks_config"]
