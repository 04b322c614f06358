"""Tokenizing a rendered prompt piece by piece, with the pieces cached.

A fast tokenizer first splits its input at added tokens (``<|im_start|>``, ``<|im_end|>``...)
and then normalizes, pre-tokenizes and encodes every piece between them on its own. A chat
prompt is mostly pieces that earlier calls already sent (the shared document, earlier agents'
replies), so encoding each piece once and concatenating gives the whole text's ids and
offsets for a fraction of the work. The cache is used only where that equality holds by
construction (no added token with ``lstrip``/``rstrip``/``single_word``, no normalized added
token under a normalizer) and is checked against a whole-text encode on its first uses per
tokenizer; a mismatch turns it off for that tokenizer for good (logged once).
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from collections import OrderedDict
from typing import Any

log = logging.getLogger("kvshare.render")
Span = tuple[int, int]
Encoded = tuple[list[int], list[Span]]

MAX_CACHED_TOKENS = 1 << 19  # ~512K tokens of pieces (tens of MB at most)
VERIFY_FIRST = 4  # whole-text checks per tokenizer before the cache is trusted


class PieceCache:
    """Per-tokenizer LRU of piece -> (ids, offsets from the piece's start)."""

    def __init__(self, tokenizer: Any, max_tokens: int = MAX_CACHED_TOKENS) -> None:
        self.backend = tokenizer._tokenizer
        self.max_tokens = max_tokens
        self.pieces: OrderedDict[str, Encoded] = OrderedDict()
        self.tokens = 0
        self.checks_left = VERIFY_FIRST
        self.lock = threading.Lock()
        self.pattern, self.special_ids = _splitter(tokenizer)
        self.enabled = self.pattern is not None

    def encode(self, text: str) -> Encoded:
        """ids and character offsets of ``text``, equal to the backend's whole-text encode."""
        with self.lock:
            if not self.enabled:
                return encode_with_backend(self.backend, text)
            out = self.by_pieces(text)
            if self.checks_left > 0:
                self.checks_left -= 1
                whole = encode_with_backend(self.backend, text)
                if whole != out:
                    self.enabled = False
                    log.warning("kvshare: piecewise tokenization differs here; cache off")
                    return whole
            return out

    def by_pieces(self, text: str) -> Encoded:
        assert self.pattern is not None
        ids: list[int] = []
        offsets: list[Span] = []
        pos = 0
        for m in self.pattern.finditer(text):
            if m.start() > pos:
                self._add(text[pos : m.start()], pos, ids, offsets)
            ids.append(self.special_ids[m.group()])
            offsets.append((m.start(), m.end()))
            pos = m.end()
        if pos < len(text):
            self._add(text[pos:], pos, ids, offsets)
        return ids, offsets

    def _add(self, piece: str, at: int, ids: list[int], offsets: list[Span]) -> None:
        found = self.pieces.get(piece)
        if found is None:
            found = encode_with_backend(self.backend, piece)
            self._remember(piece, found)
        else:
            self.pieces.move_to_end(piece)
        ids += found[0]
        offsets += [(s + at, e + at) for s, e in found[1]]

    def _remember(self, piece: str, enc: Encoded) -> None:
        if len(enc[0]) > self.max_tokens:
            return
        self.pieces[piece] = enc
        self.tokens += len(enc[0])
        while self.tokens > self.max_tokens:
            _, old = self.pieces.popitem(last=False)
            self.tokens -= len(old[0])


def encode_with_backend(backend: Any, text: str, split: bool = False) -> Encoded:
    """A fast tokenizer's Rust backend on ``text`` (special-token text is plain text if
    ``split``): what ``tokenizer(...)`` does underneath, without its batch conversion."""
    if backend.encode_special_tokens != split:
        backend.encode_special_tokens = split
    enc = backend.encode(text, add_special_tokens=False)
    return list(enc.ids), list(enc.offsets)


def has_backend(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` is a fast tokenizer whose Rust backend can be called directly."""
    return hasattr(getattr(tokenizer, "_tokenizer", None), "encode_special_tokens")


def _splitter(tokenizer: Any) -> tuple[re.Pattern[str] | None, dict[str, int]]:
    """A regex of the added tokens (longest first: leftmost-longest, as the tokenizer
    matches them) and their ids; None where splitting there would not be exact."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    normalizer = getattr(tokenizer._tokenizer, "normalizer", None)
    ids: dict[str, int] = {}
    for i, tok in added.items():
        if tok.lstrip or tok.rstrip or tok.single_word or not tok.content:
            return None, {}
        if tok.normalized and normalizer is not None:
            return None, {}
        ids[tok.content] = int(i)
    if not ids:
        return None, {}
    alternatives = sorted(ids, key=len, reverse=True)
    return re.compile("|".join(re.escape(a) for a in alternatives)), ids


_CACHES: weakref.WeakKeyDictionary[Any, PieceCache] = weakref.WeakKeyDictionary()
_CACHES_LOCK = threading.Lock()


def piece_cache(tokenizer: Any) -> PieceCache | None:
    """The tokenizer's piece cache (created on first use); None for a slow tokenizer."""
    if not has_backend(tokenizer):
        return None
    with _CACHES_LOCK:
        cache = _CACHES.get(tokenizer)
        if cache is None:
            cache = _CACHES[tokenizer] = PieceCache(tokenizer)
        return cache
