"""The committed lock (requirements.lock) agrees with pyproject.toml and with what is installed.

`make install` installs with the lock as constraints; `make upgrade` rewrites it (.ci/upgrade).
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][^\s#+]*)(\s+#.*)?$")


def read_lock(text: str) -> dict[str, Version]:
    """``{canonical name: version}`` of a lock's text; raises ``ValueError`` naming the first
    line that is not a comment, a blank or an exact ``name==version`` pin."""
    pins: dict[str, Version] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = PIN.match(line)
        if match is None:
            raise ValueError(f"line {number} is not an exact pin: {line!r}")
        name = canonicalize_name(match.group(1))
        if name in pins:
            raise ValueError(f"line {number} pins {name} twice")
        pins[name] = Version(match.group(2))
    return pins


def direct_requirements() -> list[tuple[str, Requirement]]:
    """(where, requirement) for pyproject.toml's dependencies and every extra that applies here."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = [("dependencies", Requirement(r)) for r in project["dependencies"]]
    for extra, reqs in project["optional-dependencies"].items():
        found += [(f"[{extra}]", Requirement(r)) for r in reqs]
    return [(w, r) for w, r in found if r.marker is None or r.marker.evaluate()]


def disagreements(pins: dict[str, Version]) -> list[str]:
    """What is wrong between pyproject.toml's direct requirements and the pins."""
    problems = []
    for where, req in direct_requirements():
        version = pins.get(canonicalize_name(req.name))
        if version is None:
            problems.append(f"{req.name} ({where}) is not in the lock")
        elif not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name}=={version} is outside {req.specifier} ({where})")
    return problems


def test_lock_is_exact_pins_inside_pyproject_ranges():
    pins = read_lock(LOCK.read_text())
    assert disagreements(pins) == []
    assert pins[canonicalize_name("torch")] == Version("2.13.0")


def test_a_pin_outside_its_range_or_a_missing_dependency_is_caught():
    pins = read_lock(LOCK.read_text())
    outside = dict(pins, transformers=Version("6.0.0"))
    missing = {k: v for k, v in pins.items() if k != "networkx"}
    assert disagreements(outside) == ["transformers==6.0.0 is outside <6,>=5.0 (dependencies)"]
    assert disagreements(missing) == ["networkx (dependencies) is not in the lock"]
    for bad in ("torch>=2.4", "torch==2.13.0+cpu", "-e .", "torch==2.13.0\ntorch==2.13.0"):
        try:
            read_lock(bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad!r}")


def closure(roots: list[Requirement]) -> set[str]:
    """Canonical names of every installed distribution that ``roots`` need, transitively (extras
    followed). A CUDA build of torch brings nvidia-* and cuda-* runtime wheels the CPU-made lock
    cannot name; they are left out."""
    env = default_environment()
    seen: set[str] = set()
    todo = [(r, r.extras) for r in roots]
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or name.startswith(("nvidia-", "cuda-")):
            continue
        seen.add(name)
        for text in metadata.distribution(name).requires or []:
            sub = Requirement(text)
            marker_envs = [dict(env, extra=e) for e in (extras or {""})]
            if sub.marker is None or any(sub.marker.evaluate(m) for m in marker_envs):
                todo.append((sub, sub.extras))
    return seen


def test_installed_environment_is_the_lock():
    """`make install` honoured the lock: everything kvshare[dev,gpu] needs is pinned, at the
    installed version (run `make install` after the lock changes)."""
    pins = read_lock(LOCK.read_text())
    needed = closure([Requirement("kvshare[dev,gpu]")]) - {"kvshare"}
    unpinned = sorted(needed - set(pins))
    assert unpinned == [], f"installed but not in the lock: {unpinned}"
    off = {n: (metadata.version(n), str(pins[n])) for n in needed}
    off = {n: v for n, v in off.items() if Version(v[0]).public != Version(v[1]).public}
    assert off == {}, f"installed (left) differs from the lock (right): {off}"


def test_upgrade_keeps_held_pins_and_the_header(tmp_path):
    old = tmp_path / "old.lock"
    old.write_text(
        "# header\n#\n\nalpha==1.0\ntorch==2.13.0  # hold: the CPU build\nzeta_pkg==0.1\n"
    )
    freeze = "Zeta_Pkg==0.2\ntorch==2.14.1+cpu\nalpha==1.1\n# a comment\nbeta==3.0+local\n"
    out = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "write_lock.py"), str(old)],
        input=freeze,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.splitlines() == [
        "# header",
        "#",
        "",
        "alpha==1.1",
        "beta==3.0",
        "torch==2.13.0  # hold: the CPU build",
        "Zeta_Pkg==0.2",
    ]
