"""The suites a run is measured on, as the stream defines them (eval/suites.py and
eval/custom_suites.py score them):

- fact recall of a task's facts under every template, training and held-out (:func:`task_recall_suites`);
- recall of the same facts asked in other words (:func:`task_rephrased_suite`, data.rephrasings);
- the held-out capability suites of ``data.suites``, with the known-facts suites (known.py) among
  them (:func:`build_heldout_suites`);

and :func:`evaluate_recall` scores a run's recall and rephrased suites in few greedy passes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from smf_lightning.data.facts import Fact, FactTemplate
from smf_lightning.eval.custom_suites import build_custom_suite, is_custom
from smf_lightning.eval.suites import REPHRASED, FactRecallSuite, build_suite, evaluate_task_recall
from smf_lightning.streams.known import FILE_KNOWN_SUITE, KNOWN_SUITE


def task_recall_suites(task_index: int, facts: Sequence[Fact], templates: Mapping[str, FactTemplate],
                       names: Sequence[str], max_new_tokens: int, generation_batch_size: int) -> dict[str, FactRecallSuite]:
    """One FactRecallSuite of the task's ``facts`` per template of ``names``, keyed by template name."""
    return {
        name: FactRecallSuite(facts, templates[name], max_new_tokens, generation_batch_size,
                              name=f"task{task_index}/{name}")
        for name in names
    }


def task_rephrased_suite(task_index: int, facts: Sequence[Fact], template: FactTemplate, max_new_tokens: int,
                         generation_batch_size: int) -> FactRecallSuite | None:
    """Recall of the task's facts asked in other words (each fact's ``rephrased`` questions, one
    item per rephrasing, the fact's id on each) under ``template`` (the first training one); None
    if no fact of the task has one. ``max_new_tokens`` is data.rephrased_max_new_tokens, so an
    answer after a short preamble ("The city is ...") is still seen by "contains"."""
    items = [Fact(f.id, r, f.answer, f.aliases) for f in facts for r in f.rephrased]
    if not items:
        return None
    return FactRecallSuite(items, template, max_new_tokens, generation_batch_size, name=f"task{task_index}/{REPHRASED}")


def build_heldout_suites(options: Mapping[str, Mapping], *, seed: int, source: str, data_root: str | None,
                         generation_batch_size: int, known: Mapping[str, FactRecallSuite]) -> dict:
    """The held-out capability suites of ``options`` (data.suites), in their order: a suite of
    one's own over a file or dataset (eval/custom_suites.py), ``known[triviaqa_known]`` for
    triviaqa_known, a built-in suite (eval/suites.build_suite) otherwise; ``known[file_known]``
    last, if given (known.py builds both)."""
    suites = {}
    for name, opts in options.items():
        if is_custom(opts):  # a suite kind over the user's own file or dataset
            suites[name] = build_custom_suite(name, opts, seed, generation_batch_size=generation_batch_size)
            continue
        opts = dict(opts)
        n_items = int(opts.pop("n_items"))
        if name == KNOWN_SUITE:
            suites[name] = known[name]
            continue
        if name == "nq_open":
            opts.setdefault("generation_batch_size", generation_batch_size)
        suites[name] = build_suite(name, n_items, seed, source=source, data_root=data_root, **opts)
    if FILE_KNOWN_SUITE in known:
        suites[FILE_KNOWN_SUITE] = known[FILE_KNOWN_SUITE]
    return suites


def evaluate_recall(model, tokenizer, recall: Mapping[int, Mapping[str, FactRecallSuite]],
                    rephrased: Mapping[int, FactRecallSuite], batch_size: int, items: dict | None = None) -> dict:
    """Task -> template -> {"em", "contains"} of the ``recall`` suites (task -> template -> suite),
    one greedy pass per task over all its templates (eval/suites.evaluate_task_recall), and of
    the ``rephrased`` suites (task -> suite) in a pass of their own: a longer decoding than the
    templates' (rephrased_max_new_tokens)."""
    results = evaluate_task_recall(model, tokenizer, recall, batch_size, items)
    if rephrased:
        by_task = {j: {REPHRASED: s} for j, s in rephrased.items()}
        for j, r in evaluate_task_recall(model, tokenizer, by_task, batch_size, items, scope=REPHRASED).items():
            results[j].update(r)
    return results
