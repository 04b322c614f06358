"""Piecewise, cached tokenization equals whole-text tokenization (ids and offsets)."""

from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvshare.model.prompt import render
from kvshare.model.token_cache import PieceCache, encode_with_backend

from factories import DOC, team

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_sta", "|>", "\n", " "]


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.one_of(st.sampled_from(SPECIALS), st.text(max_size=12)), max_size=12))
def test_pieces_equal_theencode_with_backend_text(tokenizer, parts):
    cache = PieceCache(tokenizer)
    cache.checks_left = 0  # the pieces path alone
    assert cache.enabled
    text = "".join(parts)
    for _ in range(2):  # cold, then from the cache
        assert cache.encode(text) == encode_with_backend(tokenizer._tokenizer, text)


def test_rendered_prompts_are_unchanged_and_pieces_are_reused(tokenizer):
    cache = PieceCache(tokenizer)
    cache.checks_left = 0
    prompts = [render(tokenizer, team(r)) for r in ("planner", "critic", "judge")]
    for p in prompts:
        text = tokenizer.decode(list(p.ids), skip_special_tokens=False)
        assert cache.encode(text)[0] == list(p.ids)
    assert any(DOC.strip()[:40] in piece for piece in cache.pieces)  # the shared document
    assert cache.tokens <= cache.max_tokens


def test_a_mismatch_turns_the_cache_off(tokenizer, monkeypatch):
    cache = PieceCache(tokenizer)
    monkeypatch.setattr(cache, "by_pieces", lambda text: ([0], [(0, 1)]))
    text = "<|im_start|>user\nhello<|im_end|>\n"
    assert (
        cache.encode(text) == encode_with_backend(tokenizer._tokenizer, text) and not cache.enabled
    )
    assert cache.encode(text) == encode_with_backend(tokenizer._tokenizer, text)


def test_added_tokens_that_eat_whitespace_disable_the_cache(tokenizer):
    from transformers import AddedToken

    tok = copy.deepcopy(tokenizer)
    tok.add_tokens([AddedToken("<sep>", lstrip=True)])
    assert not PieceCache(tok).enabled
    assert PieceCache(tokenizer, max_tokens=5).encode("a b c d e f g h")[0]  # over the cap


@pytest.mark.parametrize("n", [1, 50])
def test_the_cache_is_bounded(tokenizer, n):
    cache = PieceCache(tokenizer, max_tokens=64)
    cache.checks_left = 0
    for i in range(n):
        cache.encode(f"<|im_start|>user\nmessage number {i} with some words<|im_end|>")
    assert cache.tokens <= 64
