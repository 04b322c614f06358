"""Run untrusted, model-generated Python (HumanEval-style) behind an OS boundary.

``run_tests(code, test, entry_point)`` runs the candidate ``code`` in a sandbox and judges it
with the trusted ``test`` text (which defines ``check(candidate)``) *outside* it, returning a
:class:`SandboxResult` whose ``output`` can be handed back to a reviewer agent. Bad candidate
code never raises; bad arguments raise :class:`~kvshare.errors.ConfigError`, and a machine
where no OS sandbox can start raises :class:`~kvshare.errors.SandboxUnavailableError` (nothing
runs then).

Three layers, outside in:

* **The verdict lives outside.** The harness (this module, in the caller's process) compiles
  and runs ``test``; ``check`` gets a stand-in for the entry point (and for every other name
  the test uses that the candidate defines, such as HumanEval's ``poly``) whose calls cross to
  the sandbox as plain data and come back as plain data (``sandbox_wire``: no object of the
  candidate's ever reaches ``check``). "passed" means ``check`` returned here. The candidate
  never sees the tests and has nothing to forge: no record, no exit status, no output counts.
* **The OS boundary** (``sandbox_os``): bubblewrap with an unprivileged identity, new user,
  PID, network, mount, IPC and UTS namespaces, a read-only view of the system interpreter's
  standard library and nothing else, the run's own writable directory, rlimits on memory, CPU
  time, file size and processes; the whole PID namespace dies with the run.
* **The policy layer** (``sandbox_guard``): audit hooks in the sandboxed interpreter turn
  obvious attempts (processes, signals, sockets, writes outside, native code) into a readable
  ``PermissionError("sandbox: ...")``; a run where one fired is ``blocked``.

Only the standard library exists in the sandbox (no numpy).
"""

from __future__ import annotations

import builtins
import math
import tempfile
import time
import types
from dataclasses import dataclass
from keyword import iskeyword
from pathlib import Path
from typing import Literal

from kvshare.agents.sandbox_os import jail
from kvshare.agents.sandbox_run import CandidateRun, RunEnded, RunTimeout

from kvshare.errors import ConfigError

__all__ = ["DEFAULT_LIMITS", "SandboxLimits", "SandboxResult", "SandboxStatus", "run_tests"]

SandboxStatus = Literal["passed", "failed", "timeout", "blocked", "error"]
"""``passed``: ``check`` returned; ``failed``: an assertion or other exception (or the
candidate ended before ``check`` finished); ``timeout``: the wall-clock or CPU limit was hit;
``blocked``: the guard refused an operation; ``error``: the code or test does not compile,
or the sandboxed program died of a signal."""

TEST_FILE = "tests.py"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one run. ``timeout_s``: wall clock, after which the run is killed;
    ``memory_bytes``: ``RLIMIT_AS``; ``cpu_s``: ``RLIMIT_CPU`` (None: ``ceil(timeout_s) +
    1``); ``file_bytes``: ``RLIMIT_FSIZE`` (also caps captured output); ``processes``: how many
    processes the run may start beyond its user's current count (``RLIMIT_NPROC``);
    ``output_chars``: the most characters of output kept in the result (its tail)."""

    timeout_s: float = 5.0
    memory_bytes: int = 1 << 30
    cpu_s: int | None = None
    file_bytes: int = 1 << 20
    output_chars: int = 2000
    processes: int = 16

    def __post_init__(self) -> None:
        number = isinstance(self.timeout_s, (int, float)) and not isinstance(self.timeout_s, bool)
        if not number or not 0 < self.timeout_s < math.inf:
            raise ConfigError(f"timeout_s must be a positive number, got {self.timeout_s!r}")
        for name in ("memory_bytes", "file_bytes", "output_chars", "processes"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if self.cpu_s is not None and (not _is_int(self.cpu_s) or self.cpu_s <= 0):
            raise ConfigError(f"cpu_s must be a positive int or None, got {self.cpu_s!r}")

    @property
    def cpu_limit_s(self) -> int:
        """The ``RLIMIT_CPU`` soft limit in seconds (``cpu_s`` or ``ceil(timeout_s) + 1``)."""
        return self.cpu_s if self.cpu_s is not None else math.ceil(self.timeout_s) + 1


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one run: ``status`` (see :data:`SandboxStatus`), ``passed`` (status is
    "passed"), ``output`` (tail of the candidate's stdout and stderr, then the verdict's
    reason, at most ``output_chars``) and the wall-clock ``duration_s`` of the run."""

    status: SandboxStatus
    passed: bool
    output: str
    duration_s: float


DEFAULT_LIMITS = SandboxLimits()
"""The limits ``run_tests`` uses when given none."""


def run_tests(
    code: str, test: str, entry_point: str, limits: SandboxLimits = DEFAULT_LIMITS
) -> SandboxResult:
    """Run ``code`` in the sandbox, then ``check(<entry_point>)`` of ``test`` here.

    Raises :class:`ConfigError` for bad arguments (non-str code or test, an entry point that
    is not an identifier, limits that are not a :class:`SandboxLimits`) and
    SandboxUnavailableError where no OS sandbox can start; every problem of the candidate
    code itself is reported in the result.
    """
    _validate(code, test, entry_point, limits)
    where = jail()
    start = time.monotonic()
    try:
        check, names = _load_test(test, entry_point)
    except _TestProblem as exc:
        return _result("error", str(exc), start, limits)
    with (
        tempfile.TemporaryDirectory(prefix="kvshare-sandbox-", ignore_cleanup_errors=True) as d,
        CandidateRun(where, Path(d), code, names, limits) as run,
    ):
        status, reason = _judge(run, check, names, test)
        outputs = run.outputs()
    return _result(status, "\n".join(p for p in (*outputs, reason) if p.strip()), start, limits)


def _validate(code: object, test: object, entry_point: object, limits: object) -> None:
    """Raise ConfigError unless the arguments of run_tests are usable."""
    if not isinstance(code, str) or not isinstance(test, str):
        raise ConfigError("code and test must be str")
    if not isinstance(entry_point, str) or not entry_point.isidentifier() or iskeyword(entry_point):
        raise ConfigError(f"entry_point must be a Python identifier, got {entry_point!r}")
    if not isinstance(limits, SandboxLimits):
        raise ConfigError(f"limits must be a SandboxLimits, got {type(limits).__name__}")


class _TestProblem(Exception):
    """The test text cannot judge anything (it does not compile or defines no check)."""


def _load_test(test: str, entry_point: str) -> tuple[types.FunctionType, list[str]]:
    """``check`` from the test text, run here, and the names to ask the candidate for: the
    entry point, then every global the test reads but does not define (sorted)."""
    try:
        code = compile(test, TEST_FILE, "exec", dont_inherit=True)
        namespace: dict[str, object] = {"__name__": "__tests__"}
        exec(code, namespace)  # trusted: the problem's own tests
    except BaseException as exc:
        raise _TestProblem(f"harness: the test code does not run: {exc!r}") from exc
    check = namespace.get("check")
    if not isinstance(check, types.FunctionType):
        raise _TestProblem("harness: the test code does not define check()")
    wanted = {n for c in _codes(code) for n in c.co_names} - set(namespace) - set(dir(builtins))
    return check, [entry_point, *sorted(wanted - {entry_point})]


def _codes(code: types.CodeType) -> list[types.CodeType]:
    found, todo = [], [code]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += [c for c in current.co_consts if isinstance(c, types.CodeType)]
    return found


def _judge(
    run: CandidateRun, check: types.FunctionType, names: list[str], test: str
) -> tuple[str, str]:
    """(status, reason): run ``check`` here on stand-ins for the candidate's functions."""
    try:
        found = run.start()
        check.__globals__.update({n: run.remote(n) for n in found})
        check(run.remote(names[0]))
    except RunTimeout as exc:
        return "timeout", str(exc)
    except RunEnded as exc:
        return exc.status, str(exc)
    except BaseException as exc:  # an assertion of check, or what the candidate raised
        return ("blocked" if run.blocked else "failed"), _describe(exc, test)
    return "passed", "passed"


def _describe(exc: BaseException, test: str) -> str:
    """``exc`` with the test lines it came through (the harness's own frames left out)."""
    import traceback

    source = test.splitlines()
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == TEST_FILE]
    lines = [
        f"  {TEST_FILE}, line {f.lineno}: {source[f.lineno - 1].strip()}"
        for f in frames
        if f.lineno is not None and 0 < f.lineno <= len(source)
    ]
    return "\n".join([*lines, f"{type(exc).__name__}: {exc}".rstrip(": ")])


def _result(status: str, text: str, start: float, lim: SandboxLimits) -> SandboxResult:
    text = text or "(no output)"
    if len(text) > lim.output_chars:
        cut = "[...]\n"
        text = cut[: lim.output_chars] + text[len(text) - max(lim.output_chars - len(cut), 0) :]
    duration = time.monotonic() - start
    return SandboxResult(status, status == "passed", text, duration)  # type: ignore[arg-type]
