"""The number a hyperparameter search maximises (``hparams_search=...``, conf/hparams_search/).

``optimized_metric: objective`` is the constrained objective of the learning-rate searches: final
fact recall R, as long as the known facts are kept,

    objective = R                                      if retention >= min_retention
              = R - penalty * (min_retention - retention)   otherwise,

with retention = after / before of the known-facts suite's primary metric (its exact match for
triviaqa_known: the share of the facts the base model answered that it still answers). A penalty
rather than a hard -inf keeps the objective informative for TPE when every early trial breaks the
constraint. Any other ``optimized_metric`` is a dotted path into the run's summary
(``fact_recall``, ``heldout.lambada.after``), returned as it is.
"""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig

from ..errors import ConfigError

OBJECTIVE = "objective"  # optimized_metric naming the constrained objective above
# Top-level summary keys a dotted optimized_metric may start from (callbacks/evaluation.py writes them;
# tests/test_hparams_search.py checks each is in a real run's summary.json).
SUMMARY_METRICS = ("fact_recall", "fact_recall_heldout_template", "fact_recall_contains", "fact_recall_rephrased", "acc", "bwt",
                   "forgetting", "heldout", "heldout_degradation_pct", "recall")
FILE_KNOWN_SUITE = "file_known"  # data=facts_file with known_items > 0 (streams/known.py)


def recall_at_retention(recall: float, retention: float, min_retention: float, penalty: float) -> float:
    """Recall if retention meets the floor, else recall minus penalty per unit of retention below it."""
    return recall if retention >= min_retention else recall - penalty * (min_retention - retention)


def suite_retention(summary: Mapping, suite: str) -> float:
    """after / before of a held-out suite's primary metric (before / after when lower is better)."""
    heldout = summary.get("heldout") or {}
    if suite not in heldout:
        raise ConfigError(f"bad config: objective.retention_suite={suite!r} is not among this run's held-out suites "
                          f"({', '.join(sorted(heldout)) or 'none'}); add it under data.suites or pick one of those.")
    h = heldout[suite]
    before, after = (h["before"], h["after"]) if h["higher_is_better"] else (h["after"], h["before"])
    if not before:
        raise ConfigError(f"cannot measure retention on suite {suite!r}: its {h['metric']} is 0 "
                          f"({'before' if h['higher_is_better'] else 'after'} training); pick a suite the model scores on.")
    return after / before


def lookup(summary: Mapping, path: str) -> float:
    """The number at a dotted path of the summary, with an error that lists what is there."""
    node = summary
    for i, part in enumerate(path.split(".")):
        if not isinstance(node, Mapping) or part not in node:
            where = ".".join(path.split(".")[:i]) or "the summary"
            keys = sorted(node) if isinstance(node, Mapping) else []
            raise ConfigError(f"bad config: optimized_metric={path!r}: no {part!r} in {where}; "
                              f"there: {', '.join(keys) or '(a number, not a mapping)'}.")
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, int | float):
        raise ConfigError(f"bad config: optimized_metric={path!r} is {node!r}, not a number; name a scalar.")
    return float(node)


def check_objective_config(cfg: DictConfig) -> None:
    """Before the model loads: the metric is one the run will write, the objective's settings are valid."""
    name = cfg.optimized_metric
    if not isinstance(name, str) or (name != OBJECTIVE and name.split(".")[0] not in SUMMARY_METRICS):
        raise ConfigError(f"bad config: optimized_metric={name!r}; allowed: {OBJECTIVE} (recall subject to "
                          f"retention, eval/objective.py) or a dotted summary key starting with one of "
                          f"{', '.join(SUMMARY_METRICS)} (e.g. fact_recall, heldout.lambada.after).")
    if name != OBJECTIVE:
        return
    obj = cfg.get("objective")
    if obj is None:
        raise ConfigError("optimized_metric=objective needs an objective: block (recall, retention_suite, "
                          "min_retention, penalty); use hparams_search=smf_lr | lora_lr | full_ft_lr.")
    suites = set(cfg.data.get("suites") or {}) | ({FILE_KNOWN_SUITE} if cfg.data.get("known_items") else set())
    if obj.retention_suite not in suites:
        raise ConfigError(f"bad config: objective.retention_suite={obj.retention_suite!r} is not a held-out suite of "
                          f"this run ({', '.join(sorted(suites)) or 'none'}); add it under data.suites "
                          f"(e.g. +data.suites.triviaqa_known={{n_items:100}}) or pick one of those.")
    if not 0 < obj.min_retention <= 1 or obj.penalty < 0:
        raise ConfigError(f"bad config: objective.min_retention={obj.min_retention}, objective.penalty={obj.penalty}; "
                          f"allowed: 0 < min_retention <= 1 and penalty >= 0.")


def optimized_value(summary: Mapping, cfg: DictConfig) -> float:
    """The value of cfg.optimized_metric for a finished run's summary: what the Hydra sweeper maximises."""
    if cfg.optimized_metric != OBJECTIVE:
        return lookup(summary, cfg.optimized_metric)
    obj = cfg.objective
    return recall_at_retention(lookup(summary, obj.recall), suite_retention(summary, obj.retention_suite),
                               float(obj.min_retention), float(obj.penalty))
