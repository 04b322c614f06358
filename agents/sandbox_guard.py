"""The policy layer of the sandbox: audit hooks in the sandboxed interpreter (second layer).

Standard library only: this text runs inside the sandbox, as the first part of the program
``kvshare.agents.sandbox`` composes (guard, wire codec, call server), never imported by kvshare.
The OS boundary (``sandbox_os``) is what contains hostile code; this layer turns the obvious
attempts into a clear ``PermissionError("sandbox: <event> is not allowed (...)")`` or
``ImportError("sandbox: ...")`` that the reviewer agent can read: process creation, signals to
other processes, sockets, native code (``ctypes``), writes/creates/deletes/renames/chmods
outside the working directory, links, ``chdir``, raising resource limits, tracing, the ``gc``
object-graph walkers and other threads' frames, reading process memory or environments under
``/proc``, and imports that would bypass the hooks.

Guard functions never look anything up in globals or builtins at call time (candidate code can
rewrite both): what they use is bound as default arguments or closure variables.

Over 300 lines: the guard's rule tables and checks are one unit; a split would only add a
fourth text to the program the sandbox runs.
"""

import _stat
import posix as _posix
import sys

WRITE_FLAGS = _posix.O_WRONLY | _posix.O_RDWR | _posix.O_CREAT | _posix.O_TRUNC | _posix.O_APPEND

DENIED = {
    "os.fork": "process creation",
    "os.forkpty": "process creation",
    "os.system": "process creation",
    "os.exec": "process creation",
    "os.posix_spawn": "process creation",
    "os.spawn": "process creation",
    "os.startfile": "process creation",
    "subprocess.Popen": "process creation",
    "pty.spawn": "process creation",
    "os.killpg": "signalling other processes",
    "os.link": "hard links",
    "os.symlink": "symbolic links",
    "os.chdir": "changing the working directory",
    "fcntl.ioctl": "device control",
    "resource.setrlimit": "changing resource limits",
    "resource.prlimit": "changing resource limits",
    "sys.addaudithook": "new audit hooks",
    "code.__new__": "building code objects",
    "cpython.PyInterpreterState_New": "sub-interpreters",
    "gc.get_objects": "object-graph introspection",
    "gc.get_referrers": "object-graph introspection",
    "gc.get_referents": "object-graph introspection",
    "sys._current_frames": "other threads' frames",
    "sys._current_exceptions": "other threads' frames",
    "sys.settrace": "tracing",
    "sys.setprofile": "tracing",
    "webbrowser.open": "process creation",
}
DENIED_PREFIXES = {
    "socket.": "network access",
    "ctypes.": "native code",
    "sqlite3.": "native file access",
    "syslog.": "system logging",
    "_winapi.": "process creation",
}
WRITE_RULES = {  # event -> ((path argument, dir_fd argument or -1), ...)
    "os.remove": ((0, 1),),
    "os.rmdir": ((0, 1),),
    "os.mkdir": ((0, 2),),
    "os.rename": ((0, 2), (1, 3)),
    "os.chmod": ((0, 2),),
    "os.chown": ((0, 3),),
    "os.utime": ((0, 3),),
    "os.truncate": ((0, -1),),
    "os.setxattr": ((0, -1),),
    "os.removexattr": ((0, -1),),
    "shutil.rmtree": ((0, 1),),
}
BLOCKED_MODULES = frozenset(
    {
        "ctypes",
        "_ctypes",
        "cffi",
        "_cffi_backend",
        "_posixsubprocess",
        "_posixshmem",
        "_multiprocessing",
        "_sqlite3",
        "_dbm",
        "_gdbm",
        "readline",
        "_tkinter",
    }
)
BLOCKED_MODULE_PREFIXES = ("_test", "_xx")
SECRET_NAMES = frozenset({"mem", "kmem", "kcore", "environ"})
WRITABLE_OUTSIDE = frozenset({"/dev/null"})
FUNCTION_ATTRS = frozenset({"__code__", "__defaults__", "__kwdefaults__"})
UNAUDITED = (  # functions without an audit event, replaced by refusals: (module, name, why)
    ("posix", "mkfifo", "creating special files"),
    ("os", "mkfifo", "creating special files"),
    ("posix", "mknod", "creating special files"),
    ("os", "mknod", "creating special files"),
    ("_signal", "pidfd_send_signal", "signalling other processes"),
    ("signal", "pidfd_send_signal", "signalling other processes"),
)


def _g_refuse(event, reason, *, _exc=PermissionError):
    return _exc(f"sandbox: {event} is not allowed ({reason})")


def _g_unavailable(name, reason, *, _refuse=_g_refuse):
    def unavailable(*args, **kwargs):
        raise _refuse(name, reason)

    return unavailable


def _g_normpath(path):
    parts: list[str] = []
    for part in path.split("/"):
        if part == "" or part == ".":
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return "/" + "/".join(parts)


def _g_fd_target(fd, *, _readlink=_posix.readlink, _oserror=OSError, _str=str):
    try:
        return _readlink("/proc/self/fd/" + _str(fd))
    except _oserror:
        return None


def _g_text(
    obj,
    *,
    _type=type,
    _str=str,
    _bytes=bytes,
    _int=int,
    _fspath=_posix.fspath,
    _fd_target=_g_fd_target,
    _typeerror=TypeError,
):
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


def _g_check_write(
    event,
    args,
    rule,
    root,
    *,
    _len=len,
    _text=_g_text,
    _base=_g_base,
    _absolute=_g_absolute,
    _refuse=_g_refuse,
):
    for index, dir_index in rule:
        if index >= _len(args):
            continue
        text = _text(args[index])
        if text is None:
            raise _refuse(event, "unrecognised path argument")
        path = _absolute(text, _base(args, dir_index, root))
        if not path.startswith(root + "/"):
            raise _refuse(event, f"writing outside the sandbox directory: {path!r}")


def _g_check_open(
    args,
    root,
    *,
    _type=type,
    _int=int,
    _len=len,
    _text=_g_text,
    _absolute=_g_absolute,
    _refuse=_g_refuse,
    _stat_path=_posix.stat,
    _oserror=OSError,
    _isdir=_stat.S_ISDIR,
    _isblk=_stat.S_ISBLK,
    _ischr=_stat.S_ISCHR,
    _mask=WRITE_FLAGS,
    _secret=SECRET_NAMES,
    _writable=WRITABLE_OUTSIDE,
):
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
        raise _refuse("open", f"writing outside the sandbox directory: {path!r}")
    if inside and not writing:
        return
    if not inside and path.rsplit("/", 1)[-1] in _secret:
        raise _refuse("open", f"reading process memory or environment: {path!r}")
    try:
        mode = _stat_path(path).st_mode
    except _oserror:
        return
    if inside and (_isblk(mode) or _ischr(mode)):
        raise _refuse("open", f"writing to a device node: {path!r}")
    if not inside and _isdir(mode):
        raise _refuse("open", f"opening a directory outside the sandbox: {path!r}")


def _g_check_import(
    args,
    prefixes,
    *,
    _type=type,
    _str=str,
    _len=len,
    _normpath=_g_normpath,
    _blocked=BLOCKED_MODULES,
    _blocked_prefixes=BLOCKED_MODULE_PREFIXES,
    _exc=ImportError,
):
    name = args[0] if _len(args) else None
    if _type(name) is not _str:
        raise _exc("sandbox: import of a non-str module name is not allowed")
    top = name.partition(".")[0]  # type: ignore[union-attr]
    if name in _blocked or top in _blocked or top.startswith(_blocked_prefixes):
        raise _exc(f"sandbox: import of {name!r} is not allowed (it bypasses the guard)", name=name)
    filename = args[1] if _len(args) > 1 else None
    if filename is None:
        return
    if _type(filename) is not _str or not _normpath(filename).startswith(prefixes):
        raise _exc(
            f"sandbox: import of {name!r} is not allowed (native code from {filename!r})",
            name=name,
        )


def _g_check_kill(args, *, _len=len, _getpid=_posix.getpid, _refuse=_g_refuse):
    if _len(args) < 1 or args[0] != _getpid():
        raise _refuse("os.kill", "signalling other processes")


def install_guard(root):
    import os.path
    from types import MappingProxyType

    denied = MappingProxyType(dict(DENIED))
    denied_prefixes = tuple(DENIED_PREFIXES.items())
    write_rules = MappingProxyType(dict(WRITE_RULES))
    function_attrs, function_type, type_ = FUNCTION_ATTRS, type(_g_refuse), type
    refuse, check_write, check_open = _g_refuse, _g_check_write, _g_check_open
    check_import, check_kill = _g_check_import, _g_check_kill
    raw = (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)
    prefixes = tuple({_g_normpath(p) + "/" for p in raw + tuple(map(os.path.realpath, raw))})
    harness_globals = globals()

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

    for module_name, name, why in UNAUDITED:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, name):
            setattr(module, name, _g_unavailable(module_name + "." + name, why))
    sys.addaudithook(policy)
    for name in list(sys.modules):
        if name.partition(".")[0] in BLOCKED_MODULES:
            del sys.modules[name]
