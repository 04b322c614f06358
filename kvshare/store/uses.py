"""Who uses which stored segment: the (session, agent) users a tiered store ranks by.

Rules (``kvshare.store.tiered.TieredStore`` applies them under its lock):

- a call's new trace holds its whole prompt, so its writer uses only that trace from then on
  (whatever it read before is in it), and the agents expected to read it (``readers``: the
  hinted next ones) use it instead of the writer's older traces; a store drops the links a
  new trace supersedes *before* it makes room for it (``retire``), else an agent's last
  trace, kept alive by links that are already stale, pushes out what the next agent needs;
- a user whose call left no trace uses exactly what it read;
- the *head* a user reads again: the common prefix of its prompt with its last trace, n
  tokens short of the whole (a new input behind the same role prompt: its traces may be cut
  to their first n, ``kvshare.store.trim``), or 0 when it read all of it (a conversation that goes
  on). Remembered for the last ``MAX_USERS`` users.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from kvshare.model.prompt import common_prefix
from kvshare.store.contract import StoreKey, User

MAX_USERS = 1000  # users whose last trace and head length are remembered


class SegmentInfo(NamedTuple):
    """A stored segment as the scheduler sees it. ``users``: (session, agent) pairs that use
    it; ``shared_prefix``: a system prompt or tool block, a candidate for pinning."""

    key: Hashable
    nbytes: int
    users: Collection[tuple[str, str]]
    last_used_tick: int
    shared_prefix: bool = False


class Uses:
    """Links between users and the entries of ``entries`` (objects with ``key``, ``tokens``,
    ``users``: a set of users, ``writer``: the user whose call computed it, or None), kept
    both ways; per user, its last trace's tokens and its head length (``heads``). Not
    thread-safe: the store locks around it."""

    def __init__(self, entries: Mapping[StoreKey, Any]) -> None:
        self._entries = entries
        self._by_user: dict[User, set[StoreKey]] = {}
        self.heads: OrderedDict[User, int] = OrderedDict()
        self._last: OrderedDict[User, tuple[int, ...]] = OrderedDict()

    def link(self, e: Any, user: User) -> None:
        e.users.add(user)
        self._by_user.setdefault(user, set()).add(e.key)

    def unlink(self, e: Any, user: User) -> None:
        e.users.discard(user)
        keys = self._by_user.get(user)
        if keys is not None:
            keys.discard(e.key)
            if not keys:
                del self._by_user[user]

    def forget(self, e: Any) -> None:
        """``e`` leaves the store: no user uses it any more."""
        for user in list(e.users):
            self.unlink(e, user)

    def retire(self, user: User, readers: Iterable[str], keep: StoreKey | None = None) -> None:
        """Drop the links a new trace (``keep``, once stored) of ``user`` supersedes: all of
        ``user``'s own, and the ``readers``' links to older traces ``user`` wrote."""
        session, agent = user
        if session is None or agent is None:
            return
        for key in self._by_user.get(user, set()) - {keep}:
            self.unlink(self._entries[key], user)
        for reader in readers:
            for key in self._by_user.get((session, reader), set()) - {keep}:
                if self._entries[key].writer == user:
                    self.unlink(self._entries[key], (session, reader))

    def written(self, e: Any, user: User, readers: Iterable[str]) -> None:
        """``e`` is ``user``'s newest trace: it and the ``readers`` use it (nothing older)."""
        session, agent = user
        if session is None or agent is None:
            return
        readers = tuple(readers)
        self.retire(user, readers, keep=e.key)
        if e.writer is None:
            e.writer = user
        self.link(e, user)
        for reader in readers:
            self.link(e, (session, reader))

    def record(
        self, read: Iterable[StoreKey], wrote: Any, user: User, readers: Iterable[str],
        prompt: Sequence[int],
    ) -> None:  # fmt: skip
        """One finished call of ``user`` (``wrote``: the entry of its trace, or None; the
        links are made already when the store's ``put`` was given the user)."""
        self._learn_head(user, prompt, wrote)
        if wrote is not None:
            if user not in wrote.users:
                self.written(wrote, user, readers)
            return
        read = set(read)
        if user[1] is not None:
            for key in self._by_user.get(user, set()) - read:
                self.unlink(self._entries[key], user)
        for key in read:
            if (entry := self._entries.get(key)) is not None:
                self.link(entry, user)

    def _learn_head(self, user: User, prompt: Sequence[int], wrote: Any) -> None:
        """How much of its last trace ``user``'s prompt starts with."""
        if user[0] is None or user[1] is None:
            return
        last = self._last.get(user)
        if prompt and last is not None:
            n = common_prefix(prompt, last)
            self.heads[user] = n if n < len(last) - 1 else 0
            self.heads.move_to_end(user)
        if wrote is not None:
            self._last[user] = wrote.tokens
            self._last.move_to_end(user)
        for table in (self.heads, self._last):
            while len(table) > MAX_USERS:
                table.popitem(last=False)

    def keys_of(self, users: Iterable[User]) -> set[StoreKey]:
        """Keys of the entries any of ``users`` uses."""
        return set().union(*(self._by_user.get(u, set()) for u in users))

    def clear(self) -> None:
        self._by_user.clear()
        self.heads.clear()
        self._last.clear()
