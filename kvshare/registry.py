"""A registry of named implementations created lazily (policies, kernels, pools, tiers).

An optional backend (triton, faiss-gpu, redis) registers a creator that imports it only when
it is first asked for, so the package imports and works without it.

Wing: the core. May import: ``kvshare.errors``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from kvshare.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> creators of ``T``; ``create(name)`` calls the creator (imports happen there)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._creators: dict[str, Callable[[], T]] = {}

    def register(self, name: str, creator: Callable[[], T]) -> None:
        if name in self._creators:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._creators[name] = creator

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._creators)

    def create(self, name: str) -> T:
        """A new instance of ``name``; ConfigError naming the known ones otherwise."""
        creator = self._creators.get(name)
        if creator is None:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names)}"
            )
        return creator()
