"""Token-level radix tree of computed KV: exact longest-prefix reuse (vLLM/SGLang style)."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from kvshare.kernels import KV, slice_tokens
from kvshare.model.prompt import common_prefix


@dataclass(eq=False)
class _Node:
    """An edge of ``tokens`` with their KV [L, H, len(tokens), D] at absolute positions."""

    tokens: tuple[int, ...]
    kv: KV | None
    parent: _Node | None
    children: dict[int, _Node] = field(default_factory=dict)
    last_used: int = 0
    scope: Hashable = None  # roots only: the scope they are the root of

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes if self.kv is not None else 0


def _own(kv: KV, start: int, end: int) -> KV:
    """A copy of tokens [start, end) so a node never pins a larger tensor."""
    part = slice_tokens(kv, start, end)
    return KV(part.keys.clone(), part.values.clone())


class RadixCache:
    """Per-scope radix trees over token ids with a hard byte budget and LRU leaf eviction.

    Contract: ``match`` returns the KV of the longest stored prefix of ``ids`` in that scope
    (never another scope's); ``bytes_used <= budget_bytes`` at every instant (room is made
    before an insert; an insert that cannot fit is refused); a scope whose tree empties is
    removed. Scopes are any hashable keys compared by equality. Thread-safe.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = int(budget_bytes)
        self._roots: dict[Hashable, _Node] = {}
        self._bytes = 0
        self._tick = itertools.count(1)
        self._lock = threading.Lock()

    @property
    def bytes_used(self) -> int:
        return self._bytes

    @property
    def scopes(self) -> int:
        """Number of scopes with a tree."""
        return len(self._roots)

    def match(self, scope: Hashable, ids: Sequence[int]) -> tuple[int, list[KV]]:
        """Length of the longest cached prefix of ``ids`` and its KV parts, in order."""
        with self._lock:
            node = self._roots.get(scope)
            parts: list[KV] = []
            i = 0
            tick = next(self._tick)
            while node is not None and i < len(ids):
                child = node.children.get(ids[i])
                if child is None or child.kv is None:
                    break
                n = common_prefix(child.tokens, ids[i:])
                child.last_used = tick
                parts.append(child.kv if n == len(child.tokens) else slice_tokens(child.kv, 0, n))
                i += n
                if n < len(child.tokens):
                    break
                node = child
            return i, parts

    def _path(self, scope: Hashable, ids: Sequence[int], tick: int) -> tuple[int, set[int]]:
        """Tokens of ``ids`` already stored, and ids of the nodes on that path (touched)."""
        node, i, path = self._roots.get(scope), 0, set()
        while node is not None and i < len(ids):
            path.add(id(node))
            child = node.children.get(ids[i])
            if child is None:
                break
            n = common_prefix(child.tokens, ids[i:])
            child.last_used = tick
            path.add(id(child))
            i += n
            if n < len(child.tokens):
                break
            node = child
        return i, path

    def insert(self, scope: Hashable, ids: Sequence[int], kv: KV) -> bool:
        """Store ``ids`` with their KV [L, H, len(ids), D] (positions 0..len-1).

        Room is made first (least recently used leaves off the path of ``ids``); returns
        False, storing nothing, when the new tokens cannot fit in the budget.
        """
        if kv.length != len(ids):
            raise ValueError(f"insert: {len(ids)} ids but KV of {kv.length} tokens")
        if not ids:
            return True
        with self._lock:
            tick = next(self._tick)
            have, path = self._path(scope, ids, tick)
            need = kv.nbytes // kv.length * (len(ids) - have)
            if need > self.budget_bytes:
                return False
            self._evict(self.budget_bytes - need, path)
            if self._bytes + need > self.budget_bytes:
                return False
            self._add(scope, ids, kv, tick)
            return True

    def _add(self, scope: Hashable, ids: Sequence[int], kv: KV, tick: int) -> None:
        node = self._roots.get(scope)
        if node is None:
            node = self._roots[scope] = _Node((), None, None, scope=scope)
        i = 0
        while i < len(ids):
            child = node.children.get(ids[i])
            if child is None:
                leaf = _Node(tuple(ids[i:]), _own(kv, i, len(ids)), node, last_used=tick)
                node.children[ids[i]] = leaf
                self._bytes += leaf.nbytes
                break
            n = common_prefix(child.tokens, ids[i:])
            if n < len(child.tokens):
                child = self._split(child, n)
            child.last_used = tick
            node, i = child, i + n

    def _split(self, child: _Node, n: int) -> _Node:
        """Split ``child``'s edge after n tokens; returns the new upper node (same bytes)."""
        assert child.parent is not None and child.kv is not None
        upper = _Node(
            child.tokens[:n], _own(child.kv, 0, n), child.parent, last_used=child.last_used
        )
        child.parent.children[child.tokens[0]] = upper
        old_bytes = child.nbytes
        child.kv = _own(child.kv, n, len(child.tokens))
        child.tokens = child.tokens[n:]
        child.parent = upper
        upper.children[child.tokens[0]] = child
        self._bytes += upper.nbytes + child.nbytes - old_bytes
        return upper

    def _leaves(self, protect: set[int]) -> list[_Node]:
        out, stack = [], list(self._roots.values())
        while stack:
            node = stack.pop()
            if not node.children and node.parent is not None and id(node) not in protect:
                out.append(node)
            stack.extend(node.children.values())
        return out

    def shrink_to(self, nbytes: int) -> None:
        """Evict least recently used leaves until at most ``nbytes`` are held (0: empty; a
        scope whose tree empties is removed)."""
        with self._lock:
            self._evict(nbytes, set())

    def _evict(self, target: int, protect: set[int]) -> None:
        """Drop least recently used leaves (not in ``protect``) until ``bytes <= target``."""
        while self._bytes > target:
            leaves = self._leaves(protect)
            if not leaves:
                return
            for victim in sorted(leaves, key=lambda n: n.last_used):
                self._drop(victim)
                if self._bytes <= target:
                    return

    def _drop(self, leaf: _Node) -> None:
        parent = leaf.parent
        assert parent is not None
        del parent.children[leaf.tokens[0]]
        self._bytes -= leaf.nbytes
        if parent.parent is None and not parent.children:  # an empty root: the scope is gone
            self._roots.pop(parent.scope, None)

    def clear(self) -> None:
        with self._lock:
            self._roots.clear()
            self._bytes = 0
