"""Our top-level folders never shadow installed packages of the same name.

The repo's ``kernels/``, ``agents/``, ``anchors/`` and ``integrations/`` folders are the
subpackages ``kvshare.kernels``, ``kvshare.agents``, ... (``pyproject.toml`` maps them). When
Python runs with the repo root on ``sys.path`` (a REPL or ``python -c`` started there, ``python
-m pytest``, a script at the root), a bare ``import kernels`` would find the folder before the
installed package of that name (Hugging Face ``kernels``, which transformers imports; the OpenAI
Agents SDK installs itself as ``agents``). Each folder's ``__init__.py`` therefore checks the name
it was imported under and, when it is not its ``kvshare.*`` name, calls :func:`hand_over`, which
imports the installed package with the repo root left out of ``sys.path`` and leaves that module
in ``sys.modules``: the import statement returns the installed package, or raises
``ModuleNotFoundError`` exactly as it would with no such folder.

Standard library only, and loaded by file path (``runpy``): it runs while ``kernels`` is
half-imported, before ``kvshare`` (which imports transformers, which imports ``kernels``) may
load.

Wing: the core (standard library only: it runs while a folder is half-imported).
"""

from __future__ import annotations

import importlib
import os
import sys


def hand_over(name: str, folder: str) -> None:
    """Put the installed package ``name`` in ``sys.modules[name]`` in place of the repo folder
    ``folder`` that Python is importing under that bare name.

    Raises ``ModuleNotFoundError`` (``.name == name``) when nothing but the folder provides
    ``name``; any other import error of the installed package propagates unchanged.
    ``sys.path`` is restored afterwards, entry for entry.
    """
    root = os.path.realpath(os.path.dirname(os.path.abspath(folder)))
    hidden = [
        (i, entry)
        for i, entry in enumerate(sys.path)
        if os.path.realpath(entry or os.curdir) == root
    ]
    for i, _ in reversed(hidden):
        del sys.path[i]
    sys.modules.pop(name, None)
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        raise ModuleNotFoundError(f"No module named {name!r}", name=name) from None
    finally:
        for i, entry in hidden:
            sys.path.insert(i, entry)
