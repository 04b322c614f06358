"""Escape attempts against the code sandbox, each twice: through ``run_tests`` (the whole
stack: OS boundary, guard, verdict outside) and as raw code in the jail with no guard at all
(``sandbox_os`` alone: the boundary must hold by itself). Every attempt's effect is checked
on the host, never taken from the sandbox's word. ``pytest tests/agents/test_sandbox_escapes.py -s``
prints one line per attempt and layer."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from kvshare.agents.sandbox import SandboxLimits, run_tests
from kvshare.agents.sandbox_os import jail

ROOT = Path(__file__).resolve().parents[2]
TEST = "SECRET = 'hidden-test-7c41'\n\n\ndef check(candidate):\n    assert candidate(5, 7) == 12\n"
ADD = "\n\ndef add(a, b):\n    return a + b\n"


@dataclass
class Host:
    """What the host holds for one attempt: a folder with a file to keep, a sleeper process
    and a listening socket, all outside the sandbox."""

    folder: Path
    sleeper: subprocess.Popen[bytes]
    server: socket.socket
    marker: str

    @property
    def keep(self) -> Path:
        return self.folder / "keep.txt"

    def connections(self) -> int:
        self.server.settimeout(0.2)
        count = 0
        try:
            while True:
                self.server.accept()[0].close()
                count += 1
        except OSError:
            return count


@pytest.fixture
def host(tmp_path: Path):
    (tmp_path / "keep.txt").write_text("keep")
    sleeper = subprocess.Popen(["sleep", "60"])
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield Host(tmp_path, sleeper, server, f"{time.monotonic_ns() % 10**9}.{os.getpid()}")
    sleeper.kill()
    sleeper.wait()
    server.close()


def lingering(marker: str) -> list[int]:
    """Host pids whose command line carries ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@dataclass(frozen=True)
class Attempt:
    """``code`` (a template over the host's paths) and the check that it did not escape."""

    code: str
    held: Callable[[Host, str], bool]  # (host, captured output) -> nothing escaped


ATTEMPTS = {
    "write outside": Attempt(
        "open({folder!r} + '/escaped', 'w').write('x')",
        lambda h, out: not (h.folder / "escaped").exists(),
    ),
    "rename outside": Attempt(
        "import os; os.rename({keep!r}, {folder!r} + '/moved')",
        lambda h, out: h.keep.read_text() == "keep",
    ),
    "delete outside": Attempt(
        "import os; os.remove({keep!r})", lambda h, out: h.keep.read_text() == "keep"
    ),
    "read /etc/shadow": Attempt(
        "print(open('/etc/shadow').read())", lambda h, out: "root:" not in out
    ),
    "read the project": Attempt(
        f"print(open({str(ROOT / 'README.md')!r}).read(100))", lambda h, out: "make demo" not in out
    ),
    "find the hidden tests": Attempt(  # every file it sees but /usr (the system's) and devices
        textwrap.dedent("""\
            import os
            needle = b'hidden-test-' + b'7c41'  # not spelt whole in this code's own argv
            def grab(path):
                try:
                    if needle in open(path, 'rb').read(1 << 20):
                        print('FOUND', path, flush=True)
                except Exception:
                    pass
            for path in ('/proc/self/cmdline', '/proc/self/environ', '../tests.py', 'tests.py'):
                grab(path)
            try:
                for top, dirs, files in os.walk('/'):
                    skip = ('/proc', '/sys', '/usr', '/dev')
                    dirs[:] = [d for d in dirs if os.path.join(top, d) not in skip]
                    for f in files:
                        grab(os.path.join(top, f))
            except Exception:
                pass
            print('searched')
            """),
        lambda h, out: "FOUND" not in out,
    ),
    "signal another process": Attempt(
        "import os, signal; os.kill({pid}, signal.SIGKILL)",
        lambda h, out: h.sleeper.poll() is None,
    ),
    "outlive the run": Attempt(
        textwrap.dedent("""\
            import os
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    os.execv('/usr/bin/sleep', ['sleep', {marker!r}])
                os._exit(0)
            """),
        lambda h, out: lingering(h.marker) == [],
    ),
    "socket to loopback": Attempt(
        "import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)",
        lambda h, out: h.connections() == 0,
    ),
    "fork bomb": Attempt(
        "import os\nwhile True:\n    os.fork()",
        lambda h, out: lingering("os.fork()") == [] and lingering("Server(encode") == [],
    ),
    "memory bomb": Attempt("x = bytearray(16 << 30)", lambda h, out: True),
    "crafted bytecode": Attempt(
        "import types\n"
        "c = (lambda: 0).__code__.replace(co_code=bytes([100, 255, 83, 0] * 8), co_consts=())\n"
        "types.FunctionType(c, {{}})()",
        lambda h, out: True,
    ),
}


def fill(code: str, h: Host) -> str:
    return code.format(
        folder=str(h.folder), keep=str(h.keep), pid=h.sleeper.pid, marker=h.marker,
        port=h.server.getsockname()[1],
    )  # fmt: skip


def jailed(code: str, timeout: float = 5.0) -> tuple[int, str]:
    """Raw ``code`` in the jail, no guard: (exit status, stdout + stderr)."""
    where = jail()
    with tempfile.TemporaryDirectory(prefix="kvshare-sandbox-") as d:
        work = Path(d) / "work"
        work.mkdir()
        where.own(work)
        try:
            out = subprocess.run(
                where.argv(work, ["-I", "-S", "-c", code]),
                capture_output=True, timeout=timeout, start_new_session=True,
                preexec_fn=where.preexec(1 << 30, 3, 1 << 20, 16),
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            return -1, (exc.stdout or b"").decode() + (exc.stderr or b"").decode()
    return out.returncode, (out.stdout + out.stderr).decode("utf-8", "replace")


@pytest.mark.parametrize("name", list(ATTEMPTS))
def test_the_jail_alone_holds(host, name):
    attempt = ATTEMPTS[name]
    status, out = jailed(fill(attempt.code, host))
    time.sleep(0.1)  # anything it left would still be there
    held = attempt.held(host, out)
    print(f"\n[jail only] {name}: {'held' if held else 'ESCAPED'} (exit {status})")
    assert held, out[-2000:]


@pytest.mark.parametrize("name", list(ATTEMPTS))
def test_the_whole_sandbox_holds_and_never_passes(host, name):
    attempt = ATTEMPTS[name]
    code = fill(attempt.code, host) + "\n" + ADD.replace("a + b", "a * b")  # a wrong answer
    result = run_tests(code, TEST, "add", SandboxLimits(timeout_s=3.0))
    time.sleep(0.1)
    held = attempt.held(host, result.output)
    print(f"\n[run_tests] {name}: {'held' if held else 'ESCAPED'}, {result.status}")
    assert held and not result.passed, result


def test_a_crash_of_crafted_bytecode_is_an_error_and_contained():
    status, _ = jailed(ATTEMPTS["crafted bytecode"].code.replace("{{}}", "{}"))
    assert status in (128 + signal.SIGSEGV, -signal.SIGSEGV, 1)  # 1: refused by the VM


FORGERIES = {
    "print passed": "print('passed')",
    "exit 0 first": "import os; os._exit(0)",
    "a pass record": "open('passed', 'w').write('passed\\n')",
    "forged replies": (
        "import os\n"
        "for fd in range(3, 12):\n"
        "    try:\n"
        '        os.write(fd, b\'{"ready": ["add"]}\\n\' + b\'{"ok": ["v", true]}\\n\' * 4)\n'
        "    except OSError:\n"
        "        pass"
    ),
    "rewire the server": (
        "import sys\n"
        "server = [v for v in sys._getframe(1).f_globals.values()"
        " if isinstance(v, type) and v.__name__ == 'Server'][0]\n"
        "server.call = lambda self, ns, line: self.send(ok=['v', True])"
    ),
}


@pytest.mark.parametrize("name", list(FORGERIES))
def test_a_pass_cannot_be_forged(name):
    code = FORGERIES[name] + ADD.replace("a + b", "a - b")
    result = run_tests(code, TEST, "add", SandboxLimits(timeout_s=3.0))
    assert not result.passed and result.status != "passed", result
