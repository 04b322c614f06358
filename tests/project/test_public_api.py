"""kvshare.__all__ is the one list of the public API, and every name in it imports."""

from __future__ import annotations

import subprocess
import sys

import kvshare

SEEN_IN_DOCS = {"Engine", "EngineConfig", "ChatKVShare", "wrap", "Agent", "Session"}


def test_every_public_name_imports():
    assert len(set(kvshare.__all__)) == len(kvshare.__all__)
    assert set(kvshare.__all__) >= SEEN_IN_DOCS
    for name in kvshare.__all__:
        value = getattr(kvshare, name)
        assert getattr(value, "__name__", name) == name
        assert value.__module__.startswith("kvshare.")
    star: dict[str, object] = {}
    exec("from kvshare import *", star)  # noqa: S102 - the star import users may write
    assert set(kvshare.__all__) <= set(star)


def test_the_public_names_are_the_ones_the_modules_define():
    from kvshare.agents import Session
    from kvshare.integrations.langchain import ChatKVShare

    from kvshare.engine.engine import Engine

    assert kvshare.Engine is Engine and kvshare.Session is Session
    assert kvshare.ChatKVShare is ChatKVShare
    assert issubclass(kvshare.ConfigError, kvshare.KVShareError)


def test_an_unknown_name_is_an_attribute_error():
    try:
        kvshare.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("kvshare.NoSuchThing resolved")


def test_import_kvshare_does_not_import_langchain():
    code = "import sys, kvshare; print('langchain_core' in sys.modules, 'langgraph' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]
