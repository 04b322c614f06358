"""Packaging: the five import names live under one namespace, editable and as a wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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


def test_no_top_level_agents_or_kernels_module_is_installed():
    code = "import importlib.util as u; print(u.find_spec('agents'), u.find_spec('kernels'))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/"
    )
    assert out.stdout.split() == ["None", "None"]


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
