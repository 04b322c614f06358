"""Values across the sandbox's wall: plain data only, as one JSON line per message.

Standard library only: this text also runs inside the sandbox (the second part of the program
``kvshare.agents.sandbox`` composes). Both sides use it: the harness outside sends a call's
arguments, the call server inside sends back what the candidate returned. Only plain data
crosses (None, bool, int, float with nan/inf, str, bytes, list, tuple, dict, set, frozenset),
as tagged JSON, so a value from the candidate is never an object with behaviour of its own (an
``__eq__`` that always says yes); anything else is :class:`WireError`. Decoding is bounded in
depth and the reader caps a line's length.
"""

import json

MAX_DEPTH = 64
MAX_LINE = 1 << 22  # bytes of one message


class WireError(ValueError):
    """A value that cannot cross, or a message that is not one of ours."""


def encode(value, depth=0):
    """``value`` as tagged JSON-able data (WireError for anything but plain data)."""
    if depth > MAX_DEPTH:
        raise WireError(f"nested deeper than {MAX_DEPTH}")
    kind = type(value)
    if value is None or kind is bool or kind is str:
        return ["v", value]
    if kind is int:
        return ["i", hex(value)]
    if kind is float:
        return ["f", repr(value)]
    if kind is bytes:
        return ["y", value.hex()]
    tags: dict[type, str] = {list: "l", tuple: "t", set: "s", frozenset: "z"}
    if kind in tags:
        return [tags[kind], [encode(v, depth + 1) for v in value]]
    if kind is dict:
        return ["d", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]]
    raise WireError(f"a {kind.__name__} is not plain data")


def decode(data, depth=0):
    """The value ``encode`` gave ``data`` (WireError for anything ``encode`` never makes)."""
    if depth > MAX_DEPTH or type(data) is not list or len(data) != 2:
        raise WireError("not a wire value")
    tag, body = data
    try:
        if tag == "v" and (body is None or type(body) in (bool, str)):
            return body
        if tag == "i":
            return int(body, 16)
        if tag == "f":
            return float(body)
        if tag == "y":
            return bytes.fromhex(body)
        if tag in ("l", "t", "s", "z"):
            items = [decode(v, depth + 1) for v in body]
            return {"l": list, "t": tuple, "s": set, "z": frozenset}[tag](items)
        if tag == "d":
            return {decode(k, depth + 1): decode(v, depth + 1) for k, v in body}
    except (TypeError, ValueError) as exc:
        raise WireError(f"bad {tag!r} value: {exc}") from None
    raise WireError(f"unknown tag {tag!r}")


def message(**fields):
    """One message: a JSON object on one line, as bytes."""
    return (json.dumps(fields, separators=(",", ":")) + "\n").encode()


def parse(line):
    """The fields of one message line (WireError when it is not a JSON object)."""
    if len(line) > MAX_LINE:
        raise WireError(f"a message longer than {MAX_LINE} bytes")
    try:
        fields = json.loads(line)
    except (ValueError, RecursionError):
        raise WireError(f"not a message: {line[:80]!r}") from None
    if type(fields) is not dict:
        raise WireError(f"not a message: {line[:80]!r}")
    return fields
