"""Rendering: ids equal apply_chat_template for each family's template; one segment per message."""

from __future__ import annotations

import copy

import pytest

from kvshare.errors import PromptError
from kvshare.prompt import render

QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)
LLAMA3 = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
TEMPLATES = {"smollm2": None, "qwen2": QWEN2, "mistral": MISTRAL, "llama3": LLAMA3}

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Summarise: The cat sat."},
        {"role": "assistant", "content": "A cat sat down."},
        {"role": "user", "content": "  Now in French, please. "},
    ],
]
WITH_SYSTEM = [{"role": "system", "content": "You are terse."}, *CONVERSATIONS[1]]


def with_template(tokenizer, name):
    tok = copy.deepcopy(tokenizer)
    if TEMPLATES[name] is not None:
        tok.chat_template = TEMPLATES[name]
    return tok


def reference_ids(tok, msgs):
    out = tok.apply_chat_template(msgs, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_ids_equal_apply_chat_template(tokenizer, name):
    tok = with_template(tokenizer, name)
    convs = CONVERSATIONS + ([] if name == "mistral" else [WITH_SYSTEM])
    for msgs in convs:
        prompt = render(tok, msgs)
        assert list(prompt.ids) == reference_ids(tok, msgs)
        spans = [(s.start, s.end) for s in prompt.segments] + [(prompt.tail.start, prompt.tail.end)]
        assert spans[0][0] == 0 and spans[-1][1] == len(prompt.ids)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_one_segment_per_message_holding_its_content(tokenizer, name):
    tok = with_template(tokenizer, name)
    msgs = CONVERSATIONS[1]
    prompt = render(tok, msgs)
    assert [s.role for s in prompt.segments] == [m["role"] for m in msgs]
    for seg, msg in zip(prompt.segments, msgs, strict=True):
        text = tok.decode(list(prompt.ids[seg.start : seg.end]))
        assert msg["content"].strip() in text


def test_same_message_same_hash_across_conversations(tokenizer):
    a = render(tokenizer, [{"role": "system", "content": "A"}, {"role": "user", "content": "Q"}])
    b = render(tokenizer, [{"role": "system", "content": "B"}, {"role": "user", "content": "Q"}])
    assert a.segments[1].content_hash == b.segments[1].content_hash
    assert a.segments[0].content_hash != b.segments[0].content_hash


def test_langchain_messages(tokenizer):
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    lc = [SystemMessage("S"), HumanMessage("Hi"), AIMessage("Yo"), HumanMessage("Bye")]
    plain = [
        {"role": r, "content": c}
        for r, c in [("system", "S"), ("user", "Hi"), ("assistant", "Yo"), ("user", "Bye")]
    ]
    assert render(tokenizer, lc).ids == render(tokenizer, plain).ids


@pytest.mark.parametrize(
    "bad, match",
    [
        ([], "empty"),
        ("hello", "list of messages"),
        ([{"role": "wizard", "content": "x"}], "unknown role"),
        ([{"role": "user", "content": ["a", "b"]}], "must be a string"),
        ([{"role": "user"}], "'role' and 'content'"),
        ([42], "pass dicts"),
    ],
)
def test_bad_messages_raise_prompt_error(tokenizer, bad, match):
    with pytest.raises(PromptError, match=match):
        render(tokenizer, bad)


def test_template_rejection_is_a_prompt_error(tokenizer):
    tok = with_template(tokenizer, "mistral")
    with pytest.raises(PromptError, match="alternate"):
        render(tok, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
