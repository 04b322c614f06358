"""The call server that runs inside the sandbox: the third part of the program
``kvshare.agents.sandbox`` composes (after ``sandbox_guard`` and ``sandbox_wire``, whose names
it uses), run as ``python -I -S -c <program> <requests fd> <replies fd> <entry point> <name> ...``
in ``/sandbox``.

It compiles ``candidate.py`` (exit 3 on a syntax error, traceback on stderr), installs the
guard, runs the candidate, then tells the harness which of the asked names the candidate
defines as functions (``ready``) and serves calls: one request per line on the descriptor
``argv[1]`` (a name and its wire-encoded arguments), one reply per line on ``argv[2]`` (the
wire-encoded return value, or the exception's type and text; its traceback goes to stderr
for the reviewer). It never sees the tests and decides nothing: the harness outside runs ``check``
and judges, so whatever the candidate does to this process can only change the values it
returns.
"""

import posix
import sys

EXIT_SYNTAX = 3


class Server:
    """Answers the harness's calls; ``wire``: the ``sandbox_wire`` functions (encode, decode,
    message, parse), handed in because the program is one text."""

    def __init__(self, encode, decode, message, parse):
        self.encode, self.decode, self.message, self.parse = encode, decode, message, parse
        self.requests_fd, self.replies_fd = int(sys.argv[1]), int(sys.argv[2])

    def send(self, **fields):
        data = self.message(**fields)
        while data:
            data = data[posix.write(self.replies_fd, data) :]

    def requests(self):
        """Request lines, until the harness closes its end."""
        buffer = b""
        while True:
            chunk = posix.read(self.requests_fd, 1 << 16)
            if not chunk:
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                yield line

    def report(self, exc):
        """The candidate's traceback on stderr, its own frames only (for the reviewer)."""
        import traceback

        frames = [
            f for f in traceback.extract_tb(exc.__traceback__) if f.filename == "candidate.py"
        ]
        lines = ["Traceback (most recent call last):\n"] if frames else []
        lines += traceback.format_list(frames)
        lines += traceback.format_exception_only(type(exc), exc)
        sys.stderr.write("".join(lines))
        sys.stderr.flush()

    def raised(self, exc):
        """Reply with an exception of the candidate (its traceback goes to stderr)."""
        self.report(exc)
        self.send(raised=type(exc).__name__, text=str(exc)[:2000])

    def call(self, namespace, line):
        fields = self.parse(line)
        function = namespace.get(fields.get("call"))
        try:
            args = self.decode(fields.get("args"))
            reply = self.encode(function(*args))
        except BaseException as exc:  # the candidate's own failure, reported to the harness
            self.raised(exc)
            return
        sys.stdout.flush()
        self.send(ok=reply)

    def serve(self, install_guard):
        """Compile, guard, run the candidate, answer calls until the harness closes."""
        entry_point, names = sys.argv[3], sys.argv[3:]
        try:
            with open("candidate.py", encoding="utf-8") as fh:
                code = compile(fh.read(), "candidate.py", "exec", dont_inherit=True)
        except BaseException as exc:
            self.report(exc)
            posix._exit(EXIT_SYNTAX)
        install_guard(posix.getcwd())
        namespace = {"__name__": "__candidate__"}
        try:
            exec(code, namespace)
        except BaseException as exc:
            self.raised(exc)
            return
        found = [n for n in names if callable(namespace.get(n))]
        if entry_point not in found:
            self.send(missing=entry_point)
            return
        sys.stdout.flush()
        self.send(ready=found)
        for line in self.requests():
            self.call(namespace, line)
