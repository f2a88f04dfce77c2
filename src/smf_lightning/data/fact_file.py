"""A user's own facts from a file or dataset (``data=facts_file data.path=FILE``).

One fact per record, in any of

- JSONL (``.jsonl``, ``.ndjson``; a ``.json`` file may also hold one JSON array of records),
- CSV / TSV with a header row (several answers or paraphrases in one cell are separated
  by ``list_separator``, "|" by default),
- a ``datasets`` ``save_to_disk`` directory (a DatasetDict: the ``split`` one),
- a hub dataset id (``datasets.load_dataset(path, split=split)``; needs internet).

Record fields (their names in the file are mapped by ``fields``):

    question     the question recall is measured on (required)
    answers      a list or one string; the first is the canonical answer training teaches,
                 all of them are accepted by evaluation (required)
    id           names the fact in summary.json (default: line-<line>, or row-<index> of a dataset)
    paraphrases  further questions asking for the same answer: extra training sequences of
                 the same fact; recall is still measured once per fact, on `question`
    rephrased    the question in other words, for evaluation only (``fact_recall_rephrased``):
                 never trained, probed or used by slot selection, whitening or the read gate;
                 one that equals the question or a paraphrase (after normalisation) would not
                 be held out, and is a bad record
    task         fixes the task split: records with the same label form one task (labels that
                 are all integers run in numeric order, others in order of first appearance)

Every problem names the file and the line (row, for datasets). A malformed record is an
error unless ``skip_invalid``, which skips it instead and counts it by reason; read,
skipped and used counts go to the run log and summary.json (``data.file``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from smf_lightning.errors import ConfigError
from smf_lightning.data.facts import Fact
from smf_lightning.data.rephrasings import rephrasing_problem

log = logging.getLogger(__name__)

RECORD_FIELDS = ("id", "question", "answers", "paraphrases", "rephrased", "task")
REQUIRED_FIELDS = ("question", "answers")
FORMATS = ("auto", "jsonl", "csv", "disk", "hub")
# FactStreamDataModule keyword arguments that only facts=file reads (conf/data/facts_file.yaml).
FILE_KEYS = ("path", "format", "split", "fields", "list_separator", "skip_invalid", "probe", "known_items")
_SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "csv"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHOWN_SKIPS = 20  # skipped records logged one by one; the rest only counted


class FactFileError(ConfigError):
    """The facts file cannot give the stream it is asked for (exit code 2, one line)."""


@dataclass(frozen=True)
class RecordKeys:
    """What a reader's errors call the data and the config keys they tell the user to fix: a
    facts file's by default (data.path, data.fields, ...); a held-out suite read from a file
    names its own (data.suites.NAME.source, ...; eval/custom_suites.py)."""

    noun: str = "facts"  # "facts file X does not exist", "cannot read facts dataset X"
    path_key: str = "data.path"
    format_key: str = "data.format"
    split_key: str = "data.split"
    fields_key: str = "data.fields"
    skip_key: str = "data.skip_invalid"
    required: tuple[str, ...] = REQUIRED_FIELDS  # fields every record needs: a missing column is a mapping error
    formats: str = "set data.format=jsonl or data.format=csv"  # what to do when the suffix says nothing
    error: type[Exception] = FactFileError
    allowed: tuple[str, ...] = FORMATS  # the values data.format may take
    suffixes: Mapping[str, str] = field(default_factory=lambda: dict(_SUFFIX_FORMATS))  # format=auto: suffix -> format
    sources: str = "a JSONL or CSV file, a datasets save_to_disk directory, or a hub dataset id (owner/name)"  # what to give


FACT_FILE_KEYS = RecordKeys()


class _BadRecord(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason  # the key under which skip_invalid counts it


@dataclass(frozen=True)
class FactFileSpec:
    """Where the facts are and how to read them (the facts_file.yaml keys)."""

    path: str
    format: str = "auto"
    split: str | None = None
    fields: Mapping[str, str] | None = None
    list_separator: str = "|"
    skip_invalid: bool = False
    subset: str | None = None  # a hub dataset's configuration (datasets.load_dataset(path, subset))

    def field_names(self) -> dict[str, str]:
        names = dict(zip(RECORD_FIELDS, RECORD_FIELDS))
        unknown = sorted(set(self.fields or {}) - set(RECORD_FIELDS))
        if unknown:
            raise FactFileError(
                f"bad config: data.fields.{unknown[0]} is not a record field; the fields are {', '.join(RECORD_FIELDS)} "
                f"(map each to its name in the file, e.g. data.fields.question=q)."
            )
        names.update({k: (str(v) if v is not None else None) for k, v in (self.fields or {}).items()})
        for key in REQUIRED_FIELDS:
            if names[key] is None:
                raise FactFileError(f"bad config: data.fields.{key}=null; the {key} is required (name its field in the file).")
        return names  # an optional field mapped to null is not read


@dataclass
class FactFile:
    """The valid facts of a file, in file order, with what was read and skipped."""

    location: str
    format: str
    facts: list[Fact]
    tasks: list[str | None]  # each fact's task label (all None without a task field)
    where: list[str]  # each fact's "file:line"
    n_read: int
    skipped: Counter = field(default_factory=Counter)  # reason -> records skipped

    @property
    def task_labels(self) -> list[str]:
        """Distinct task labels in stream order (see the module docstring); [] without tasks."""
        labels = list(dict.fromkeys(t for t in self.tasks if t is not None))
        if labels and all(re.fullmatch(r"-?\d+", t) for t in labels):
            labels.sort(key=int)
        return labels

    def digest(self) -> str:
        """Changes with any fact's id, question, answers or paraphrases (keys the probe cache;
        the evaluation-only rephrasings are not probed and leave it unchanged)."""
        text = json.dumps([[f.id, f.question, list(f.aliases), list(f.paraphrases)] for f in self.facts])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def counts(self) -> dict:
        return {"path": self.location, "format": self.format, "records_read": self.n_read,
                "skipped": dict(sorted(self.skipped.items())), "skipped_total": sum(self.skipped.values()),
                "valid": len(self.facts)}

    def describe(self) -> str:
        """One clause for error messages: read / skipped (why) / valid."""
        text = f"{self.n_read} records read"
        if self.skipped:
            why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
            text += f", {sum(self.skipped.values())} skipped ({why})"
        return text + f", {len(self.facts)} valid"


# -----------------------------------------------------------------------------
# Reading


def collect_records(records: Iterable, parse: Callable, *, skip_invalid: bool, error: type[Exception], label: str,
                    log: logging.Logger | None, skip_key: str = "data.skip_invalid") -> tuple[list, list, list, int, Counter]:
    """The valid items of `records` ((location, default id, raw record or _BadRecord) triples),
    each parsed by ``parse(raw, default_id) -> (item with .id, task label or None)``; ids must be
    unique. A bad record raises `error` naming its location, or with `skip_invalid` is counted
    by reason (and logged, the first _SHOWN_SKIPS of them, when `log` is given); `skip_key` is the
    config key that turns skipping on. Returns (items, their tasks, their locations, records read,
    skipped counts). Shared by facts files, documents and held-out suites read from files."""
    items, tasks, where, first_at = [], [], [], {}
    skipped: Counter = Counter()
    n_read = 0
    for at, default_id, raw in records:
        n_read += 1
        try:
            if isinstance(raw, _BadRecord):
                raise raw
            item, task = parse(raw, default_id)
            if item.id in first_at:
                raise _BadRecord("duplicate_id", f"duplicate id {item.id!r} (first at {first_at[item.id]})")
        except _BadRecord as bad:
            if not skip_invalid:
                raise error(f"{at}: {bad} Fix the record, or skip bad records with {skip_key}=true.") from None
            skipped[bad.reason] += 1
            if log is not None and sum(skipped.values()) <= _SHOWN_SKIPS:
                log.warning("%s: skipped %s: %s", label, at, bad)
            continue
        first_at[item.id] = at
        items.append(item)
        tasks.append(task)
        where.append(at)
    return items, tasks, where, n_read, skipped


def read_fact_file(spec: FactFileSpec, log_skips: bool = True) -> FactFile:
    """Parse and validate every record of `spec.path`; raise FactFileError on the first bad
    record (or skip and count it with skip_invalid; `log_skips` logs each skipped record)."""
    names = spec.field_names()
    fmt, location, records = open_records(spec, names)
    separator = spec.list_separator if fmt == "csv" else None
    facts, tasks, where, n_read, skipped = collect_records(
        records, lambda raw, default_id: _parse_record(raw, names, default_id, separator),
        skip_invalid=spec.skip_invalid, error=FactFileError, label="facts file", log=log if log_skips else None)
    if any(t is not None for t in tasks) and None in tasks:
        # Some records fix their task and some do not: the split would be half fixed.
        keep = [i for i, t in enumerate(tasks) if t is not None]
        lacking = [where[i] for i, t in enumerate(tasks) if t is None]
        message = (f"{lacking[0]}: no task (field {names['task']!r}), but other records have one: give every "
                   f"record a task or none.")
        if not spec.skip_invalid:
            raise FactFileError(message + " Or skip such records with data.skip_invalid=true.")
        if log_skips:
            log.warning("facts file: skipped %d records without a task (%s ...)", len(lacking), lacking[0])
        skipped["missing_task"] += len(lacking)
        facts, tasks, where = [facts[i] for i in keep], [tasks[i] for i in keep], [where[i] for i in keep]
    if log_skips and sum(skipped.values()) > _SHOWN_SKIPS:
        log.warning("facts file: %d more records skipped (counted in summary.json data.file.skipped)",
                    sum(skipped.values()) - _SHOWN_SKIPS)
    return FactFile(location, fmt, facts, tasks, where, n_read, skipped)


def resolve_format(spec, keys: RecordKeys = FACT_FILE_KEYS) -> str:
    """One of keys.allowed but auto (jsonl | csv | disk | hub for a facts file) for `spec.path`
    (format=auto: by suffix or directory; a missing path that looks like owner/name is a hub id)."""
    if spec.format not in keys.allowed:
        raise keys.error(f"bad config: {keys.format_key}={spec.format!r}; allowed: {' | '.join(keys.allowed)}.")
    path = Path(spec.path).expanduser()
    if spec.format == "hub":
        return "hub"
    if not path.exists():
        if spec.format == "auto" and path.suffix.lower() not in keys.suffixes and _HUB_ID.match(spec.path):
            return "hub"
        raise keys.error(f"{keys.noun} file {spec.path} does not exist ({keys.path_key}); give {keys.sources}.")
    if spec.format != "auto":
        return spec.format
    if path.is_dir():
        return "disk"
    fmt = keys.suffixes.get(path.suffix.lower())
    if fmt is None:
        raise keys.error(f"{keys.noun} file {spec.path}: cannot tell the format from the suffix {path.suffix!r}; "
                         f"{keys.formats}.")
    return fmt


def open_records(spec: FactFileSpec, names: dict[str, str | None],
                 keys: RecordKeys = FACT_FILE_KEYS) -> tuple[str, str, Iterator]:
    """(format, location, records) of `spec`: (where, default id, raw record or _BadRecord)
    triples for collect_records. Raises keys.error if the source cannot be read or lacks a
    column for one of keys.required (mapped to file names by `names`)."""
    fmt = resolve_format(spec, keys)
    path = Path(spec.path).expanduser()
    if fmt in ("jsonl", "csv"):
        try:
            text = path.read_text(encoding="utf-8-sig")  # utf-8-sig: spreadsheet exports start with a BOM
        except (OSError, UnicodeDecodeError) as e:
            raise keys.error(f"cannot read {keys.noun} file {spec.path}: {e}") from None
        if fmt == "csv":
            return fmt, str(path), _csv_records(text, str(spec.path), "\t" if path.suffix.lower() == ".tsv" else ",", names,
                                                keys)
        if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
            return fmt, str(path), _json_array_records(text, str(spec.path))
        return fmt, str(path), _jsonl_records(text, str(spec.path))
    return fmt, (str(path) if fmt == "disk" else f"hub:{spec.path}"), _dataset_records(spec, fmt, names, keys)


def _jsonl_records(text: str, name: str) -> Iterator:
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        at, default_id = f"{name}:{lineno}", f"line-{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            yield at, default_id, _BadRecord("invalid_json", f"not valid JSON ({e.msg} at column {e.colno}).")
            continue
        yield at, default_id, record if isinstance(record, dict) else _BadRecord(
            "not_an_object", f"a record must be a JSON object {{...}}, got {type(record).__name__}.")


def _json_array_records(text: str, name: str) -> Iterator:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise FactFileError(f"{name}:{e.lineno}: not valid JSON ({e.msg}).") from None
    for i, record in enumerate(records):
        yield f"{name}: record {i}", f"record-{i}", record if isinstance(record, dict) else _BadRecord(
            "not_an_object", f"a record must be a JSON object {{...}}, got {type(record).__name__}.")


def _csv_records(text: str, name: str, delimiter: str, names: dict[str, str], keys: RecordKeys) -> Iterator:
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter=delimiter)
    header = reader.fieldnames or []
    _check_columns(header, names, name, keys)
    while True:
        start = reader.line_num + 1  # the line the next row starts on
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise keys.error(f"cannot read {keys.noun} file {name}:{start}: {e}") from None
        at, default_id = f"{name}:{start}", f"line-{start}"
        if None in row:  # more cells than the header has columns
            yield at, default_id, _BadRecord(
                "malformed", f"{len(header) + len(row[None])} cells, but the header has {len(header)} columns.")
        else:
            yield at, default_id, row


def _dataset_records(spec: FactFileSpec, fmt: str, names: dict[str, str], keys: RecordKeys) -> Iterator:
    import datasets

    try:
        if fmt == "disk":
            data = datasets.load_from_disk(str(Path(spec.path).expanduser()))
        else:
            data = datasets.load_dataset(spec.path, spec.subset, split=spec.split or "train")
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        raise keys.error(f"cannot read {keys.noun} dataset {spec.path}: {type(e).__name__}: {e}") from None
    if isinstance(data, datasets.DatasetDict):
        split = spec.split or "train"
        if split not in data:
            raise keys.error(f"{keys.noun} dataset {spec.path} has splits {', '.join(data)}; choose one with "
                             f"{keys.split_key}=NAME.")
        data = data[split]
    _check_columns(list(data.column_names), names, spec.path, keys)
    return ((f"{spec.path}: row {i}", f"row-{i}", row) for i, row in enumerate(data))


def _check_columns(columns: list[str], names: dict[str, str], name: str, keys: RecordKeys) -> None:
    """A required field missing from every record is a mapping problem, not a bad record."""
    for key in keys.required:
        if names[key] not in columns:
            raise keys.error(
                f"{keys.noun} file {name} has no column {names[key]!r} for the {key} (columns: "
                f"{', '.join(map(str, columns))}); map it with {keys.fields_key}.{key}=COLUMN."
            )


# -----------------------------------------------------------------------------
# One record


def _parse_record(raw: Mapping, names: dict[str, str], default_id: str, separator: str | None) -> tuple[Fact, str | None]:
    """(fact, task label) of one record. `separator` splits list fields held in one string
    (CSV cells); elsewhere a string is one answer / one paraphrase."""
    question = _text(_field(raw, names, "question"), "question", names)
    if question is None:
        raise _BadRecord("missing_question", f"no question (field {names['question']!r}).")
    if not question:
        raise _BadRecord("empty_question", f"empty question (field {names['question']!r}).")
    answers = _text_list(_field(raw, names, "answers"), "answers", names, separator)
    if answers is None:
        raise _BadRecord("missing_answer", f"no answer (field {names['answers']!r}).")
    if not answers or not answers[0]:
        raise _BadRecord("empty_answer", f"empty answer (field {names['answers']!r}); the first answer is the one trained.")
    paraphrases = _text_list(_field(raw, names, "paraphrases"), "paraphrases", names, separator) or []
    if "" in paraphrases:
        raise _BadRecord("empty_paraphrase", f"paraphrase {paraphrases.index('')} is empty (field {names['paraphrases']!r}).")
    raw_rephrased = _field(raw, names, "rephrased")
    if raw_rephrased is not None and not all(isinstance(r, str) for r in (
            raw_rephrased if isinstance(raw_rephrased, list | tuple) else [raw_rephrased])):
        raise _BadRecord("bad_type", f"field {names['rephrased']!r} must be text or a list of texts, got "
                                     f"{raw_rephrased!r}.")
    if separator is None and isinstance(raw_rephrased, str) and not raw_rephrased.strip():
        raise _BadRecord("empty_rephrased", f"empty rephrasing (field {names['rephrased']!r}).")  # a CSV's empty cell: none
    rephrased = _text_list(raw_rephrased, "rephrased", names, separator) or []
    fact_id = _text(_field(raw, names, "id"), "id", names)
    task = _text(_field(raw, names, "task"), "task", names)
    aliases = tuple(dict.fromkeys(a for a in answers if a))
    paraphrases = tuple(p for p in dict.fromkeys(paraphrases) if p != question)
    fact = Fact(fact_id or default_id, question, aliases[0], aliases, paraphrases,
                check_rephrased(rephrased, (question, *paraphrases), names["rephrased"]))
    return fact, task or None


def check_rephrased(rephrased: list[str], trained: tuple[str, ...], field_name: str = "rephrased") -> tuple[str, ...]:
    """The evaluation-only rephrasings of a fact, deduplicated; a bad one (empty, or the same
    as a trained question after normalisation: data/rephrasings) makes the record bad."""
    problem = rephrasing_problem(rephrased, trained)
    if problem is not None:
        raise _BadRecord(problem[0], f"{problem[1]} (field {field_name!r})")
    return tuple(dict.fromkeys(rephrased))


def _field(raw: Mapping, names: dict[str, str | None], key: str):
    return raw.get(names[key]) if names[key] is not None else None


def _text(value, key: str, names: dict[str, str]) -> str | None:
    """A scalar field as stripped text; None if absent (missing key, null, empty CSV cell)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _BadRecord("bad_type", f"field {names[key]!r} must be text, got {type(value).__name__}.")
    return str(value).strip()


def _text_list(value, key: str, names: dict[str, str], separator: str | None) -> list[str] | None:
    """A list field (one string, or a list of strings) as stripped texts; None if absent."""
    if value is None:
        return None
    if isinstance(value, str):
        if separator and separator in value:
            return [part.strip() for part in value.split(separator)]
        return [value.strip()] if value.strip() or key == "answers" else []
    if isinstance(value, list | tuple):
        return [_text(v, key, names) or "" for v in value]
    return [_text(value, key, names)]


# -----------------------------------------------------------------------------
# Checks before any model loads


def stream_shortfall(ff: FactFile, n_tasks: int, facts_per_task: int, filtered: str = "") -> str | None:
    """Why `ff` cannot fill n_tasks x facts_per_task (None if it can): counts included.
    `filtered` describes facts dropped after reading (too long, known), for the message."""
    return split_shortfall(ff.facts, ff.tasks, ff.task_labels, n_tasks, facts_per_task, subject=f"facts file {ff.location}",
                           plural=False, noun="facts", per_task_key="facts_per_task", counts=f"{ff.describe()}{filtered}")


def split_shortfall(items, tasks, labels, n_tasks: int, per_task: int, *, subject: str, plural: bool, noun: str,
                    per_task_key: str, counts: str) -> str | None:
    """Why `items` (with their task labels `tasks`, distinct `labels` in order; none: a seeded
    split) cannot fill n_tasks x per_task; None if they can. Shared by facts files and documents."""
    has, names = ("have", "name") if plural else ("has", "names")
    needed = n_tasks * per_task
    if not labels:
        if len(items) < needed:
            return (f"{subject} {has} only {len(items)} usable {noun} ({counts}), but the stream needs "
                    f"n_tasks x {per_task_key} = {n_tasks} x {per_task} = {needed}; add {noun}, or lower "
                    f"data.n_tasks or data.{per_task_key}.")
        return None
    if len(labels) < n_tasks:
        return (f"{subject} {names} {len(labels)} tasks ({', '.join(labels[:10])}), but data.n_tasks={n_tasks}; "
                f"lower data.n_tasks, or drop the task field (data.fields.task=null) to split the {noun} by seed.")
    for label in labels[:n_tasks]:
        have = tasks.count(label)
        if have < per_task:
            return (f"{subject}: task {label!r} has only {have} usable {noun} ({counts}), but "
                    f"data.{per_task_key}={per_task}; add {noun} to it or lower data.{per_task_key}.")
    return None


def validate_file_config(d) -> None:
    """config.validate_config's part for facts=file: the keys, then the file itself (read and
    checked against the stream size), all before the model loads."""
    from omegaconf import OmegaConf

    def need(cond: bool, key: str, value, allowed: str) -> None:
        if not cond:
            raise ConfigError(f"bad config: data.{key}={value!r}; allowed: {allowed}.")

    if OmegaConf.is_missing(d, "path") or not d.get("path"):
        raise ConfigError("bad config: data.path is not set; facts=file reads the facts from data.path=FILE "
                          "(JSONL, CSV, a save_to_disk directory or a hub dataset id).")
    need(d.get("format", "auto") in FORMATS, "format", d.get("format"), " | ".join(FORMATS))
    for key in ("skip_invalid", "probe"):
        need(isinstance(d.get(key), bool), key, d.get(key), "true | false")
    known = d.get("known_items", 0)
    need(isinstance(known, int) and not isinstance(known, bool) and known >= 0, "known_items", known, "an integer >= 0")
    need(not (known and not d.probe), "known_items", known,
         "0 with data.probe=false (the known-facts suite is what the probe finds the model answers)")
    need(not (known and "triviaqa_known" in (d.get("suites") or {})), "known_items", known,
         "0 when data.suites.triviaqa_known is set (one known-facts suite per run: the file's or TriviaQA's)")
    sep = d.get("list_separator", "|")
    need(isinstance(sep, str) and sep != "", "list_separator", sep, "a non-empty string")
    fields = OmegaConf.to_container(d.fields, resolve=True) if d.get("fields") is not None else None
    spec = FactFileSpec(str(d.path), d.get("format", "auto"), d.get("split"), fields, sep, bool(d.skip_invalid))
    if resolve_format(spec) == "hub":
        return  # reading a hub dataset downloads it: the datamodule does that once
    ff = read_fact_file(spec, log_skips=False)  # the datamodule reads it again and logs the skips
    n_tasks, per_task = int(d.get("n_tasks", 1)), int(d.get("facts_per_task", 1))
    if n_tasks >= 1 and per_task >= 1:
        problem = stream_shortfall(ff, n_tasks, per_task)
        if problem:
            raise FactFileError(problem)
