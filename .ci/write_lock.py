"""Write requirements.lock from `pip freeze --all --exclude-editable` on stdin (make upgrade).

    pip freeze --all --exclude-editable | python .ci/write_lock.py OLD_LOCK > requirements.lock

Keeps OLD_LOCK's header (its comment lines before the first pin) and every pin that carries a
``# hold: <reason>`` comment, verbatim; drops local version labels (``torch==2.13.0+cpu`` is
pinned as ``2.13.0``, which a CUDA build of the same release also satisfies); one pin a line,
sorted by name. Standard library only.
"""

from __future__ import annotations

import re
import sys


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def main(old_lock: str) -> None:
    header: list[str] = []
    held: dict[str, str] = {}
    with open(old_lock, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for index, line in enumerate(lines):
        pin = line.split("#", 1)[0].strip()
        if pin and "# hold:" in line:
            held[canonical(pin.split("==")[0])] = line
        elif not pin and len(header) == index:  # the comment block before the first pin
            header.append(line)
    pins: dict[str, str] = {}
    for line in sys.stdin.read().splitlines():
        if "==" not in line or line.startswith("#"):
            continue
        name, version = line.split("==", 1)
        pins[canonical(name)] = held.get(canonical(name), f"{name}=={version.split('+')[0]}")
    while header and not header[-1].strip():
        header.pop()
    print("\n".join([*header, "", *(pins[k] for k in sorted(pins))]))


if __name__ == "__main__":
    main(sys.argv[1])
