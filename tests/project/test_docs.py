"""The README and docs pages: their Python examples run as written, their links resolve, the
README stays a front door (at most 200 lines), and the notebook runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


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


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of the headings of ``path``."""
    heads = re.findall(r"^#+ (.*)$", path.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for page in ("results", "design", "tiers", "teams", "development"):
        assert f"(docs/{page}.md)" in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or (file.suffix == ".md" and anchor not in {"", *anchors(file)}):
            broken.append(target)
    assert not broken, f"{page.name}: {broken}"


@pytest.mark.model
def test_readme_and_docs_examples_run(capsys):
    readme = python_blocks(ROOT / "README.md")
    teams, tiers = python_blocks(ROOT / "docs/teams.md"), python_blocks(ROOT / "docs/tiers.md")
    assert (len(readme), len(teams), len(tiers)) == (2, 2, 1)
    namespace: dict = {}
    for block in [*readme, *teams, *tiers]:  # each continues the ones before
        exec(compile(block, "README", "exec"), namespace)  # noqa: S102 - our own docs
    out = capsys.readouterr().out
    assert "|" in out and "SessionStats" in out
    assert "achat: [('a', " in out and "('b', " in out
    assert "('france', 't1'," in out and "('germany', 't1'," in out
    assert "Hint(session='run-2', running='reader', next=('judge',)" in out
    assert "{'device': " in out and "'disk': 0} 2" in out  # nothing spilled; critic 2 steps away


@pytest.mark.parametrize("wing", ["model", "store", "sched", "engine", "explore", "cli"])
def test_the_module_map_names_every_module_of_a_wing(wing):
    tree = re.search(r"```\nkvshare/(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert tree is not None
    lines = tree.group(1).split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(f"  {wing}/"))
    end = start + 1
    while end < len(lines) and lines[end].startswith(" " * 18):  # the wing's continued line
        end += 1
    text = " ".join(lines[start:end])
    names = [p.stem for p in (ROOT / "kvshare" / wing).glob("*.py") if p.stem != "__init__"]
    named = set(re.findall(r"\w+", text))
    missing = [n for n in names if n not in named and not ("plots_" in n and "plots_*" in text)]
    assert not missing, f"README module map, {wing}/: {missing}"
