"""One sandboxed candidate process and the harness's side of its wire (``kvshare.agents.sandbox``).

:class:`CandidateRun` writes the candidate into a fresh directory, starts the composed program
(``sandbox_guard`` + ``sandbox_wire`` + ``sandbox_child``) in the jail (``sandbox_os``) with two
pipes, waits for it to say which names it defines, and turns calls of :meth:`remote` stand-ins
into requests and replies, all under one wall-clock deadline. Whatever the candidate writes on
the reply pipe is parsed as plain data or ends the run; nothing it sends is executed here.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from kvshare.agents.sandbox_os import Jail
from kvshare.agents.sandbox_wire import WireError, decode, encode, message, parse

EXIT_SYNTAX = 3  # sandbox_child.EXIT_SYNTAX (that text runs alone in the sandbox)
_PARTS = ("sandbox_guard.py", "sandbox_wire.py", "sandbox_child.py")


@cache
def program() -> str:
    """The program the sandbox runs: guard, wire codec and call server, as one text."""
    texts = [Path(__file__).with_name(name).read_text(encoding="utf-8") for name in _PARTS]
    return "\n".join(texts) + "\nServer(encode, decode, message, parse).serve(install_guard)\n"


class RunTimeout(Exception):
    """The run hit its wall-clock or CPU-time limit (it is killed)."""


class RunEnded(Exception):
    """The candidate cannot answer (it ended, crashed, defines no entry point or failed at
    import); ``status`` is the verdict that follows."""

    def __init__(self, status: str, text: str) -> None:
        super().__init__(text)
        self.status = status


class CandidateRun:
    """The sandboxed process of one run (a context manager: killed, whole, on exit).

    base: a fresh private directory; ``base/work`` becomes the run's ``/sandbox`` (it holds
    ``candidate.py``), ``base/stdout`` and ``base/stderr`` stay outside the run's view.
    ``names``: the entry point first, then the other names the tests may use.
    """

    def __init__(self, where: Jail, base: Path, code: str, names: list[str], limits: Any):
        self.where, self.base, self.code, self.names, self.limits = where, base, code, names, limits
        self.blocked = False
        self._buffer = b""
        self._proc: subprocess.Popen[bytes] | None = None
        self._req = self._rep = -1
        self._deadline = 0.0

    def __enter__(self) -> CandidateRun:
        work = self.base / "work"
        work.mkdir()
        (work / "candidate.py").write_bytes(self.code.encode("utf-8", "surrogatepass"))
        self.where.own(work)
        req_r, self._req = os.pipe()
        self._rep, rep_w = os.pipe()
        lim = self.limits
        argv = ["-I", "-S", "-B", "-X", "utf8", "-c", program(), str(req_r), str(rep_w)]
        with (
            open(self.base / "stdout", "wb") as out,
            open(self.base / "stderr", "wb") as err,
            contextlib.ExitStack() as fds,
        ):
            for fd in (req_r, rep_w):
                fds.callback(os.close, fd)
            self._deadline = time.monotonic() + lim.timeout_s
            self._proc = subprocess.Popen(
                self.where.argv(work, [*argv, *self.names]),
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, pass_fds=(req_r, rep_w),
                start_new_session=True, close_fds=True,
                preexec_fn=self.where.preexec(
                    lim.memory_bytes, lim.cpu_limit_s, lim.file_bytes, lim.processes
                ),
            )  # fmt: skip
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the pipes and kill the run: its PID namespace, and all in it, goes."""
        for fd in (self._req, self._rep):
            if fd >= 0:
                os.close(fd)
        self._req = self._rep = -1
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:  # not reaped: its pid (the group's id) is still reserved
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    # --- the wire --------------------------------------------------------------------------

    def start(self) -> list[str]:
        """The names the candidate defines (after it ran); RunEnded / RunTimeout otherwise."""
        reply = self._reply()
        if "ready" in reply and isinstance(reply["ready"], list):
            return [n for n in reply["ready"] if n in self.names]
        if "missing" in reply:
            missing = reply["missing"]
            raise RunEnded("failed", f"NameError: the candidate code does not define {missing!r}")
        raise self._raised(reply)

    def remote(self, name: str) -> Callable[..., Any]:
        """A stand-in for the candidate's function ``name``: plain data in, plain data out."""

        def call(*args: Any) -> Any:
            try:
                line = message(call=name, args=encode(list(args)))
            except WireError as exc:
                raise TypeError(f"sandbox: the arguments cannot cross: {exc}") from None
            self._send(line)
            reply = self._reply()
            if "ok" not in reply:
                raise self._raised(reply)
            try:
                return decode(reply["ok"])
            except WireError as exc:
                raise TypeError(f"{name} returned what is not plain data: {exc}") from None

        call.__name__ = call.__qualname__ = name
        return call

    def _raised(self, reply: dict[str, Any]) -> BaseException:
        """The exception a reply reports, as the builtin of that name where there is one."""
        kind, text = str(reply.get("raised", "RuntimeError")), str(reply.get("text", ""))
        if text.startswith("sandbox: "):
            self.blocked = True
        cls = getattr(builtins, kind, None)
        if not (isinstance(cls, type) and issubclass(cls, Exception)):
            return RuntimeError(f"{kind}: {text}")
        try:
            return cls(text)
        except Exception:
            return RuntimeError(f"{kind}: {text}")

    def _send(self, line: bytes) -> None:
        while line:
            if not select.select([], [self._req], [], self._left())[1]:
                raise self._timeout()
            try:
                line = line[os.write(self._req, line) :]
            except BrokenPipeError:
                raise self._ended() from None

    def _reply(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            if not select.select([self._rep], [], [], self._left())[0]:
                raise self._timeout()
            chunk = os.read(self._rep, 1 << 16)
            if not chunk:
                raise self._ended()
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            return parse(line)
        except WireError as exc:
            raise RunEnded("failed", f"the candidate wrote on the harness's pipe: {exc}") from None

    def _left(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise self._timeout()
        return left

    def _timeout(self) -> RunTimeout:
        return RunTimeout(f"timeout: killed after the {self.limits.timeout_s:g} s limit")

    def _ended(self) -> BaseException:
        """Why the program stopped answering (it is reaped here)."""
        if self._proc is None:
            return RunEnded("error", "error: the run was already closed")
        try:
            code = self._proc.wait(timeout=max(self._deadline - time.monotonic(), 0.05))
        except subprocess.TimeoutExpired:
            return self._timeout()
        sig = code - 128 if code > 128 else -code if code < 0 else 0
        if sig == signal.SIGXCPU:
            return RunTimeout(f"timeout: killed at the {self.limits.cpu_limit_s} s CPU-time limit")
        if sig:
            return RunEnded("error", f"error: the program was killed by {_signal_name(sig)}")
        if code == EXIT_SYNTAX:
            return RunEnded("error", "error: the candidate code does not compile")
        return RunEnded("failed", "failed: the program exited before check() completed")

    def outputs(self) -> list[str]:
        """The candidate's stdout and stderr (after the run is killed)."""
        self.__exit__()
        return [_read(self.base / name) for name in ("stdout", "stderr")]


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", "replace")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
