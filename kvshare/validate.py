"""Argument checks shared by configs and the request boundary: named errors, never asserts.

Every check returns the value normalised to a plain Python type (numpy integers to ``int``,
reals to ``float``) or raises :class:`ConfigError` with a message naming the argument.

Wing: the core. May import: ``kvshare.errors``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from kvshare.errors import ConfigError


def _name(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """An integer (not a bool, not a float) in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an int, got {_name(value)}")
    out = int(value)
    if (lo is not None and out < lo) or (hi is not None and out > hi):
        raise ConfigError(f"{name} must be in [{lo}, {hi}], got {out}")
    return out


def check_float(
    name: str,
    value: Any,
    lo: float = -math.inf,
    hi: float = math.inf,
    *,
    open_lo: bool = False,
) -> float:
    """A finite real number (not a bool) in ``[lo, hi]`` (``(lo, hi]`` with ``open_lo``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a number, got {_name(value)}")
    out = float(value)
    low_ok = out > lo if open_lo else out >= lo
    if not math.isfinite(out) or not low_ok or out > hi:
        interval = f"{'(' if open_lo else '['}{lo}, {hi}]"
        raise ConfigError(f"{name} must be a finite number in {interval}, got {value!r}")
    return out


def check_bool(name: str, value: Any) -> bool:
    """Strictly ``True`` or ``False`` (``"no"`` is not a boolean)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {_name(value)}")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """One of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    return value


def check_str_tuple(name: str, value: Any, allowed: tuple[str, ...] | None = None) -> tuple:
    """A str or a list/tuple of non-empty str (``allowed`` restricts them), as a tuple."""
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) and s for s in items):
        raise ConfigError(f"{name} must be a str or a list of non-empty str, got {_name(value)}")
    bad = [s for s in items if allowed is not None and s not in allowed]
    if bad:
        raise ConfigError(f"{name}: unknown value(s) {bad}; allowed: {', '.join(allowed or ())}")
    return tuple(items)
