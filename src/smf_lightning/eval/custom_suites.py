"""Held-out suites of one's own, from config alone: a suite kind pointed at a file or dataset.

    data:
      suites:
        my_mc: {kind: multiple_choice, source: data/mc.jsonl, n_items: 200,
                fields: {context: ctx, choices: endings, label: label}}

A suite with a `source` reads its items from it; one without is a built-in suite (nq_open,
hellaswag, gsm8k, lambada: the benchmark sources of data/sources.py). The keys
(conf/data/facts_triviaqa.yaml shows them with their defaults):

    kind            qa | multiple_choice | perplexity | last_word (eval/suites.py SUITE_KINDS)
    source          a JSONL / CSV / TSV file, a datasets save_to_disk directory, or a hub id (owner/name)
    format          auto | jsonl | csv | disk | hub (auto: by suffix; a directory is save_to_disk)
    split, subset   the split of a DatasetDict or hub dataset, and a hub dataset's configuration
    fields          the kind's field -> its name in the data (unmapped fields keep their own name)
    list_separator  splits a CSV cell holding several answers or choices
    skip_invalid    skip malformed records (counted in the log) instead of stopping at the first
    n_items         the size of the seeded subset the suite scores (at most the valid records)
    anything else   an option of the kind's suite class (prompt, max_new_tokens, max_length, ...)

The fields of each kind (required first; [optional]):

    qa               question, answers (a list or one string; the first is scored for answer_nll), [id]
    multiple_choice  context, choices (a list, at least two), label (index of the right choice, from 0), [id]
    perplexity       text, [context] (scored after it), [id]
    last_word        text (its last word is predicted from the rest), [id]

Files are read by the facts file's readers (data/fact_file.py), so records fail the same way:
naming the file and line, before any model loads (config.validate_config reads every local
source once; the datamodule reads it again when it builds the suite).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

from smf_lightning.errors import ConfigError
from smf_lightning.data.fact_file import (FORMATS, FactFileSpec, RecordKeys, _BadRecord, _text, _text_list,
                                          collect_records, open_records)
from smf_lightning.data.sources import ChoiceItem, PassageItem, QAItem
from smf_lightning.eval.suites import BUILTIN_KINDS, SUITE_KINDS, SUITE_NAMES, TextItem, suite_subset_order

log = logging.getLogger(__name__)

# kind -> (fields every record needs, optional fields)
KIND_FIELDS = {
    "qa": (("question", "answers"), ("id",)),
    "multiple_choice": (("context", "choices", "label"), ("id",)),
    "perplexity": (("text",), ("context", "id")),
    "last_word": (("text",), ("id",)),
}
SOURCE_KEYS = ("kind", "source", "format", "split", "subset", "fields", "list_separator", "skip_invalid")
RESERVED_NAMES = ("triviaqa_known", "file_known")  # built by the datamodule from the probe, never from a source
_NOT_OPTIONS = {"items", "name", "origin", "primary_metric", "higher_is_better", "last_items", "last_predictions"}


class SuiteConfigError(ConfigError):
    """A held-out suite's config or data cannot give the suite (exit code 2, one line)."""


def is_custom(opts: Mapping) -> bool:
    """Whether a suite reads its own data (it has a `source`), rather than being a built-in one."""
    return "source" in opts


def kind_options(kind_class) -> list[str]:
    """The options a suite class takes from config (its dataclass fields but the items and results)."""
    return [f.name for f in dataclasses.fields(kind_class) if f.name not in _NOT_OPTIONS]


def check_suite_config(name: str, opts: Mapping) -> None:
    """The keys of one suite, without reading any data: raise SuiteConfigError naming the key
    and what to write instead."""
    key = f"data.suites.{name}"
    if not isinstance(opts, Mapping):
        raise SuiteConfigError(f"bad config: {key}={opts!r}; a suite is a mapping, e.g. {key}={{n_items: 100}}.")
    n_items = opts.get("n_items")
    if not (isinstance(n_items, int) and not isinstance(n_items, bool) and n_items >= 1):
        raise SuiteConfigError(f"bad config: {key}.n_items={n_items!r}; give the number of items the suite scores "
                               f"(an integer >= 1), e.g. {key}.n_items=200.")
    if not is_custom(opts):
        if name not in SUITE_NAMES:
            raise SuiteConfigError(
                f"bad config: {key}: {name!r} is not a built-in suite (Allowed suites: {', '.join(SUITE_NAMES)}); "
                f"a suite of your own names its kind and data: {key}={{kind: {'|'.join(SUITE_KINDS)}, source: FILE, "
                f"n_items: N}}.")
        stray = sorted(set(opts) & set(SOURCE_KEYS))
        if stray:
            raise SuiteConfigError(f"bad config: {key}.{stray[0]} needs {key}.source (the file or dataset to read); "
                                   f"the built-in {name} reads its own data: drop {key}.{stray[0]}, or set a source.")
        if name in BUILTIN_KINDS:
            from smf_lightning.eval.suites import _SUITE_CLASSES

            _check_options(key, opts, _SUITE_CLASSES[name], f"the built-in {name} suite")
        return
    if name in RESERVED_NAMES:
        raise SuiteConfigError(f"bad config: {key}.source: {name!r} is the known-facts suite the probe builds; "
                               f"give a suite of your own another name.")
    kind = opts.get("kind")
    if kind not in SUITE_KINDS:
        raise SuiteConfigError(f"bad config: {key}.kind={kind!r}; a suite with a source needs its kind: "
                               f"{' | '.join(SUITE_KINDS)}.")
    source = opts.get("source")
    if not isinstance(source, str) or not source.strip():
        raise SuiteConfigError(f"bad config: {key}.source={source!r}; give a JSONL or CSV file, a datasets "
                               f"save_to_disk directory or a hub dataset id (owner/name).")
    if opts.get("format", "auto") not in FORMATS:
        raise SuiteConfigError(f"bad config: {key}.format={opts.get('format')!r}; allowed: {' | '.join(FORMATS)}.")
    if not isinstance(opts.get("skip_invalid", False), bool):
        raise SuiteConfigError(f"bad config: {key}.skip_invalid={opts.get('skip_invalid')!r}; allowed: true | false.")
    sep = opts.get("list_separator", "|")
    if not isinstance(sep, str) or not sep:
        raise SuiteConfigError(f"bad config: {key}.list_separator={sep!r}; allowed: a non-empty string.")
    field_names(name, opts)
    _check_options(key, opts, SUITE_KINDS[kind], f"kind {kind}")


def _check_options(key: str, opts: Mapping, kind_class, what: str) -> None:
    allowed = kind_options(kind_class)
    unknown = sorted(set(opts) - set(allowed) - set(SOURCE_KEYS) - {"n_items"})
    if unknown:
        raise SuiteConfigError(f"bad config: {key}.{unknown[0]} is not an option of {what}; its options: "
                               f"{', '.join(allowed)} (and n_items).")


def field_names(name: str, opts: Mapping) -> dict[str, str | None]:
    """The kind's fields -> their names in the data (`fields` maps them; an optional field
    mapped to null is not read)."""
    required, optional = KIND_FIELDS[opts["kind"]]
    fields = dict(opts.get("fields") or {})
    unknown = sorted(set(fields) - set(required) - set(optional))
    if unknown:
        raise SuiteConfigError(
            f"bad config: data.suites.{name}.fields.{unknown[0]} is not a field of kind {opts['kind']}; its fields are "
            f"{', '.join(required)} (required) and {', '.join(optional)} (optional); map each to its name in the data, "
            f"e.g. data.suites.{name}.fields.{required[0]}=COLUMN.")
    names = {k: k for k in (*required, *optional)}
    names.update({k: (None if v is None else str(v)) for k, v in fields.items()})
    for k in required:
        if names[k] is None:
            raise SuiteConfigError(f"bad config: data.suites.{name}.fields.{k}=null; kind {opts['kind']} needs the {k} "
                                   f"(name its field in the data).")
    return names


def _record_keys(name: str, kind: str) -> RecordKeys:
    key = f"data.suites.{name}"
    return RecordKeys(noun=f"suite {name!r}", path_key=f"{key}.source", format_key=f"{key}.format",
                      split_key=f"{key}.split", fields_key=f"{key}.fields", skip_key=f"{key}.skip_invalid",
                      required=KIND_FIELDS[kind][0], formats=f"set {key}.format=jsonl or {key}.format=csv",
                      error=SuiteConfigError)


@dataclasses.dataclass(frozen=True)
class SuiteData:
    """The valid items of a suite's source, in source order."""

    items: list
    location: str  # "<format>:<path or hub id>"
    n_read: int
    skipped: dict

    def describe(self) -> str:
        text = f"{self.n_read} records read"
        if self.skipped:
            text += f", {sum(self.skipped.values())} skipped ({', '.join(f'{n} {r}' for r, n in sorted(self.skipped.items()))})"
        return text + f", {len(self.items)} valid"


def read_suite_data(name: str, opts: Mapping) -> SuiteData:
    """Every valid item of the suite's source; raise SuiteConfigError if the config or the data
    is bad (a missing file or column, a malformed record, no valid record at all)."""
    check_suite_config(name, opts)
    kind = opts["kind"]
    names = field_names(name, opts)
    spec = FactFileSpec(str(opts["source"]), opts.get("format", "auto"), opts.get("split"), None,
                        opts.get("list_separator", "|"), bool(opts.get("skip_invalid", False)), opts.get("subset"))
    fmt, location, records = open_records(spec, names, _record_keys(name, kind))
    separator = spec.list_separator if fmt == "csv" else None
    required = KIND_FIELDS[kind][0]

    def parse(raw: Mapping, default_id: str):
        for k in required:  # a JSON record names its own fields: say which it has
            if names[k] not in raw:
                raise _BadRecord(f"missing_{k}", f"no field {names[k]!r} for the {k} (the record has "
                                                 f"{', '.join(map(str, raw))}); map it with data.suites.{name}.fields.{k}=FIELD.")
        return _PARSERS[kind](raw, names, default_id, separator), None

    items, _, _, n_read, skipped = collect_records(
        records, parse,
        skip_invalid=spec.skip_invalid, error=SuiteConfigError, label=f"suite {name}", log=log,
        skip_key=f"data.suites.{name}.skip_invalid")
    data = SuiteData(items, location if fmt == "hub" else f"{fmt}:{location}", n_read, dict(skipped))
    if not items:
        raise SuiteConfigError(f"suite {name!r}: {opts['source']} has no usable {kind} items ({data.describe()}); "
                               f"point data.suites.{name}.source at a non-empty file or dataset.")
    if opts["n_items"] > len(items):
        raise SuiteConfigError(f"suite {name!r}: data.suites.{name}.n_items={opts['n_items']}, but {opts['source']} "
                               f"has only {len(items)} usable items ({data.describe()}); lower n_items.")
    return data


def build_custom_suite(name: str, opts: Mapping, seed: int, **defaults):
    """The suite over the first n_items of the seeded permutation of its source's items (as the
    built-in suites take theirs). `defaults` (e.g. the run's generation_batch_size) fill options
    the kind has and the config leaves unset."""
    data = read_suite_data(name, opts)
    kind_class = SUITE_KINDS[opts["kind"]]
    allowed = kind_options(kind_class)
    options = {k: v for k, v in defaults.items() if k in allowed}
    options.update({k: v for k, v in opts.items() if k in allowed})
    order = suite_subset_order(name, len(data.items), seed)[: opts["n_items"]]
    log.info("suite %s (%s): %s; scoring %d", name, opts["kind"], data.describe(), opts["n_items"])
    return kind_class(items=[data.items[i] for i in order], name=name, origin=data.location, **options)


def validate_suites(suites: Mapping) -> None:
    """config.validate_config's part for data.suites: every suite's keys, and the data of every
    suite with a source (read and checked: the kind's fields, at least n_items valid items)."""
    for name, opts in suites.items():
        check_suite_config(str(name), opts)
        if is_custom(opts):
            read_suite_data(str(name), opts)


# ----------------------------------------------------------------------------- one record per kind


def _need_text(raw: Mapping, names: dict, key: str) -> str:
    value = _text(raw.get(names[key]), key, names)
    if value is None:
        raise _BadRecord(f"missing_{key}", f"no {key} (field {names[key]!r}).")
    if not value:
        raise _BadRecord(f"empty_{key}", f"empty {key} (field {names[key]!r}).")
    return value


def _optional_text(raw: Mapping, names: dict, key: str) -> str | None:
    return (_text(raw.get(names[key]), key, names) or None) if names[key] is not None else None


def _qa_item(raw: Mapping, names: dict, default_id: str, separator: str | None) -> QAItem:
    question = _need_text(raw, names, "question")
    answers = _text_list(raw.get(names["answers"]), "answers", names, separator)
    if answers is None:
        raise _BadRecord("missing_answers", f"no answers (field {names['answers']!r}).")
    if not answers or not answers[0]:
        raise _BadRecord("empty_answer", f"empty answer (field {names['answers']!r}); the first answer is scored.")
    return QAItem(_optional_text(raw, names, "id") or default_id, question, tuple(a for a in answers if a))


def _choice_item(raw: Mapping, names: dict, default_id: str, separator: str | None) -> ChoiceItem:
    context = _need_text(raw, names, "context")
    choices = _text_list(raw.get(names["choices"]), "choices", names, separator)
    if choices is None:
        raise _BadRecord("missing_choices", f"no choices (field {names['choices']!r}).")
    if len(choices) < 2 or not all(choices):
        raise _BadRecord("bad_choices", f"choices (field {names['choices']!r}) must be at least two non-empty texts, "
                                        f"got {choices!r}.")
    label = raw.get(names["label"])
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise _BadRecord("bad_label", f"label (field {names['label']!r}) must be the index of the right choice, "
                                      f"0..{len(choices) - 1}; got {label!r}.")
    return ChoiceItem(_optional_text(raw, names, "id") or default_id, context, tuple(choices), label)


def _text_item(raw: Mapping, names: dict, default_id: str, separator: str | None) -> TextItem:
    return TextItem(_optional_text(raw, names, "id") or default_id, _need_text(raw, names, "text"),
                    _optional_text(raw, names, "context"))


def _passage_item(raw: Mapping, names: dict, default_id: str, separator: str | None) -> PassageItem:
    text = _need_text(raw, names, "text")
    words = text.split()
    if len(words) < 2:
        raise _BadRecord("one_word", f"text (field {names['text']!r}) needs a last word and words before it.")
    return PassageItem(_optional_text(raw, names, "id") or default_id, text, words[-1])


_PARSERS = {"qa": _qa_item, "multiple_choice": _choice_item, "perplexity": _text_item, "last_word": _passage_item}
