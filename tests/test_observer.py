"""StreamObserver: timings, token counts and the outcome, from bytes and fake times only."""

from __future__ import annotations

import json
from typing import Any

import pytest

from streamproxy.observer import StreamObserver, body_kind
from streamproxy.providers import Api


def sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"{head}data: {payload}\n\n".encode()


def chat(text: str) -> bytes:
    return sse({"choices": [{"index": 0, "delta": {"content": text}}]})


ROLE = sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
DONE = sse("[DONE]")


def observe(
    api: Api, chunks: list[tuple[float, bytes]], kind: str = "sse"
) -> tuple[StreamObserver, list[float]]:
    """Feed (time, chunk) pairs to an observer that arrived at t=0; return it and its gaps."""
    gaps: list[float] = []
    observer = StreamObserver(api, kind, 0.0, lambda gap, _now: gaps.append(gap))  # type: ignore[arg-type]  # a BodyKind
    for now, data in chunks:
        observer.on_chunk(data, now)
    return observer, gaps


def test_timings_of_a_role_chunk_then_tokens():
    """TTFB is the first chunk, TTFT the first content event, gaps run between tokens."""
    observer, gaps = observe(
        "openai_chat",
        [(0.01, ROLE), (0.3, chat("a")), (0.35, chat("b")), (0.45, chat("c")), (0.5, DONE)],
    )
    record = observer.finish(observer.clean_end_outcome(), 0.6)
    assert record.outcome == "completed"
    assert record.ttfb == pytest.approx(0.01)
    assert record.ttft == pytest.approx(0.3)
    assert gaps == pytest.approx([0.05, 0.1])
    assert record.token_events == 3
    assert record.output_tokens is None
    assert record.duration == pytest.approx(0.6)
    assert record.phase == "mid_stream"
    assert record.streamed
    assert record.bytes_sent == len(ROLE + chat("a") + chat("b") + chat("c") + DONE)


def test_chunking_does_not_change_the_facts():
    """The same bytes split at any offset give the same token count and terminal marker."""
    data = ROLE + chat("a") + chat("b") + DONE
    for i in range(len(data) + 1):
        observer, gaps = observe("openai_chat", [(1.0, data[:i]), (2.0, data[i:])])
        assert observer.token_events == 2, i
        assert observer.terminal_seen, i
        assert len(gaps) == 1, i


def test_events_sharing_a_chunk_share_a_time():
    """Tokens that arrive in one read are observed at one time: a gap of zero."""
    observer, gaps = observe("openai_chat", [(0.2, chat("a") + chat("b") + chat("c"))])
    assert gaps == [0.0, 0.0]
    assert observer.first_token_at == 0.2


@pytest.mark.parametrize(
    ("api", "body"),
    [
        ("openai_chat", chat("a")),
        ("openai_completions", sse({"choices": [{"text": "a"}]})),
        (
            "anthropic",
            sse({"type": "content_block_delta", "delta": {"text": "a"}}, "content_block_delta"),
        ),
        ("openai_responses", sse({"delta": "a"}, "response.output_text.delta")),
        ("gemini", sse({"candidates": [{"content": {"parts": [{"text": "a"}]}}]})),
    ],
)
def test_clean_end_without_terminal_marker_is_upstream_disconnect(api, body):
    """A known API's stream that ends without its terminal marker did not complete."""
    observer, _ = observe(api, [(0.1, body)])
    observer.on_eof(0.2)
    assert observer.token_events == 1
    assert observer.clean_end_outcome() == "upstream_disconnect"


@pytest.mark.parametrize(("api", "kind"), [("unknown", "sse"), ("openai_chat", "none")])
def test_clean_end_of_unknown_api_or_plain_body_completes(api, kind):
    """Without a known marker to wait for (unknown API, plain body) a clean end completes."""
    observer, _ = observe(api, [(0.1, b'{"id": 1}')], kind)
    assert observer.clean_end_outcome() == "completed"


def test_usage_is_the_last_report_not_a_sum():
    """Providers report cumulative usage: the last value wins."""
    events = [
        sse({"type": "message_delta", "usage": {"output_tokens": 5}}, "message_delta"),
        sse({"type": "message_delta", "usage": {"output_tokens": 12}}, "message_delta"),
        sse({"type": "message_stop"}, "message_stop"),
    ]
    observer, _ = observe("anthropic", [(0.1 * i, e) for i, e in enumerate(events)])
    record = observer.finish(observer.clean_end_outcome(), 1.0)
    assert record.output_tokens == 12
    assert record.outcome == "completed"


def test_gemini_usage_sums_answer_and_thoughts():
    """Gemini output tokens are candidates + thoughts, from the last usageMetadata."""
    chunk = {
        "candidates": [{"content": {"parts": [{"text": "a"}]}, "finishReason": "STOP"}],
        "usageMetadata": {"candidatesTokenCount": 7, "thoughtsTokenCount": 3},
    }
    observer, _ = observe("gemini", [(0.1, sse(chunk))])
    assert observer.output_tokens == 10
    assert observer.terminal_seen


def test_ollama_ndjson_with_final_line_at_eof():
    """NDJSON lines are tokens until `done: true`, whose eval_count is the usage; a final
    line without its newline is still read at EOF."""
    lines = [
        json.dumps({"message": {"content": "a"}, "done": False}).encode() + b"\n",
        json.dumps({"message": {"content": "b"}, "done": False}).encode() + b"\n",
        json.dumps({"message": {"content": ""}, "done": True, "eval_count": 9}).encode(),
    ]
    observer, gaps = observe(
        "ollama", [(0.1, lines[0]), (0.2, lines[1]), (0.3, lines[2])], "ndjson"
    )
    assert observer.clean_end_outcome() == "upstream_disconnect"
    observer.on_eof(0.4)
    record = observer.finish(observer.clean_end_outcome(), 0.5)
    assert record.outcome == "completed"
    assert record.token_events == 2
    assert record.output_tokens == 9
    assert gaps == pytest.approx([0.1])


def test_finish_decides_once():
    """The first caller decides the outcome; a later one gets the same record."""
    observer, _ = observe("openai_chat", [(0.1, chat("a"))])
    first = observer.finish("client_disconnect", 0.2)
    assert observer.finish("completed", 0.3) is first
    assert first.outcome == "client_disconnect"
    assert first.duration == pytest.approx(0.2)


def test_phase_before_the_first_token():
    """A stream cut before any content event is in phase before_first_token, with no TTFT,
    even though bytes (the role chunk) were sent."""
    observer, _ = observe("openai_chat", [(0.05, ROLE)])
    record = observer.finish("client_disconnect", 0.5)
    assert record.phase == "before_first_token"
    assert record.ttft is None
    assert record.ttfb == pytest.approx(0.05)


def test_streamed_override_for_a_stream_that_never_started():
    """A stream request that failed before its response is still accounted as a stream."""
    observer = StreamObserver("openai_chat", "none", 0.0)
    record = observer.finish("upstream_timeout", 0.5, streamed=True)
    assert record.streamed
    assert record.ttfb is None
    assert record.bytes_sent == 0
    assert not StreamObserver("openai_chat", "none", 0.0).finish("completed", 1.0).streamed


@pytest.mark.parametrize(
    "error",
    [
        sse({"error": {"message": "boom", "type": "BadRequestError"}}),  # vLLM
        sse({"type": "error", "error": {"type": "overloaded_error"}}, "error"),  # any API
    ],
)
def test_in_stream_error_is_accounted_as_upstream_error(error):
    """An error event followed by a clean end, even with `[DONE]`, is an upstream_error;
    the relay's own view of the clean end is unchanged (it ends the body normally)."""
    observer, _ = observe("openai_chat", [(0.1, chat("a")), (0.2, error), (0.3, DONE)])
    assert observer.clean_end_outcome() == "completed"
    record = observer.finish(observer.clean_end_outcome(), 0.4)
    assert record.outcome == "upstream_error"
    assert record.phase == "mid_stream"


def test_in_stream_error_does_not_override_a_client_disconnect():
    """The error only upgrades a clean end; a client that left stays client_disconnect."""
    observer, _ = observe("openai_chat", [(0.1, sse({"error": {"message": "x"}}))])
    assert observer.finish("client_disconnect", 0.2).outcome == "client_disconnect"


def test_boundaries_follow_the_scanner():
    """Keepalives and error frames may go in only at SSE line/event boundaries; never into
    a body that is not SSE."""
    observer, _ = observe("openai_chat", [(0.1, b"data: {")])
    assert not observer.at_line_boundary
    observer.on_chunk(b"}\n", 0.2)
    assert observer.at_line_boundary
    assert not observer.at_event_boundary
    observer.on_chunk(b"\n", 0.3)
    assert observer.at_event_boundary
    plain, _ = observe("openai_chat", [(0.1, b"{}\n\n")], "ndjson")
    assert not plain.at_line_boundary
    assert not plain.at_event_boundary


@pytest.mark.parametrize(
    ("content_type", "kind"),
    [
        (b"text/event-stream", "sse"),
        (b"Text/Event-Stream; charset=utf-8", "sse"),
        (b"application/x-ndjson", "ndjson"),
        (b"application/jsonl", "ndjson"),
        (b"application/json", "none"),
        (None, "none"),
    ],
)
def test_body_kind(content_type, kind):
    """The scanner is chosen from the media type, case-insensitively, ignoring parameters."""
    assert body_kind(content_type) == kind
