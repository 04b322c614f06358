"""Run untrusted, model-generated Python (HumanEval-style) in a contained subprocess.

``run_tests(code, test, entry_point)`` runs the candidate ``code``, then the ``test`` text
(which defines ``check(candidate)``), then ``check(<entry_point>)`` in a fresh interpreter and
returns a :class:`SandboxResult` whose ``output`` can be handed back to a reviewer agent.
Bad candidate code never raises; only bad arguments raise :class:`~kvshare.errors.ConfigError`.

Containment, outside in:

* the child is ``sys.executable -I -B`` in a new session (its own process group, killed
  whole with ``os.killpg`` on timeout and after every run), with a minimal environment,
  stdin on ``/dev/null``, its working directory a fresh ``TemporaryDirectory`` (removed
  afterwards) and ``RLIMIT_AS``/``RLIMIT_CPU``/``RLIMIT_FSIZE``/``RLIMIT_CORE=0`` set in
  ``preexec_fn``; stdout and stderr go to files outside the working directory, so their size
  is bounded by ``RLIMIT_FSIZE``;
* before any candidate code runs, a guard in the child installs audit hooks
  (``sys.addaudithook``) that refuse, with ``PermissionError("sandbox: <event> is not
  allowed (...)")``: process creation, signals to other processes, sockets, native code
  (``ctypes``), writes/creates/deletes/renames/chmods outside the working directory,
  symbolic and hard links, ``chdir``, raising resource limits, tracing, the ``gc``
  object-graph walkers and other threads' frames, and reading process memory or
  environments under ``/proc`` (new audit hooks are silently not added). Functions that
  raise no audit event (``os.mknod``, ``os.mkfifo``, ``signal.pidfd_send_signal``) are
  replaced by refusals. Imports of modules that would bypass the hooks
  (``ctypes``, ``_posixsubprocess``, ``_sqlite3``, ``readline``, ``_tkinter``, test and
  sub-interpreter modules, native code from outside the Python installation) raise
  ``ImportError("sandbox: ...")`` instead, so libraries with optional imports (numpy tries
  ``ctypes``) still load;
* "passed" needs exit status 0 and a pass record that only the guard can write: a file
  outside the working directory (so the candidate may not create it) that the guard's pass
  hook writes for one audit event, and only when that event comes from the harness's own
  frame after ``check`` returned. No secret exists for the candidate to find; printing a
  success text, calling ``sys.exit(0)`` or raising the audit event itself achieves nothing
  (tracing, which could move the harness's frame, is refused too).

This is a policy layer against accidents and naive misuse, not a security boundary (PEP 578
says as much of audit hooks). The child runs as the calling user (root in CI): it can read
any file that user can, and a deliberate attacker can still get out: by re-creating a
replaced function from its built-in module (``_imp.create_builtin``), through races between
the guard's check and the operation, with crafted bytecode (``marshal``), or through native
extensions already installed in the environment. Use an OS sandbox (namespaces, seccomp, a
container) for hostile code.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import resource
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from keyword import iskeyword
from pathlib import Path
from typing import IO, Literal

from kvshare.errors import ConfigError

__all__ = ["DEFAULT_LIMITS", "SandboxLimits", "SandboxResult", "SandboxStatus", "run_tests"]

SandboxStatus = Literal["passed", "failed", "timeout", "blocked", "error"]
"""``passed``: ``check`` returned; ``failed``: an assertion or other exception (or the
program ended before ``check`` finished); ``timeout``: the wall-clock or CPU limit was hit;
``blocked``: the guard refused an operation; ``error``: the code or test does not compile,
or the child died of a signal or a harness error."""

_EXIT_SYNTAX = 3  # exit statuses of the child program (EXIT_* in _HARNESS)
_EXIT_HARNESS = 4
_PASS_RECORD = b"passed\n"
_BLOCKED = re.compile(r"\b(?:PermissionError|ImportError): sandbox: ")
_POLL_S = 0.005


def _is_int(value: object) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one run. ``timeout_s``: wall clock, after which the whole process
    group is killed; ``memory_bytes``: ``RLIMIT_AS``; ``cpu_s``: ``RLIMIT_CPU`` (None:
    ``ceil(timeout_s) + 1``); ``file_bytes``: ``RLIMIT_FSIZE`` (also caps captured output);
    ``output_chars``: the most characters of output kept in the result (its tail)."""

    timeout_s: float = 5.0
    memory_bytes: int = 1 << 30
    cpu_s: int | None = None
    file_bytes: int = 1 << 20
    output_chars: int = 2000

    def __post_init__(self) -> None:
        if not _is_number(self.timeout_s) or not 0 < self.timeout_s < math.inf:
            raise ConfigError(f"timeout_s must be a positive number, got {self.timeout_s!r}")
        for name in ("memory_bytes", "file_bytes", "output_chars"):
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
    "passed"), ``output`` (tail of stdout then stderr, at most ``output_chars``) and the
    wall-clock ``duration_s`` of the child."""

    status: SandboxStatus
    passed: bool
    output: str
    duration_s: float


DEFAULT_LIMITS = SandboxLimits()
"""The limits ``run_tests`` uses when given none."""


def run_tests(
    code: str, test: str, entry_point: str, limits: SandboxLimits = DEFAULT_LIMITS
) -> SandboxResult:
    """Run ``code``, then ``test``, then ``check(<entry_point>)`` in a sandboxed child.

    Raises :class:`ConfigError` for bad arguments (non-str code or test, an entry point that
    is not an identifier, limits that are not a :class:`SandboxLimits`); every problem of the
    candidate code itself is reported in the result.
    """
    _validate(code, test, entry_point, limits)
    with tempfile.TemporaryDirectory(prefix="kvshare-sandbox-", ignore_cleanup_errors=True) as d:
        return _run_in(Path(d), code, test, entry_point, limits)


def _validate(code: object, test: object, entry_point: object, limits: object) -> None:
    """Raise ConfigError unless the arguments of run_tests are usable."""
    if not isinstance(code, str) or not isinstance(test, str):
        raise ConfigError("code and test must be str")
    if not isinstance(entry_point, str) or not entry_point.isidentifier() or iskeyword(entry_point):
        raise ConfigError(f"entry_point must be a Python identifier, got {entry_point!r}")
    if not isinstance(limits, SandboxLimits):
        raise ConfigError(f"limits must be a SandboxLimits, got {type(limits).__name__}")


def _run_in(
    base: Path, code: str, test: str, entry_point: str, lim: SandboxLimits
) -> SandboxResult:
    """One run with ``base`` as scratch space: ``base/work`` is the child's cwd."""
    root = base / "work"
    root.mkdir()
    (base / "candidate.py").write_bytes(code.encode("utf-8", "surrogatepass"))
    (base / "tests.py").write_bytes(test.encode("utf-8", "surrogatepass"))
    argv = [sys.executable, "-I", "-B", "-X", "utf8", "-c", _HARNESS, str(base), entry_point]
    start = time.monotonic()
    with open(base / "stdout", "wb") as out, open(base / "stderr", "wb") as err:
        try:
            returncode, timed_out = _spawn_and_wait(argv, root, out, err, lim)
        except OSError as exc:
            return SandboxResult("error", False, f"could not start the sandbox: {exc}", 0.0)
    duration = time.monotonic() - start
    stdout, stderr = (_read_text(base / name, f"{base}/") for name in ("stdout", "stderr"))
    passed = returncode == 0 and not timed_out and _pass_recorded(base / "passed")
    status = _classify(returncode, timed_out, passed, stderr)
    notes = [part for part in (stdout, stderr) if part.strip()]
    notes += _explain(status, returncode, lim)
    return SandboxResult(status, status == "passed", _tail(notes, lim.output_chars), duration)


def _spawn_and_wait(
    argv: list[str], root: Path, out: IO[bytes], err: IO[bytes], lim: SandboxLimits
) -> tuple[int, bool]:
    """Start the child, wait for it (killing its process group on timeout); return
    (returncode, timed_out)."""
    proc = subprocess.Popen(
        argv,
        cwd=root,
        env=_child_env(root),
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=err,
        start_new_session=True,
        preexec_fn=partial(_apply_limits, lim),  # rlimits must be set before exec
        close_fds=True,
    )
    try:
        timed_out = not _wait_exited(proc, lim.timeout_s)
    finally:
        _kill_group(proc.pid)
        proc.wait()
    return proc.returncode, timed_out


def _wait_exited(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for the child to exit, leaving it unreaped (so its process
    group id stays reserved for killpg) where the platform allows; True if it exited."""
    waitid = getattr(os, "waitid", None)
    if waitid is None:  # no WNOWAIT: fall back to a reaping wait
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True
    deadline = time.monotonic() + timeout_s
    flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
    while waitid(os.P_PID, proc.pid, flags) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)
    return True


def _kill_group(pgid: int) -> None:
    """SIGKILL every process left in the child's process group."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _apply_limits(lim: SandboxLimits) -> None:
    """preexec_fn: set the child's resource limits (runs in the forked child)."""
    cpu = lim.cpu_limit_s
    resource.setrlimit(resource.RLIMIT_AS, (lim.memory_bytes, lim.memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim.file_bytes, lim.file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _child_env(root: Path) -> dict[str, str]:
    """The child's whole environment: a PATH, HOME and TMPDIR in the sandbox directory, UTF-8,
    single-threaded BLAS (``-I`` makes Python ignore every PYTHON* variable anyway)."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(root),
        "TMPDIR": str(root),
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _pass_recorded(path: Path) -> bool:
    """Whether the child's guard wrote the pass record: a regular file (not a link or a
    node made with os.mknod) holding exactly ``_PASS_RECORD``."""
    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            return False
        return path.read_bytes() == _PASS_RECORD
    except OSError:
        return False


def _read_text(path: Path, scratch: str) -> str:
    """A captured stream as text (its size is bounded by RLIMIT_FSIZE), with the scratch
    directory's path dropped from file names."""
    return path.read_bytes().decode("utf-8", "replace").replace(scratch, "")


def _classify(returncode: int, timed_out: bool, passed: bool, stderr: str) -> SandboxStatus:
    """Map the child's exit to a status."""
    if timed_out or returncode == -signal.SIGXCPU:
        return "timeout"
    if passed:
        return "passed"
    if returncode == _EXIT_SYNTAX:
        return "error"
    if _BLOCKED.search(stderr):
        return "blocked"
    if returncode == _EXIT_HARNESS or returncode < 0:
        return "error"
    return "failed"


def _explain(status: SandboxStatus, returncode: int, lim: SandboxLimits) -> list[str]:
    """Lines saying what the captured output alone would not."""
    if returncode == -signal.SIGXCPU:
        return [f"timeout: killed at the {lim.cpu_limit_s} s CPU-time limit"]
    if status == "timeout":
        return [f"timeout: killed after the {lim.timeout_s:g} s limit"]
    if returncode < 0:
        return [f"error: the program was killed by {_signal_name(-returncode)}"]
    if status == "failed" and returncode == 0:
        return ["failed: the program exited before check() completed"]
    return ["passed"] if status == "passed" else []


def _signal_name(number: int) -> str:
    """SIGSEGV for 11; "signal 40" for numbers without a name."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _tail(parts: list[str], limit: int) -> str:
    """The parts, one per line, cut to their last ``limit`` characters."""
    text = "\n".join(part.strip("\n") for part in parts) or "(no output)"
    if len(text) <= limit:
        return text
    cut = "[...]\n"
    return cut[:limit] + text[len(text) - max(limit - len(cut), 0) :]


# The child program (run with ``-c``; argv: base directory, entry point). It compiles both
# sources, installs the guard, then runs candidate, test and check.
# Guard functions never look anything up in globals or builtins at call time (candidate code
# can rewrite both): what they use is bound as default arguments (whose replacement is an
# audited event the guard refuses) or, for the hooks themselves, closure variables (the hook
# functions are unreachable from Python code once installed).
_HARNESS = r"""
import sys
import posix as _posix
import _stat

PASS_EVENT = "kvshare.sandbox.passed"
EXIT_FAILED, EXIT_SYNTAX, EXIT_HARNESS = 1, 3, 4
WRITE_FLAGS = _posix.O_WRONLY | _posix.O_RDWR | _posix.O_CREAT | _posix.O_TRUNC | _posix.O_APPEND

DENIED = {
    "os.fork": "process creation", "os.forkpty": "process creation",
    "os.system": "process creation", "os.exec": "process creation",
    "os.posix_spawn": "process creation", "os.spawn": "process creation",
    "os.startfile": "process creation", "subprocess.Popen": "process creation",
    "pty.spawn": "process creation", "os.killpg": "signalling other processes",
    "os.link": "hard links", "os.symlink": "symbolic links",
    "os.chdir": "changing the working directory", "fcntl.ioctl": "device control",
    "resource.setrlimit": "changing resource limits",
    "resource.prlimit": "changing resource limits",
    "sys.addaudithook": "new audit hooks", "code.__new__": "building code objects",
    "cpython.PyInterpreterState_New": "sub-interpreters",
    "gc.get_objects": "object-graph introspection",
    "gc.get_referrers": "object-graph introspection",
    "gc.get_referents": "object-graph introspection",
    "sys._current_frames": "other threads' frames",
    "sys._current_exceptions": "other threads' frames",
    "sys.settrace": "tracing", "sys.setprofile": "tracing",
    "webbrowser.open": "process creation",
}
DENIED_PREFIXES = {
    "socket.": "network access", "ctypes.": "native code", "sqlite3.": "native file access",
    "syslog.": "system logging", "_winapi.": "process creation",
}
WRITE_RULES = {  # event -> ((path argument, dir_fd argument or -1), ...)
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),),
    "os.rename": ((0, 2), (1, 3)), "os.chmod": ((0, 2),), "os.chown": ((0, 3),),
    "os.utime": ((0, 3),), "os.truncate": ((0, -1),), "os.setxattr": ((0, -1),),
    "os.removexattr": ((0, -1),), "shutil.rmtree": ((0, 1),),
}
BLOCKED_MODULES = frozenset({
    "ctypes", "_ctypes", "cffi", "_cffi_backend", "_posixsubprocess", "_posixshmem",
    "_multiprocessing", "_sqlite3", "_dbm", "_gdbm", "readline", "_tkinter",
})
BLOCKED_MODULE_PREFIXES = ("_test", "_xx")
SECRET_NAMES = frozenset({"mem", "kmem", "kcore", "environ"})
WRITABLE_OUTSIDE = frozenset({"/dev/null"})
FUNCTION_ATTRS = frozenset({"__code__", "__defaults__", "__kwdefaults__"})
UNAUDITED = (  # functions without an audit event, replaced by refusals: (module, name, why)
    ("posix", "mkfifo", "creating special files"), ("os", "mkfifo", "creating special files"),
    ("posix", "mknod", "creating special files"), ("os", "mknod", "creating special files"),
    ("_signal", "pidfd_send_signal", "signalling other processes"),
    ("signal", "pidfd_send_signal", "signalling other processes"),
)


def _g_refuse(event, reason, *, _exc=PermissionError):
    return _exc("sandbox: %s is not allowed (%s)" % (event, reason))


def _g_unavailable(name, reason, *, _refuse=_g_refuse):
    def unavailable(*args, **kwargs):
        raise _refuse(name, reason)

    return unavailable


def _g_normpath(path):
    parts = []
    for part in path.split("/"):
        if part == "" or part == ".":
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return "/" + "/".join(parts)


def _g_fd_target(fd, *, _readlink=_posix.readlink, _oserror=OSError):
    try:
        return _readlink("/proc/self/fd/%d" % fd)
    except _oserror:
        return None


def _g_text(obj, *, _type=type, _str=str, _bytes=bytes, _int=int, _fspath=_posix.fspath,
            _fd_target=_g_fd_target, _typeerror=TypeError):
    kind = _type(obj)
    if kind is _int:
        return _fd_target(obj)
    if kind is not _str and kind is not _bytes:
        try:
            obj = _fspath(obj)
        except _typeerror:
            return None
        kind = _type(obj)
    if kind is _bytes:
        return obj.decode("utf-8", "surrogateescape")
    return obj if kind is _str else None


def _g_absolute(path, base, *, _normpath=_g_normpath):
    return _normpath(path if path.startswith("/") else base + "/" + path)


def _g_base(args, index, root, *, _type=type, _int=int, _len=len, _fd_target=_g_fd_target):
    if index < 0 or index >= _len(args):
        return root
    fd = args[index]
    if _type(fd) is not _int or fd < 0:
        return root
    return _fd_target(fd) or "/nonexistent"


def _g_check_write(event, args, rule, root, *, _len=len, _text=_g_text, _base=_g_base,
                   _absolute=_g_absolute, _refuse=_g_refuse):
    for index, dir_index in rule:
        if index >= _len(args):
            continue
        text = _text(args[index])
        if text is None:
            raise _refuse(event, "unrecognised path argument")
        path = _absolute(text, _base(args, dir_index, root))
        if not path.startswith(root + "/"):
            raise _refuse(event, "writing outside the sandbox directory: %r" % path)


def _g_check_open(args, root, *, _type=type, _int=int, _len=len, _text=_g_text,
                  _absolute=_g_absolute, _refuse=_g_refuse, _stat_path=_posix.stat,
                  _oserror=OSError, _isdir=_stat.S_ISDIR, _isblk=_stat.S_ISBLK,
                  _ischr=_stat.S_ISCHR, _mask=WRITE_FLAGS, _secret=SECRET_NAMES,
                  _writable=WRITABLE_OUTSIDE):
    if _len(args) < 3 or _type(args[0]) is _int:
        return  # a file object over an existing descriptor: nothing new is opened
    text = _text(args[0])
    if text is None:
        raise _refuse("open", "unrecognised path argument")
    path = _absolute(text, root)
    flags = args[2]
    writing = _type(flags) is not _int or flags & _mask
    inside = path == root or path.startswith(root + "/")  # root itself: O_TMPFILE
    if writing and not inside and path not in _writable:
        raise _refuse("open", "writing outside the sandbox directory: %r" % path)
    if inside and not writing:
        return
    if not inside and path.rsplit("/", 1)[-1] in _secret:
        raise _refuse("open", "reading process memory or environment: %r" % path)
    try:
        mode = _stat_path(path).st_mode
    except _oserror:
        return
    if inside and (_isblk(mode) or _ischr(mode)):
        raise _refuse("open", "writing to a device node: %r" % path)
    if not inside and _isdir(mode):
        raise _refuse("open", "opening a directory outside the sandbox: %r" % path)


def _g_check_import(args, prefixes, *, _type=type, _str=str, _len=len,
                    _normpath=_g_normpath, _blocked=BLOCKED_MODULES,
                    _blocked_prefixes=BLOCKED_MODULE_PREFIXES, _exc=ImportError):
    name = args[0] if _len(args) else None
    if _type(name) is not _str:
        raise _exc("sandbox: import of a non-str module name is not allowed")
    top = name.partition(".")[0]
    if name in _blocked or top in _blocked or top.startswith(_blocked_prefixes):
        raise _exc("sandbox: import of %r is not allowed (it bypasses the guard)" % name,
                   name=name)
    filename = args[1] if _len(args) > 1 else None
    if filename is None:
        return
    if _type(filename) is not _str or not _normpath(filename).startswith(prefixes):
        raise _exc("sandbox: import of %r is not allowed (native code from %r)"
                   % (name, filename), name=name)


def _g_check_kill(args, *, _len=len, _getpid=_posix.getpid, _refuse=_g_refuse):
    if _len(args) < 1 or args[0] != _getpid():
        raise _refuse("os.kill", "signalling other processes")


def _install_guard(root, pass_path, main_frame):
    import os.path
    from types import MappingProxyType

    denied = MappingProxyType(dict(DENIED))
    denied_prefixes = tuple(DENIED_PREFIXES.items())
    write_rules = MappingProxyType(dict(WRITE_RULES))
    function_attrs, function_type, type_, str_ = FUNCTION_ATTRS, type(_g_refuse), type, str
    refuse, check_write, check_open = _g_refuse, _g_check_write, _g_check_open
    check_import, check_kill = _g_check_import, _g_check_kill
    getframe, open_, write, close = sys._getframe, _posix.open, _posix.write, _posix.close
    value_error, os_error, pass_event = ValueError, OSError, PASS_EVENT
    pass_flags = _posix.O_WRONLY | _posix.O_CREAT | _posix.O_TRUNC
    raw = (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)
    prefixes = tuple({_g_normpath(p) + "/" for p in raw + tuple(map(os.path.realpath, raw))})
    harness_globals = globals()
    verified = False

    def pass_hook(event, args):
        nonlocal verified
        if event != pass_event:
            return
        try:
            caller = getframe(1)
        except value_error:
            return
        if caller is not main_frame:
            return
        verified = True
        try:
            fd = open_(pass_path, pass_flags, 0o600)
            try:
                write(fd, b"passed\n")
            finally:
                close(fd)
        except os_error:
            pass

    def policy(event, args):
        reason = denied.get(event)
        if reason is None:
            for prefix, why in denied_prefixes:
                if event.startswith(prefix):
                    reason = why
        if reason is not None:
            raise refuse(event, reason)
        rule = write_rules.get(event)
        if rule is not None:
            check_write(event, args, rule, root)
        elif event == "open":
            if verified and type_(args[0]) is str_ and args[0] == pass_path:
                return
            check_open(args, root)
        elif event == "import":
            check_import(args, prefixes)
        elif event == "os.kill":
            check_kill(args)
        elif event == "object.__setattr__" or event == "object.__delattr__":
            target = args[0]
            if (
                type_(target) is function_type
                and target.__globals__ is harness_globals
                and args[1] in function_attrs
            ):
                raise refuse(event, "rewriting a function's code or defaults")

    import _signal

    for module_name, name, why in UNAUDITED:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, name):
            setattr(module, name, _g_unavailable(module_name + "." + name, why))
    sys.addaudithook(pass_hook)
    sys.addaudithook(policy)
    for name in list(sys.modules):
        if name.partition(".")[0] in BLOCKED_MODULES:
            del sys.modules[name]


def _compile_file(path):
    with open(path, encoding="utf-8") as fh:
        source = fh.read()
    return compile(source, path, "exec", dont_inherit=True)


def _code_objects(code, *, _type=type, _code_type=type(_compile_file.__code__)):
    found, todo = [], [code]
    while todo:
        current = todo.pop()
        found.append(current)
        for const in current.co_consts:
            if _type(const) is _code_type:
                todo.append(const)
    return found


def _get_check(namespace, test_obj, *, _type=type, _function_type=type(_compile_file),
               _codes=_code_objects):
    check = namespace.get("check")
    if check is None:
        return None, "harness: the test code does not define check()"
    code = check.__code__ if _type(check) is _function_type else None
    for known in _codes(test_obj):
        if code is known:
            return check, None
    return None, "RuntimeError: check() is not the function the test code defined"


def _without_harness(tb):
    kept = []
    while tb is not None:
        if tb.tb_frame.f_code.co_filename != "<string>":
            kept.append(tb)
        tb = tb.tb_next
    result = None
    for entry in reversed(kept):
        result = type(entry)(result, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return result


def _report(exc, stream, *, _hook=sys.__excepthook__):
    try:
        seen, todo = set(), [exc]
        while todo:
            current = todo.pop()
            if current is None or id(current) in seen:
                continue
            seen.add(id(current))
            current.__traceback__ = _without_harness(current.__traceback__)
            todo += [current.__cause__, current.__context__]
        _hook(type(exc), exc, exc.__traceback__)
    except BaseException:
        stream.write("%s: %s\n" % (type(exc).__name__, exc))


def _flush(*streams):
    for stream in streams:
        try:
            stream.flush()
        except BaseException:
            pass


def _harness_main():
    import os

    base, entry_point = sys.argv[1], sys.argv[2]
    root = os.path.realpath(os.getcwd())
    stdout, stderr, exit_, audit = sys.stdout, sys.stderr, os._exit, sys.audit
    pass_event = PASS_EVENT
    run, get_check, report, flush, base_exception = exec, _get_check, _report, _flush, BaseException
    exit_failed, exit_harness = EXIT_FAILED, EXIT_HARNESS
    try:
        code_obj = _compile_file(base + "/candidate.py")
        test_obj = _compile_file(base + "/tests.py")
    except BaseException as exc:
        report(exc, stderr)
        flush(stderr)
        exit_(EXIT_SYNTAX)
    _install_guard(root, os.path.join(base, "passed"), sys._getframe())
    namespace = {"__name__": "__candidate__"}
    try:
        run(code_obj, namespace)
        run(test_obj, namespace)
        check, problem = get_check(namespace, test_obj)
        if problem is None and entry_point not in namespace:
            problem = "NameError: the candidate code does not define %r" % entry_point
        if problem is not None:
            stderr.write(problem + "\n")
            flush(stdout, stderr)
            exit_(exit_harness if problem.startswith("harness:") else exit_failed)
        check(namespace[entry_point])
    except base_exception as exc:
        report(exc, stderr)
        flush(stdout, stderr)
        exit_(exit_failed)
    flush(stdout, stderr)
    audit(pass_event)
    exit_(0)


_harness_main()
"""
