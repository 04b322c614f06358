"""Packaging: the five import names live under one namespace, editable and as a wheel, and
our top-level folders never shadow installed packages of the same name (kvshare/_unshadow.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["kvshare", "kvshare.anchors", "kvshare.agents", "kvshare.integrations", "kvshare.kernels"]
FOLDERS = {
    "kvshare": "kvshare",
    "kvshare.anchors": "anchors",
    "kvshare.agents": "agents",
    "kvshare.integrations": "integrations",
    "kvshare.kernels": "kernels",
}


def test_installed_names_map_to_the_top_level_folders():
    code = "import importlib, sys\n" + "".join(
        f"print(importlib.import_module('{n}').__file__)\n" for n in NAMES
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/"
    )
    for name, line in zip(NAMES, out.stdout.split(), strict=True):
        assert Path(line).parent == ROOT / FOLDERS[name], (name, line)


def test_kvshare_installs_no_top_level_agents_or_kernels():
    """Away from the repo root, `agents`/`kernels` are whatever else is installed (HF `kernels`
    comes with transformers), never our folders."""
    code = (
        "import importlib.util as u\n"
        "for n in ('agents', 'kernels'):\n"
        "    s = u.find_spec(n)\n"
        "    print(s and s.origin)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/"
    )
    for origin in out.stdout.split():
        assert origin == "None" or not origin.startswith((f"{ROOT}/agents", f"{ROOT}/kernels"))


@pytest.mark.slow
def test_wheel_holds_the_namespace(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("kvshare-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in NAMES:
        assert name.replace(".", "/") + "/__init__.py" in names
    assert "kvshare/kernels/prefill.py" in names and "kvshare/bench/harness.py" in names
    tops = {n.split("/")[0] for n in names}
    assert not tops & {"anchors", "agents", "integrations", "kernels", "tests"}
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "kvshare = kvshare.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


# Real distributions whose import names are our folders' names; versions fixed for the test.
STAGED = ["kernels==0.19.1", "openai-agents==0.24.0"]

# From the repo root (sys.path[0] is '' for -c and a REPL, the root itself for -m and scripts):
# import both staged packages, then load a model and answer through kvshare.
PROBE = """
import sys, traceback
if sys.argv[1] == "absolute":
    sys.path[0] = sys.argv[2]
import kernels
print("kernels", kernels.__file__, hasattr(kernels, "CUDAProperties"))
try:
    import agents
    print("agents", agents.__file__)
except ImportError as exc:  # the SDK's own dependencies (openai, ...) are not staged
    frames = [f.filename for f in traceback.extract_tb(exc.__traceback__)]
    print("agents", next(f for f in frames if f.endswith("agents/__init__.py") and "stage" in f),
          type(exc).__name__, exc.name)
from kvshare import Engine, EngineConfig
engine = Engine.from_pretrained(sys.argv[3], config=EngineConfig(mode="prefix"))
r = engine.chat([{"role": "user", "content": "Say hi."}], max_new_tokens=3)
print("answered", r.stats.prompt_tokens > 0, len(r.text) > 0 or r.stats.computed_tokens > 0)
"""


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real ``kernels`` and ``openai-agents`` wheels, installed --no-deps into a folder."""
    stage = tmp_path_factory.mktemp("stage")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(stage)]
        + STAGED,
        check=True,
        capture_output=True,
    )
    return stage


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["cwd", "absolute"])
def test_installed_kernels_and_agents_win_over_our_folders(staged, tiny_dirs, entry):
    env = {**os.environ, "PYTHONPATH": str(staged)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, entry, str(ROOT), str(tiny_dirs["llama"])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["kernels"] == f"{staged / 'kernels' / '__init__.py'} True"
    agents_file, *error = lines["agents"].split()
    assert agents_file == str(staged / "agents" / "__init__.py")
    # a dependency of the SDK that is not staged (openai, or griffe where openai is installed)
    assert error == [] or (len(error) == 2 and error[0] == "ModuleNotFoundError"), error
    assert lines["answered"] == "True True"


def test_our_folders_give_way_to_nothing_as_if_absent():
    """From the repo root with no such package installed, a bare import fails as it would
    without the folder, and kvshare's own subpackages are untouched."""
    code = (
        "import importlib\n"
        "try:\n    importlib.import_module('anchors')\nexcept ModuleNotFoundError as e:\n"
        "    print(e.name)\n"
        "import kvshare.anchors, kvshare.kernels\n"
        "print(kvshare.anchors.AnchorPool.__module__, kvshare.kernels.KV.__module__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.split() == ["anchors", "kvshare.anchors.pool", "kvshare.kernels.kv"]
