"""Sharing scopes: who may reuse whose KV, as typed keys (never string concatenation).

Wing: the core. May import: ``kvshare.errors``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvshare.errors import ScopeError


@dataclass(frozen=True)
class Scope:
    """The sharing scope a call's KV, traces and everything learned from them belong to.

    kind: ``global``, ``tenant`` or ``session`` (``EngineConfig.share_scope``).
    tenant, session: the ids that define the scope (None where ``kind`` ignores them).
    anonymous: a session-scoped call without a session id: it shares with no one, so nothing
        it computes or learns is kept.
    Two scopes are equal only when every field is equal: distinct (tenant, session) pairs
    never meet, whatever their text (``"x/s:y"`` stays a tenant id, not a separator).
    """

    kind: str
    tenant: str | None = None
    session: str | None = None
    anonymous: bool = False


GLOBAL = Scope("global")


def check_id(name: str, value: Any) -> str | None:
    """``value`` if it is a str that encodes as UTF-8, or None; anything else raises
    :class:`ScopeError`.

    Ids are never stringified: ``0``, ``False`` and ``""`` would otherwise fall into one scope,
    and ``1`` would share with ``"1"``. An id with a lone surrogate is refused here, before any
    state changes (it could not be written to a file, a log or the wire later).
    """
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ScopeError(
                f"{name} is not valid Unicode text ({exc.reason} at position {exc.start}, e.g. "
                f"a lone surrogate): decode the source bytes properly"
            ) from None
        return "" + value  # a plain str, also for str subclasses (enums)
    raise ScopeError(
        f"{name} must be a str or None, got {type(value).__name__} {value!r}; pass the id as "
        f"a string (ids of other types are not converted, so that distinct ids never collide)"
    )


def scope_of(share_scope: str, tenant: str | None, session: str | None) -> Scope:
    """The scope of a call by ``tenant`` / ``session`` under ``share_scope`` (ids checked)."""
    tenant, session = check_id("tenant", tenant), check_id("session", session)
    if share_scope == "global":
        return GLOBAL
    if share_scope == "tenant":
        return Scope("tenant", tenant)
    return Scope("session", tenant, session, anonymous=session is None)
