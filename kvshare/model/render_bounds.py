"""Where each message starts in a rendered chat template, in time linear in the messages.

The definition (``char_bounds_exact``, the reference): message ``k`` starts at
``len(template(messages[:k]))``, provided every such prefix render is a prefix of the full
render. Rendering every prefix is quadratic (2,000 messages: 9-24 s), so :func:`char_layout`
renders the conversation once more with each content replaced by a unique marker, which splits
the render into template glue and contents in one pass. Message ``k`` starts inside the glue
between contents ``k-1`` and ``k``; where inside is learned by one exact prefix render (a
probe) per distinct glue string, so a conversation costs O(1) renders of O(n) messages:
full, marked, a few probes, and exact checks at messages 1, n/2 and n. Anything unexpected
(content the template rewrites beyond stripping whitespace, a prefix that is not a prefix,
so many distinct glues that probes would cost over ``PROBE_BUDGET`` full renders) falls back
to the reference for at most ``EXACT_MAX`` messages, else to no bounds (one segment for the
whole conversation).

:func:`tokenize` then turns the text into ids such that special-token text inside guarded
(untrusted) content stays plain text, so a user cannot forge a turn.
"""

from __future__ import annotations

import secrets
from typing import Any, NamedTuple

from kvshare.errors import PromptError
from kvshare.model.token_cache import piece_cache
from kvshare.model.token_split import Span, encode, forging, piecewise, special_tokens

EXACT_MAX = 64  # messages up to which the quadratic reference is an acceptable fallback
PROBE_BUDGET = 32  # probes may render this many conversations' worth of messages in all

Messages = list[dict[str, Any]]


class Layout(NamedTuple):
    """Character layout of ``text``, the template's render with the generation prompt.

    bounds: ``n + 1`` offsets, message ``k`` rendered as ``text[bounds[k]:bounds[k + 1]]``
        and the generation prompt as ``text[bounds[n]:]``; None if the template is not
        prefix-stable (or too long to check exactly).
    spans: per message the half-open ``[start, end)`` of its content in ``text`` (None for a
        message with empty content); None if the template rewrites content.
    method: how bounds were found: ``"fast"``, ``"exact"`` or ``"none"``.
    """

    text: str
    bounds: list[int] | None
    spans: list[Span | None] | None
    method: str


class _Marks(NamedTuple):
    """The conversation rendered with each non-empty content replaced by a unique marker.

    glue[j] is the template text before the j-th marker (the last one: after the last
    marker); starts[j] is where it begins in ``text``; located lists the marked messages.
    """

    msgs: Messages
    text: str
    located: list[int]
    glue: list[str]
    starts: list[int]


def template_text(tokenizer: Any, msgs: Messages, gen: bool) -> str:
    """The chat template's text for ``msgs`` (with the generation prompt if ``gen``)."""
    text = tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
    return str(text)


def char_bounds_exact(tokenizer: Any, msgs: Messages, full: str) -> list[int] | None:
    """Reference bounds by rendering every prefix (quadratic); None if not prefix-stable."""
    bounds = [0]
    for k in range(1, len(msgs) + 1):
        try:
            text = template_text(tokenizer, msgs[:k], gen=False)
        except Exception:  # templates may reject partial conversations
            return None
        if not full.startswith(text) or len(text) < bounds[-1]:
            return None
        bounds.append(len(text))
    return bounds


def _mark(tokenizer: Any, msgs: Messages) -> _Marks | None:
    """Render with markers; None if the template drops, repeats or reorders a marker."""
    nonce = secrets.token_hex(8)
    marker = [f"KV{nonce}M{i}E" for i in range(len(msgs))]
    marked = [{**m, "content": marker[i] if m["content"] else ""} for i, m in enumerate(msgs)]
    located = [i for i, m in enumerate(msgs) if m["content"]]
    try:
        text = template_text(tokenizer, marked, gen=True)
    except Exception:  # the template inspects content (e.g. splits on a tag): no fast path
        return None
    if text.count(nonce) != len(located):
        return None
    glue, starts, pos = [], [], 0
    for i in located:
        at = text.find(marker[i], pos)
        if at < 0:
            return None
        glue.append(text[pos:at])
        starts.append(pos)
        pos = at + len(marker[i])
    glue.append(text[pos:])
    starts.append(pos)
    return _Marks(marked, text, located, glue, starts)


def _align(
    full: str, marks: _Marks, msgs: Messages, strip: bool
) -> tuple[list[Span | None], list[int]] | None:
    """Content spans and glue starts in ``full``; None unless glue + content rebuild it."""
    spans: list[Span | None] = [None] * len(msgs)
    starts, pos = [], 0
    for j, i in enumerate(marks.located):
        if not full.startswith(marks.glue[j], pos):
            return None
        starts.append(pos)
        pos += len(marks.glue[j])
        content = msgs[i]["content"].strip() if strip else msgs[i]["content"]
        if not full.startswith(content, pos):
            return None
        spans[i] = (pos, pos + len(content))
        pos += len(content)
    if full[pos:] != marks.glue[-1]:
        return None
    starts.append(pos)
    return spans, starts


def _probe(tokenizer: Any, marks: _Marks, ks: list[int], j: int) -> list[int] | None:
    """Offsets of the starts of messages ``ks`` inside glue ``j``, by exact marked prefix
    renders; None if a prefix is rejected, is not a prefix, or ends outside the glue."""
    offsets = []
    for k in ks:
        try:
            text = template_text(tokenizer, marks.msgs[:k], gen=False)
        except Exception:
            return None
        offset = len(text) - marks.starts[j]
        if not marks.text.startswith(text) or not 0 <= offset <= len(marks.glue[j]):
            return None
        offsets.append(offset)
    return offsets


def _glue_bounds(tokenizer: Any, marks: _Marks, starts: list[int], n: int) -> list[int] | None:
    """Bounds 0..n-1 in ``full`` coordinates (``starts``: glue starts there); None on failure.

    Glue j holds the starts of messages ``edges[j] + 1 .. edges[j + 1]``; the same glue
    between the same roles splits the same way, so one probe per distinct glue suffices.
    """
    bounds = [0] * n
    learned: dict[tuple[tuple[str, ...], str], list[int]] = {}
    budget = PROBE_BUDGET * max(n, EXACT_MAX)  # messages rendered by probes
    edges = [-1, *marks.located, n]
    for j, glue in enumerate(marks.glue):
        ks = [k for k in range(edges[j] + 1, edges[j + 1] + 1) if 1 <= k < n]
        if not ks:
            continue
        span = range(edges[j], edges[j + 1] + 1)
        key = (tuple(marks.msgs[i]["role"] if 0 <= i < n else "" for i in span), glue)
        if key not in learned:
            budget -= sum(ks)
            offsets = _probe(tokenizer, marks, ks, j) if budget >= 0 else None
            if offsets is None:
                return None
            learned[key] = offsets
        for k, offset in zip(ks, learned[key], strict=True):
            bounds[k] = starts[j] + offset
    return bounds


def _verified(tokenizer: Any, msgs: Messages, full: str, bounds: list[int]) -> list[int] | None:
    """Append the generation-prompt bound and check exact prefix renders at 1, n/2 and n."""
    n = len(msgs)
    try:
        checks = {k: template_text(tokenizer, msgs[:k], gen=False) for k in {1, n // 2, n} if k}
    except Exception:
        return None
    bounds = [*bounds, len(checks[n])]
    if any(not full.startswith(t) or len(t) != bounds[k] for k, t in checks.items()):
        return None
    if any(a > b for a, b in zip(bounds, bounds[1:], strict=False)):
        return None
    return bounds


def _fast(
    tokenizer: Any, msgs: Messages, full: str
) -> tuple[list[int] | None, list[Span | None] | None]:
    """(bounds or None, spans or None) by the marker method."""
    marks = _mark(tokenizer, msgs)
    if marks is None:
        return None, None
    aligned = _align(full, marks, msgs, False) or _align(full, marks, msgs, True)
    if aligned is None:
        return None, None
    spans, starts = aligned
    bounds = _glue_bounds(tokenizer, marks, starts, len(msgs))
    return (None if bounds is None else _verified(tokenizer, msgs, full, bounds)), spans


def char_layout(tokenizer: Any, msgs: Messages, full: str) -> Layout:
    """Layout of ``full`` (= ``template_text(tokenizer, msgs, gen=True)``); never raises."""
    bounds, spans = _fast(tokenizer, msgs, full)
    if bounds is not None:
        return Layout(full, bounds, spans, "fast")
    if len(msgs) <= EXACT_MAX:
        bounds = char_bounds_exact(tokenizer, msgs, full)
        if bounds is not None:
            return Layout(full, bounds, spans, "exact")
    return Layout(full, None, spans, "none")


def tokenize(
    tokenizer: Any, lay: Layout, msgs: Messages, guarded: list[int]
) -> tuple[list[int], list[Span]]:
    """Ids and character offsets of ``lay.text``, in which no special token overlaps the
    content of a ``guarded`` message. Raises PromptError if that content cannot be located.

    Fast path: one tokenization of the whole text (ids equal ``apply_chat_template``'s) when
    no special token falls inside guarded content; otherwise that content is cut out and
    tokenized with ``split_special_tokens=True``, the rest with special tokens parsed.
    """
    cache = piece_cache(tokenizer)
    whole = cache.encode(lay.text) if cache is not None else None
    ids, offsets = whole or encode(tokenizer, [lay.text], False)[0]
    if not guarded:
        return ids, offsets
    special, texts = special_tokens(tokenizer)
    if lay.spans is None:  # content not located: refuse rather than let it forge a turn
        for i in guarded:
            found = [t for t in texts if t in msgs[i]["content"]]
            if found:
                raise PromptError(
                    f"message {i} ({msgs[i]['role']}) contains special-token text "
                    f"{found[0]!r}, which this model's chat template would turn into a control "
                    f"token; remove it, or trust the role via special_roles"
                )
        return ids, offsets
    spans = [s for s in (lay.spans[i] for i in guarded) if s is not None and s[0] < s[1]]
    plain: set[Span] = set()
    while forged := set(forging(ids, offsets, spans, special)):
        if forged <= plain:  # the tokenizer ignored split_special_tokens (another thread?)
            raise PromptError(
                "message content kept turning into control tokens although they were split; "
                "retry, and don't share this tokenizer across threads while rendering"
            )
        plain |= forged  # re-cutting can join glue into a new token: check again
        ids, offsets = piecewise(tokenizer, lay.text, sorted(plain))
    return ids, offsets
