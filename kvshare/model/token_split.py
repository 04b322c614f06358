"""Tokenizing a rendered chat so that chosen character spans (untrusted message content) hold
no control token: the special tokens, plain encodings, the spans a special token overlaps, and
encoding piece by piece with those spans split (put together by
:func:`kvshare.model.render_bounds.tokenize`)."""

from __future__ import annotations

import bisect
from typing import Any

from kvshare.model.token_cache import encode_with_backend, has_backend

Span = tuple[int, int]


def special_tokens(tokenizer: Any) -> tuple[set[int], list[str]]:
    """Ids and texts of the tokenizer's special (control) tokens."""
    added = [(i, t.content) for i, t in tokenizer.added_tokens_decoder.items() if t.special]
    ids = (set(tokenizer.all_special_ids) | {i for i, _ in added}) - {tokenizer.unk_token_id}
    return ids, sorted(set(tokenizer.all_special_tokens) | {t for _, t in added})


def encode(tokenizer: Any, texts: list[str], split: bool) -> list[tuple[list[int], list[Span]]]:
    """Encodings of ``texts`` (special-token text stays plain text if ``split``).

    A fast tokenizer's Rust backend is called directly, one text at a time: what
    ``tokenizer(...)`` does underneath, without its batch conversion and thread pool (the
    same ids and offsets, at half the time on a long prompt). Others go through ``__call__``.
    """
    if has_backend(tokenizer):
        return [encode_with_backend(tokenizer._tokenizer, t, split) for t in texts]
    enc = tokenizer(
        texts, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=split
    )
    return [
        (list(ids), list(offs))
        for ids, offs in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]


def forging(
    ids: list[int], offsets: list[Span], spans: list[Span], special: set[int]
) -> list[Span]:
    """The spans (sorted, disjoint) that a special token in ``ids`` overlaps."""
    starts = [a for a, _ in spans]
    hit: set[int] = set()
    for tok, (s, e) in zip(ids, offsets, strict=True):
        if tok not in special:
            continue
        j = bisect.bisect_right(starts, s) - 1
        hit.update(
            k for k in (j, j + 1) if 0 <= k < len(spans) and s < spans[k][1] and e > spans[k][0]
        )
    return [spans[k] for k in sorted(hit)]


def piecewise(tokenizer: Any, text: str, plain: list[Span]) -> tuple[list[int], list[Span]]:
    """Ids and offsets of ``text`` with the ``plain`` spans tokenized without special tokens."""
    cuts, pos = [], 0
    for a, b in plain:
        cuts += [(pos, a, False)] if pos < a else []
        cuts.append((a, b, True))
        pos = b
    cuts += [(pos, len(text), False)] if pos < len(text) else []
    encs = {
        split: iter(encode(tokenizer, [text[a:b] for a, b, p in cuts if p is split], split))
        for split in (False, True)
    }
    ids: list[int] = []
    offsets: list[Span] = []
    for a, _, split in cuts:
        piece_ids, piece_offsets = next(encs[split])
        ids += piece_ids
        offsets += [(s + a, e + a) for s, e in piece_offsets]
    return ids, offsets
