"""LangChain interop and tool calls: every accepted message form renders like its plain dict."""

from __future__ import annotations

import copy

import pytest
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    ChatMessage,
    ChatMessageChunk,
    HumanMessage,
    HumanMessageChunk,
    SystemMessage,
    SystemMessageChunk,
    ToolMessage,
    ToolMessageChunk,
)
from langchain_core.prompts import ChatPromptTemplate

from kvshare.errors import PromptError
from kvshare.model.prompt import normalize, render

PLAIN = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Yo"},
    {"role": "tool", "content": "42"},
    {"role": "user", "content": "Bye"},
]
TOOLS = (  # a chat template that renders tool calls and tool_call_id (as HF tool templates do)
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} "
    "{{ c.function.arguments | tojson }} id={{ c.id }}</tool_call>{% endfor %}"
    "{% if m.tool_call_id %} [result of {{ m.tool_call_id }}]{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CALL = {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1"}
OPENAI_CALL = {
    "type": "function",
    "id": "call_1",
    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
}


def tool_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TOOLS
    return tok


def reference_ids(tok, msgs):
    out = tok.apply_chat_template(msgs, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize(
    "messages",
    [
        [SystemMessage("S"), HumanMessage("Hi"), AIMessage("Yo")]
        + [ToolMessage("42", tool_call_id="c1"), HumanMessage("Bye")],
        [SystemMessageChunk(content="S"), HumanMessageChunk(content="Hi")]
        + [AIMessageChunk(content="Yo"), ToolMessageChunk(content="42", tool_call_id="c1")]
        + [ChatMessageChunk(content="Bye", role="user")],
        [ChatMessage(content=c, role=r) for r, c in [("system", "S"), ("human", "Hi")]]
        + [ChatMessage(content=c, role=r) for r, c in [("ai", "Yo"), ("tool", "42")]]
        + [ChatMessage(content="Bye", role="user")],
        [("system", "S"), ("human", "Hi"), ("assistant", "Yo"), ("tool", "42"), ("user", "Bye")],
        [{"role": "system", "content": "S"}, ("user", "Hi"), AIMessage("Yo")]
        + [{"role": "tool", "content": "42", "tool_call_id": "c1"}, ("human", "Bye")],
    ],
    ids=["messages", "chunks", "chat-message", "tuples", "mixed"],
)
def test_langchain_forms_render_like_dicts(tokenizer, messages):
    prompt = render(tokenizer, messages)
    assert prompt.ids == render(tokenizer, PLAIN).ids
    assert [s.role for s in prompt.segments] == [m["role"] for m in PLAIN]


def test_prompt_value(tokenizer):
    template = ChatPromptTemplate.from_messages([("system", "Be {style}."), ("human", "{q}")])
    value = template.invoke({"style": "terse", "q": "Why?"})
    plain = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Why?"}]
    assert render(tokenizer, value).ids == render(tokenizer, plain).ids


def test_content_parts_are_joined(tokenizer):
    parts = HumanMessage(content=[{"type": "text", "text": "Hello "}, "world"])
    assert normalize([parts]) == [{"role": "user", "content": "Hello world"}]
    assert render(tokenizer, [parts]).ids == render(tokenizer, [("user", "Hello world")]).ids


def test_empty_ai_message_renders_empty_content(tokenizer):
    msgs = [HumanMessage("Hi"), AIMessage(""), HumanMessage("Again")]
    plain = [("user", "Hi"), ("assistant", ""), ("user", "Again")]
    assert render(tokenizer, msgs).ids == render(tokenizer, plain).ids


@pytest.mark.parametrize(
    "messages, match",
    [
        ([HumanMessage(content=[{"type": "image_url", "image_url": {"url": "x"}}])], "image_url"),
        ([ChatMessage(content="x", role="wizard")], "unknown role 'wizard'"),
        ([("placeholder", "{history}")], "unknown role 'placeholder'"),
        ([AIMessage("", tool_calls=[CALL])], "cannot render tool calls"),
        ([{"role": "assistant", "content": None, "tool_calls": [OPENAI_CALL]}], "tool calls"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"x": 1}]}], "without a 'function'"),
        (HumanMessage("hi"), "list of messages"),
    ],
)
def test_unrenderable_messages_raise_prompt_error(tokenizer, messages, match):
    with pytest.raises(PromptError, match=match):
        render(tokenizer, messages)


def test_tool_calls_pass_through_a_tool_template(tokenizer):
    tok = tool_tokenizer(tokenizer)
    lc = [
        HumanMessage("Weather in Paris?"),
        AIMessage("", tool_calls=[CALL]),
        ToolMessage("18C", tool_call_id="call_1"),
    ]
    plain = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [OPENAI_CALL]},
        {"role": "tool", "content": "18C", "tool_call_id": "call_1"},
    ]
    prompt = render(tok, lc)
    assert list(prompt.ids) == reference_ids(tok, plain)
    assert [s.role for s in prompt.segments] == ["user", "assistant", "tool"]
    call, result = (tok.decode(prompt.ids[s.start : s.end]) for s in prompt.segments[1:])
    assert '<tool_call>get_weather {"city": "Paris"} id=call_1</tool_call>' in call
    assert "18C [result of call_1]" in result


def test_dict_tool_calls_in_langchain_format_are_converted(tokenizer):
    tok = tool_tokenizer(tokenizer)
    lc_style = [
        {"role": "user", "content": "Q"},
        {"role": "ai", "content": "", "tool_calls": [CALL]},
    ]
    openai = [{"role": "user", "content": "Q"}, {"role": "assistant", "tool_calls": [OPENAI_CALL]}]
    assert render(tok, lc_style).ids == render(tok, openai).ids
    assert list(render(tok, openai).ids) == reference_ids(
        tok, [openai[0], {**openai[1], "content": ""}]
    )
