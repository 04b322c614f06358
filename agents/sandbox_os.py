"""The OS boundary around every sandboxed run (``kvshare.agents.sandbox``): bubblewrap.

Each run executes under ``bwrap`` (Debian's ``bubblewrap``; ``make install`` installs it where
it can) with:

* an unprivileged identity: a caller that is root first drops to ``nobody`` (uid/gid from the
  password database, 65534 by default), then ``bwrap`` makes a fresh user namespace in which
  that identity holds no capability (``--cap-drop ALL``); a caller that is not root runs it as
  itself, likewise without capabilities;
* new PID, network (a loopback of its own, no route anywhere), mount, IPC, UTS and cgroup
  namespaces and a new session; when the run ends its PID namespace goes, and every process
  in it with it (``--die-with-parent``: also when the caller dies);
* a minimal read-only view: ``/usr`` (the system interpreter and its standard library, with
  ``/usr/local`` and the distribution's ``dist-packages`` hidden), the ``/bin``, ``/lib``,
  ``/lib64`` links or folders, a private ``/proc`` and ``/dev``, an empty ``/tmp``; nothing of
  ``/etc``, ``/home``, ``/root`` or the project; the run's own writable directory at
  ``/sandbox`` (its working directory);
* resource limits set before ``bwrap`` starts and inherited by everything in the run:
  address space, CPU time, file size, no core files, and a process count (``RLIMIT_NPROC``
  for the run's user: the processes that user has now plus ``SandboxLimits.processes``).

Where ``bwrap`` is missing or cannot make its namespaces, :func:`jail` raises
:class:`~kvshare.errors.SandboxUnavailableError`: candidates never run under the policy layer
alone.
"""

from __future__ import annotations

import functools
import os
import pwd
import resource
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvshare.errors import SandboxUnavailableError

INSIDE = "/sandbox"  # the run's directory, as the run sees it
SYSTEM_PYTHON = "/usr/bin/python3"
_HIDDEN = ("/usr/local", "/usr/lib/python3/dist-packages")  # what a distro adds beside stdlib
_LINKS = ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")


@dataclass(frozen=True)
class Jail:
    """How this machine isolates a run. ``bwrap``: its path; ``python``: the interpreter the
    run executes (readable by ``user``); ``user``: (uid, gid) a root caller drops to, None
    when the caller is not root; ``view``: bwrap arguments of the read-only filesystem."""

    bwrap: str
    python: str
    user: tuple[int, int] | None
    view: tuple[str, ...]

    def argv(self, workdir: Path, program: Sequence[str]) -> list[str]:
        """The command that runs ``program`` (argv after the interpreter) in ``workdir``."""
        return [
            self.bwrap, "--unshare-all", "--unshare-user", "--die-with-parent",
            "--new-session", "--cap-drop", "ALL", *self.view, "--proc", "/proc",
            "--dev", "/dev", "--tmpfs", "/tmp", "--bind", str(workdir), INSIDE,
            "--chdir", INSIDE, "--clearenv", "--setenv", "HOME", INSIDE,
            "--setenv", "TMPDIR", INSIDE, "--setenv", "LANG", "C.UTF-8",
            "--setenv", "PATH", "/usr/bin:/bin", "--", self.python, *program,
        ]  # fmt: skip

    def own(self, path: Path) -> None:
        """Hand ``path`` (the run's directory) to the run's user, and let that user pass
        through its parent (search only: the parent's other files stay unlisted; the run
        itself never sees them, its view holds ``path`` alone)."""
        if self.user is not None:
            os.chown(path, *self.user)
            os.chmod(path.parent, 0o711)

    def preexec(
        self, memory: int, cpu_s: int, file_bytes: int, processes: int
    ) -> Callable[[], None]:
        """The ``preexec_fn`` of a run: limits first (raising them needs the privilege it
        drops), then the identity."""
        nproc = _processes_of(self.user[0] if self.user else os.getuid()) + processes
        return functools.partial(_enter, self.user, memory, cpu_s, file_bytes, nproc)


def _enter(
    user: tuple[int, int] | None, memory: int, cpu_s: int, file_bytes: int, nproc: int
) -> None:
    """In the forked child, before exec: limits, then drop to ``user``."""
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    if user is not None:
        os.setgroups([])
        os.setgid(user[1])
        os.setuid(user[0])


def _processes_of(uid: int) -> int:
    """How many processes ``uid`` runs now (RLIMIT_NPROC counts them all)."""
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                count += entry.stat().st_uid == uid
            except OSError:
                continue
    return count


def _readable_by_all(path: str) -> bool:
    """Whether anyone may read ``path`` and search every folder above it."""
    real = Path(os.path.realpath(path))
    try:
        if not real.stat().st_mode & stat.S_IROTH:
            return False
        return all(p.stat().st_mode & stat.S_IXOTH for p in real.parents)
    except OSError:
        return False


def _view() -> tuple[str, ...]:
    """bwrap arguments: /usr read-only, the top-level links or folders, extras hidden."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in _LINKS:
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    for hidden in _HIDDEN:
        if os.path.isdir(hidden):
            args += ["--tmpfs", hidden]
    return tuple(args)


def _user() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    try:
        nobody = pwd.getpwnam("nobody")
        return nobody.pw_uid, nobody.pw_gid
    except KeyError:
        return 65534, 65534


@functools.lru_cache(maxsize=1)
def jail() -> Jail:
    """This machine's jail, checked once by running ``true``-like Python inside it
    (SandboxUnavailableError, with the reason, when it cannot start)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailableError(
            "bubblewrap (bwrap) is not installed: `apt-get install bubblewrap` (make install "
            "does it as root); candidates are never run without OS isolation"
        )
    if not (os.access(SYSTEM_PYTHON, os.X_OK) and _readable_by_all(SYSTEM_PYTHON)):
        raise SandboxUnavailableError(f"the sandbox runs {SYSTEM_PYTHON}, which is missing")
    found = Jail(bwrap, os.path.realpath(SYSTEM_PYTHON), _user(), _view())
    with tempfile.TemporaryDirectory(prefix="kvshare-sandbox-probe-") as probe:
        found.own(Path(probe))
        out = subprocess.run(
            found.argv(Path(probe), ["-I", "-S", "-c", "print('ok')"]),
            capture_output=True, text=True, timeout=30,
            preexec_fn=found.preexec(1 << 30, 10, 1 << 20, 16),
        )  # fmt: skip
    if out.returncode != 0 or out.stdout.strip() != "ok":
        raise SandboxUnavailableError(
            f"bubblewrap cannot isolate a run here (exit {out.returncode}: "
            f"{out.stderr.strip()[-300:]}); user namespaces may be disabled"
        )
    return found
