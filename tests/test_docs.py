"""The README's Python example and the notebook run as written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def code_cells(path: Path) -> list[str]:
    nb = json.loads(path.read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_notebook_runs_on_a_tiny_model(tiny_dirs, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.setenv("KVSHARE_NOTEBOOK_MODEL", str(tiny_dirs["llama"]))
    monkeypatch.setenv("KVSHARE_NOTEBOOK_ITEMS", "1")
    monkeypatch.setenv("KVSHARE_NOTEBOOK_OUTPUT", "2")
    scope: dict[str, object] = {}
    for source in code_cells(ROOT / "notebooks" / "reuse_rates.ipynb"):
        exec(compile(source, "notebook", "exec"), scope)  # noqa: S102 - our own notebook
    rows = scope["rows"]
    assert isinstance(rows, list) and {r[0] for r in rows} == {"prefix", "kvshare"}
    assert len(rows) == 2 * 4


@pytest.mark.model
def test_readme_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) == 4
    namespace: dict = {}
    for block in blocks:  # the second continues the first
        exec(compile(block, "README", "exec"), namespace)  # noqa: S102 - our own README
    out = capsys.readouterr().out
    assert "|" in out and "SessionStats" in out
    assert "('france', 't1'," in out and "('germany', 't1'," in out
    assert "Hint(session='run-2', running='reader', next=('judge',)" in out
    assert "{'device': " in out and "'disk': 0} 2" in out  # nothing spilled; critic 2 steps away
