"""The house rules: imports point down the wings, files stay short, wings say what they own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Folders shipped as kvshare.<name> (pyproject.toml's package-dir).
FOLDERS = {"kvshare": "kvshare", "anchors": "kvshare.anchors", "agents": "kvshare.agents"}
FOLDERS |= {"integrations": "kvshare.integrations", "kernels": "kvshare.kernels"}
# Lowest first; a module may import its own wing and the wings before it.
WINGS = [
    "core",  # kvshare.errors, scope, validate, registry, _unshadow
    "kernels",
    "model",
    "anchors",
    "store",
    "config",
    "sched",
    "engine",
    "apps",  # integrations, agents, bench, explore, demo, serve: peers
    "cli",
    "api",  # kvshare/__init__.py: the public names
]
CORE = {"errors", "scope", "validate", "registry", "files", "_unshadow"}
APPS = {"integrations", "agents", "bench", "explore", "demo", "serve"}
LIMIT = 300  # lines; longer files say why in their first lines ("Over 300 lines: ...")


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module kvshare ships."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((package, *parts))] = path
    return found


def wing(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 1:
        return "api"
    top = "config" if parts[1] == "config_parts" else parts[1]
    if top in CORE:
        return "core"
    if top in APPS:
        return "apps"
    if top not in WINGS:
        raise AssertionError(f"{name}: module outside every wing")
    return top


def imported(path: Path, name: str) -> set[str]:
    """Every kvshare module ``path`` imports, lazily (in a function) or not."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("kvshare")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            if base == "kvshare":  # from kvshare import x: a module or a public name
                out |= {f"kvshare.{a.name}" if a.name.islower() else "kvshare" for a in node.names}
            elif base.startswith("kvshare."):
                out.add(base)
    return out


def test_every_module_sits_in_a_wing():
    for name in modules():
        assert wing(name) in WINGS


def test_imports_point_down():
    rank = {w: i for i, w in enumerate(WINGS)}
    upward = []
    for name, path in modules().items():
        for dep in imported(path, name):
            if rank[wing(dep)] > rank[wing(name)]:
                upward.append(f"{name} ({wing(name)}) imports {dep} ({wing(dep)})")
    assert not upward, "\n".join(upward)


def test_files_are_short_or_say_why():
    long = []
    for path in modules().values():
        lines = path.read_text().splitlines()
        if len(lines) > LIMIT and not any("Over 300 lines:" in line for line in lines[:30]):
            long.append(f"{path.relative_to(ROOT)}: {len(lines)} lines")
    assert not long, "\n".join(long)


@pytest.mark.parametrize(
    "package",
    [
        "kvshare",
        "kvshare.model",
        "kvshare.store",
        "kvshare.sched",
        "kvshare.engine",
        "kvshare.explore",
        "kvshare.cli",
        "kvshare.kernels",
        "kvshare.anchors",
        "kvshare.agents",
        "kvshare.integrations",
        "kvshare.bench",
        "kvshare.serve",
    ],
)
def test_each_wing_says_what_it_owns_and_may_import(package):
    doc = ast.get_docstring(ast.parse(modules()[package].read_text())) or ""
    assert "May import" in doc or "Wing:" in doc, f"{package}: docstring states no wing"


def test_every_module_of_the_kvshare_folder_states_its_wing():
    """Modules in a wing's folder get it from their path; the ones directly under kvshare/
    (the core, config, demo) say it in their docstring."""
    top = [p for p in (ROOT / "kvshare").glob("*.py") if p.name != "__init__.py"]
    docs = {p.name: ast.get_docstring(ast.parse(p.read_text())) or "" for p in top}
    quiet = [name for name, doc in docs.items() if "Wing:" not in doc]
    assert not quiet, quiet
