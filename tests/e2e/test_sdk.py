"""Drop-in: the official openai and anthropic SDKs work through the proxy unchanged."""

from __future__ import annotations

import time

import anthropic
import openai
import pytest

from streamproxy.mock_upstream import expected_text

SLOW = {"x-mock-tokens": "12", "x-mock-ttft": "0.1", "x-mock-interval": "0.15"}


@pytest.fixture
def oa(start_proxy, mock_url, sdk) -> openai.OpenAI:
    with start_proxy(mock_url) as running:
        yield sdk.openai(running.url)


@pytest.fixture
def an(start_proxy, mock_url, sdk) -> anthropic.Anthropic:
    with start_proxy(mock_url) as running:
        yield sdk.anthropic(running.url)


def test_openai_chat_stream(oa):
    """Chat Completions streams through: the full text arrives, the first delta long
    before the stream ends (12 tokens 150 ms apart)."""
    started = time.monotonic()
    pieces: list[tuple[float, str]] = []
    stream = oa.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_headers=SLOW,
    )
    for event in stream:
        if event.choices and event.choices[0].delta.content:
            pieces.append((time.monotonic() - started, event.choices[0].delta.content))
    assert "".join(text for _, text in pieces) == expected_text(12)
    first, last = pieces[0][0], pieces[-1][0]
    assert last - first > 1.2  # arrivals are spread out, not delivered in one lump
    assert first < last / 2


def test_openai_chat_not_streamed(oa):
    """A non-streamed completion comes back whole."""
    completion = oa.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-mock-tokens": "7"},
    )
    assert completion.choices[0].message.content == expected_text(7)


def test_openai_responses_stream(oa):
    """The Responses API streams through with every text delta."""
    deltas = [
        event.delta
        for event in oa.responses.create(
            model="gpt-test", input="hi", stream=True, extra_headers={"x-mock-tokens": "9"}
        )
        if event.type == "response.output_text.delta"
    ]
    assert "".join(deltas) == expected_text(9)


def test_anthropic_messages_stream(an):
    """Anthropic Messages stream through: full text, first delta early."""
    started = time.monotonic()
    arrivals: list[tuple[float, str]] = []
    with an.messages.stream(
        model="claude-test",
        max_tokens=64,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers=SLOW,
    ) as stream:
        for text in stream.text_stream:
            arrivals.append((time.monotonic() - started, text))
    assert "".join(text for _, text in arrivals) == expected_text(12)
    assert arrivals[-1][0] - arrivals[0][0] > 1.2


def test_anthropic_messages_not_streamed(an):
    """A non-streamed Anthropic message comes back whole."""
    message = an.messages.create(
        model="claude-test",
        max_tokens=64,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-mock-tokens": "5"},
    )
    assert message.content[0].text == expected_text(5)


def test_sdk_sees_upstream_errors(oa, an):
    """Upstream error statuses reach the SDKs as their own error classes."""
    with pytest.raises(openai.RateLimitError):
        oa.chat.completions.create(model="m", messages=[], extra_headers={"x-mock-status": "429"})
    with pytest.raises(anthropic.InternalServerError):
        an.messages.create(
            model="m", max_tokens=5, messages=[], extra_headers={"x-mock-status": "529"}
        )
