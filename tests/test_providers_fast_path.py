"""providers' byte-check fast paths agree with what the JSON says, for generated chunks.

The fast paths decide OpenAI chat token chunks (content, reasoning, refusal, tool-call
arguments) and Gemini text chunks without parsing JSON. Here hypothesis builds chunks
from their fields, including empty strings, quotes, backslashes and key names inside
text, serialises them compactly (OpenAI) or spaced (Google), and checks the facts
against the fields themselves.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, strategies as st

from streamproxy.providers import EventFacts, classify_sse
from streamproxy.sse import SSEEvent

# Text that tries to look like JSON keys and values from the inside.
TRICKY = st.sampled_from(
    ['"', "\\", '"content":"x', '"text": "x', '", "finishReason": "STOP', 'Reason"', ""]
)
TEXT = st.one_of(
    st.text(alphabet='ab "\\:,{}[]é\n\t', max_size=12),
    TRICKY,
    st.lists(TRICKY, max_size=3).map("".join),
)
MAYBE_TEXT = st.one_of(st.none(), TEXT)
DELTA_KEYS = ("content", "reasoning_content", "reasoning", "refusal")


def event(obj: Any, spaced: bool = False) -> SSEEvent:
    separators = (", ", ": ") if spaced else (",", ":")
    data = json.dumps(obj, separators=separators, ensure_ascii=False).encode()
    return SSEEvent(event=None, data=data, truncated=False)


@st.composite
def chat_chunks(draw: st.DrawFn) -> tuple[dict[str, Any], bool, int | None]:
    """A chat.completion.chunk, whether it carries a token, and its usage."""
    delta: dict[str, Any] = {}
    token = False
    for key in draw(st.lists(st.sampled_from(DELTA_KEYS), unique=True, max_size=3)):
        value = draw(MAYBE_TEXT)
        delta[key] = value
        token = token or bool(value)
    if draw(st.booleans()):
        arguments = draw(TEXT)
        call = {"index": 0, "function": {"arguments": arguments}}
        if draw(st.booleans()):
            call.update(id="call_1", type="function")
            call["function"]["name"] = "get_weather"
        delta["tool_calls"] = [call]
        token = token or bool(arguments)
    chunk: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
    }
    usage = None
    if draw(st.booleans()):
        usage = draw(st.integers(0, 10**6))
        chunk["usage"] = {"prompt_tokens": 3, "completion_tokens": usage}
    elif draw(st.booleans()):
        chunk["usage"] = None
    return chunk, token, usage


@given(chat_chunks())
def test_openai_chat_fast_path_agrees_with_the_fields(case):
    """A chat chunk is a token event exactly when a delta field has a non-empty string."""
    chunk, token, usage = case
    assert classify_sse("openai_chat", event(chunk)) == EventFacts(token, False, usage, False)


@st.composite
def gemini_chunks(draw: st.DrawFn) -> tuple[dict[str, Any], EventFacts]:
    """A streamGenerateContent chunk and the facts its fields imply."""
    parts: list[dict[str, Any]] = []
    token = terminal = False
    for _ in range(draw(st.integers(0, 2))):
        if draw(st.integers(0, 4)) == 0:
            parts.append({"functionCall": {"name": "f", "args": {"text": draw(TEXT)}}})
            token = True
        else:
            text = draw(TEXT)
            parts.append({"text": text, **({"thought": True} if draw(st.booleans()) else {})})
            token = token or bool(text)
    candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
    if draw(st.booleans()):
        candidate["finishReason"] = draw(st.sampled_from(["STOP", "MAX_TOKENS", "SAFETY"]))
        terminal = True
    chunk: dict[str, Any] = {"candidates": [candidate]}
    meta: dict[str, Any] = {"promptTokenCount": 7}
    answer = draw(st.one_of(st.none(), st.integers(0, 10**6)))
    thoughts = draw(st.one_of(st.none(), st.integers(0, 10**6)))
    if answer is not None:
        meta["candidatesTokenCount"] = answer
    if thoughts is not None:
        meta["thoughtsTokenCount"] = thoughts
    meta["totalTokenCount"] = 7 + (answer or 0) + (thoughts or 0)
    if draw(st.booleans()):
        chunk["usageMetadata"] = meta
    else:
        answer = thoughts = None
    chunk["modelVersion"] = "gemini-2.0-flash"
    usage = None if answer is None and thoughts is None else (answer or 0) + (thoughts or 0)
    return chunk, EventFacts(token, terminal, usage, False)


@given(gemini_chunks(), st.booleans())
def test_gemini_fast_path_agrees_with_the_fields(case, spaced):
    """Gemini chunks, compact or spaced as Google sends them: text or a function call is a
    token, finishReason ends, usage is candidates + thoughts."""
    chunk, facts = case
    assert classify_sse("gemini", event(chunk, spaced)) == facts


def test_benchmark_streams_take_the_fast_path(capsys):
    """In the parsing benchmark's realistic streams the token events of every API are
    decided by a byte check (vLLM's opt-in per-chunk usage is the one known exception):
    at most a few events per stream parse JSON. And the benchmark itself runs."""
    from benchmarks import bench_parsing

    for stream in bench_parsing.streams():
        _, tokens, slow, slow_tokens = bench_parsing.slow_paths(stream)
        assert tokens == bench_parsing.TOKENS, stream.name
        if "usage per chunk" not in stream.name:
            assert slow_tokens <= 1, stream.name  # Gemini's last chunk: text and the end
            assert slow <= 3, stream.name  # role, finish and usage chunks at most
    bench_parsing.main(["--seconds", "0.001"])
    assert "| anthropic |" in capsys.readouterr().out
