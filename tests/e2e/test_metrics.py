"""Streaming metrics, read the way Prometheus reads them: the real proxy relays real
streams from the mock (or a raw TCP upstream), then a real GET of the admin app's
/metrics is parsed with prometheus_client's own parser.

Counts are exact; times only have generous bounds around what the mock scripts:
an immediate role/preamble chunk, the first content event at 300 ms, then 9 more
50 ms apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from streamproxy.config import MetricsConfig, UpstreamConfig
from tests import client
from tests.conftest import ProxyFactory, RunningProxy
from tests.rawserver import chunk, raw_server
from tests.scrape import Scrape, admin_for, scrape, wait_for

REQUESTS = "streamproxy_requests_total"
ACTIVE = "streamproxy_streams_active"
STREAMS = "streamproxy_streams_total"
TTFB = "streamproxy_time_to_first_byte_seconds"
TTFT = "streamproxy_time_to_first_token_seconds"
ITL = "streamproxy_inter_token_latency_seconds"
DURATION = "streamproxy_stream_duration_seconds"
TOKENS = "streamproxy_output_tokens_total"
DROPPED = "streamproxy_dropped_connections_total"
KEEPALIVES = "streamproxy_keepalives_sent_total"
ERRORS = "streamproxy_upstream_errors_total"

JSON = [("content-type", "application/json")]
TIMED = {"x-mock-ttft": "0.3", "x-mock-tokens": "10", "x-mock-interval": "0.05"}
CHAT = {"model": "gpt-x", "stream": True, "messages": []}


@contextlib.contextmanager
def metered(
    start_proxy: ProxyFactory, upstream: str | list[UpstreamConfig], **kwargs: Any
) -> Iterator[tuple[RunningProxy, str]]:
    """A proxy in front of `upstream`, and the URL of its admin app."""
    with start_proxy(upstream, **kwargs) as proxy, admin_for(proxy.registry) as admin:
        yield proxy, admin


def post(url: str, path: str, body: dict[str, Any], knobs: dict[str, str] | None = None):
    headers = [*JSON, *(knobs or {}).items()]
    return client.request(url, "POST", path, headers, json.dumps(body).encode(), timeout=15)


def finished(count: int = 1):
    """Ready when `count` streams have been accounted."""
    return lambda m: m.total(STREAMS) >= count


def assert_one_stream(m: Scrape, model: str, outcome: str) -> None:
    """Exactly one stream, with this model and outcome, and nothing left active."""
    assert m.total(STREAMS) == 1
    assert m.value(STREAMS, upstream="test", model=model, outcome=outcome) == 1
    assert m.value(DURATION + "_count", upstream="test", model=model, outcome=outcome) == 1
    assert m.value(ACTIVE, upstream="test") == 0


# --- timings and tokens, one test per API shape -------------------------------------------


SHAPES = [
    # (path, body, model label, a preamble precedes the first content event)
    ("/v1/chat/completions", CHAT, "gpt-x", True),
    ("/v1/completions", {"model": "gpt-x", "stream": True, "prompt": "hi"}, "gpt-x", False),
    ("/v1/responses", {"model": "gpt-x", "stream": True, "input": "hi"}, "gpt-x", True),
    ("/v1/messages", {"model": "claude-x", "stream": True, "max_tokens": 9}, "claude-x", True),
    ("/v1beta/models/gemini-x:streamGenerateContent?alt=sse", {"contents": []}, "gemini-x", False),
    ("/api/chat", {"model": "llama-x", "messages": []}, "llama-x", False),
    ("/api/generate", {"model": "llama-x", "prompt": "hi"}, "llama-x", False),
]


@pytest.mark.parametrize(
    ("path", "body", "model", "preamble"),
    SHAPES,
    ids=["chat", "completions", "responses", "anthropic", "gemini", "ollama_chat", "ollama_gen"],
)
def test_timings_and_tokens_per_api(start_proxy, mock_url, path, body, model, preamble):
    """Every API shape: one completed stream, TTFT ~300 ms counted once, 9 inter-token gaps
    of ~50 ms, 10 output tokens, and TTFB before TTFT when a preamble comes first."""
    with metered(start_proxy, mock_url) as (proxy, admin):
        response = post(proxy.url, path, body, TIMED)
        assert response.status == 200
        assert response.complete
        m = wait_for(admin, finished())
    assert_one_stream(m, model, "completed")
    labels = {"upstream": "test", "model": model}
    assert m.value(TTFT + "_count", **labels) == 1
    ttft = m.value(TTFT + "_sum", **labels)
    assert 0.25 <= ttft <= 1.0
    assert m.value(ITL + "_count", **labels) == 9
    assert 0.03 <= m.value(ITL + "_sum", **labels) / 9 <= 0.2
    assert m.value(TOKENS, **labels) == 10
    assert m.value(TTFB + "_count", upstream="test") == 1
    ttfb = m.value(TTFB + "_sum", upstream="test")
    if preamble:
        assert ttfb < 0.2 < ttft
    else:
        assert ttfb <= ttft
    assert m.value(REQUESTS, upstream="test", method="POST", status_code="200") == 1
    assert m.total(DROPPED) == 0
    assert m.total(ERRORS) == 0


KINDS = [
    # (path, body, kind, content events the mock sends)
    ("/v1/chat/completions", CHAT, "reasoning", 5),
    ("/v1/chat/completions", CHAT, "tool", 5),
    ("/v1/responses", {"model": "gpt-x", "stream": True}, "reasoning", 5),
    ("/v1/responses", {"model": "gpt-x", "stream": True}, "tool", 5),
    ("/v1/messages", {"model": "gpt-x", "stream": True}, "reasoning", 5),
    ("/v1/messages", {"model": "gpt-x", "stream": True}, "tool", 5),
    ("/v1beta/models/gpt-x:streamGenerateContent?alt=sse", {}, "reasoning", 5),
    ("/v1beta/models/gpt-x:streamGenerateContent?alt=sse", {}, "tool", 1),
    ("/api/chat", {"model": "gpt-x"}, "reasoning", 5),
    ("/api/chat", {"model": "gpt-x"}, "tool", 1),
    ("/api/generate", {"model": "gpt-x"}, "reasoning", 5),
]


@pytest.mark.parametrize(
    ("path", "body", "kind", "events"),
    KINDS,
    ids=[f"{p.split('/')[-1].split('?')[0].split(':')[-1]}-{k}" for p, _, k, _ in KINDS],
)
def test_reasoning_and_tool_calls_are_tokens(start_proxy, mock_url, path, body, kind, events):
    """Reasoning/thinking deltas and tool-call arguments count as token events (TTFT, ITL),
    while Anthropic's signature_delta and empty deltas do not."""
    knobs = {"x-mock-kind": kind, "x-mock-tokens": "5", "x-mock-ttft": "0.05"}
    with metered(start_proxy, mock_url) as (proxy, admin):
        response = post(proxy.url, path, body, knobs)
        assert response.complete
        m = wait_for(admin, finished())
    assert_one_stream(m, "gpt-x", "completed")
    assert m.value(TTFT + "_count", upstream="test", model="gpt-x") == 1
    assert m.value(ITL + "_count", upstream="test", model="gpt-x") == events - 1
    assert m.value(TOKENS, upstream="test", model="gpt-x") == 5  # usage, or the event count


# --- output tokens from the provider's usage report -----------------------------------------


def _sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"{head}data: {payload}\n\n".encode()


def _chat_delta(text: str) -> bytes:
    return _sse({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})


USAGE_STREAMS = {
    "chat": (
        "/v1/chat/completions",
        "text/event-stream",
        [
            *(_chat_delta(w) for w in ("a", "b", "c")),
            _sse({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 42}}),
            _sse("[DONE]"),
        ],
    ),
    "completions": (
        "/v1/completions",
        "text/event-stream",
        [
            *(_sse({"choices": [{"text": w, "index": 0}]}) for w in ("a", "b", "c")),
            _sse({"choices": [], "usage": {"completion_tokens": 42}}),
            _sse("[DONE]"),
        ],
    ),
    "responses": (
        "/v1/responses",
        "text/event-stream",
        [
            *(
                _sse(
                    {"type": "response.output_text.delta", "delta": w}, "response.output_text.delta"
                )
                for w in ("a", "b", "c")
            ),
            _sse(
                {"type": "response.completed", "response": {"usage": {"output_tokens": 42}}},
                "response.completed",
            ),
        ],
    ),
    "anthropic": (
        "/v1/messages",
        "text/event-stream",
        [
            _sse(
                {"type": "message_start", "message": {"usage": {"output_tokens": 1}}},
                "message_start",
            ),
            *(
                _sse(
                    {"type": "content_block_delta", "delta": {"type": "text_delta", "text": w}},
                    "content_block_delta",
                )
                for w in ("a", "b", "c")
            ),
            _sse({"type": "message_delta", "usage": {"output_tokens": 42}}, "message_delta"),
            _sse({"type": "message_stop"}, "message_stop"),
        ],
    ),
    "gemini": (
        "/v1beta/models/gpt-x:streamGenerateContent?alt=sse",
        "text/event-stream",
        [
            *(_sse({"candidates": [{"content": {"parts": [{"text": w}]}}]}) for w in ("a", "b")),
            _sse(
                {
                    "candidates": [{"content": {"parts": [{"text": "c"}]}, "finishReason": "STOP"}],
                    "usageMetadata": {"candidatesTokenCount": 40, "thoughtsTokenCount": 2},
                }
            ),
        ],
    ),
    "ollama": (
        "/api/chat",
        "application/x-ndjson",
        [
            *(
                json.dumps({"message": {"content": w}, "done": False}).encode() + b"\n"
                for w in ("a", "b", "c")
            ),
            json.dumps({"message": {"content": ""}, "done": True, "eval_count": 42}).encode()
            + b"\n",
        ],
    ),
}


def replay(events: list[bytes], content_type: str, gap: float = 0.02, terminator: bool = True):
    """A raw upstream that answers any request with `events`, one HTTP chunk each."""

    async def handler(reader, writer, state):
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ntransfer-encoding: chunked\r\n"
            b"connection: close\r\n\r\n" % content_type.encode()
        )
        for event in events:
            writer.write(chunk(event))
            await writer.drain()
            await asyncio.sleep(gap)
        if terminator:
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    return raw_server(handler)


@pytest.mark.parametrize("api", list(USAGE_STREAMS))
def test_output_tokens_come_from_usage(start_proxy, api):
    """When the provider reports usage (OpenAI usage chunk, Responses usage, Anthropic
    message_delta, Gemini usageMetadata, Ollama eval_count), output_tokens is that number,
    not the count of token events."""
    path, content_type, events = USAGE_STREAMS[api]
    with replay(events, content_type) as upstream, metered(start_proxy, upstream.url) as (p, a):
        response = post(p.url, path, {"model": "gpt-x", "stream": True})
        assert response.complete
        assert response.body == b"".join(events)
        m = wait_for(a, finished())
    assert_one_stream(m, "gpt-x", "completed")
    assert m.value(TOKENS, upstream="test", model="gpt-x") == 42
    assert m.value(ITL + "_count", upstream="test", model="gpt-x") == 2


@pytest.mark.parametrize("how", ["include_usage", "x-mock-usage"])
def test_openai_usage_chunk_is_not_a_token(start_proxy, mock_url, how):
    """With `stream_options.include_usage` (or the mock's usage knob) the usage chunk sets
    output_tokens and adds no token event."""
    body = {**CHAT}
    knobs = {"x-mock-tokens": "4", "x-mock-ttft": "0.05"}
    if how == "include_usage":
        body["stream_options"] = {"include_usage": True}
    else:
        knobs["x-mock-usage"] = "1"
    with metered(start_proxy, mock_url) as (proxy, admin):
        response = post(proxy.url, "/v1/chat/completions", body, knobs)
        assert b'"completion_tokens":4' in response.body
        m = wait_for(admin, finished())
    assert_one_stream(m, "gpt-x", "completed")
    assert m.value(TOKENS, upstream="test", model="gpt-x") == 4
    assert m.value(ITL + "_count", upstream="test", model="gpt-x") == 3


# --- outcomes: each decided once, with the right side and phase -----------------------------


def open_stream(url: str, path: str, body: dict[str, Any], knobs: dict[str, str]) -> socket.socket:
    """Send a streamed request on a raw socket and return it, unread."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    payload = json.dumps(body).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in knobs.items())
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{head}"
        f"content-length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def read_until(sock: socket.socket, needle: bytes, count: int) -> bytes:
    received = b""
    while received.count(needle) < count:
        data = sock.recv(65536)
        assert data, f"stream ended early: {received!r}"
        received += data
    return received


def assert_dropped(m: Scrape, side: str, phase: str) -> None:
    """Exactly one dropped connection, on this side and in this phase."""
    assert m.total(DROPPED) == 1
    assert m.value(DROPPED, upstream="test", side=side, phase=phase) == 1


def test_client_disconnect_mid_stream(start_proxy, mock_url):
    """A client that leaves after some tokens: outcome client_disconnect, one drop on the
    client side mid_stream, and the active gauge goes 1 -> 0."""
    knobs = {"x-mock-tokens": "100", "x-mock-interval": "0.05", "x-mock-ttft": "0.05"}
    with metered(start_proxy, mock_url) as (proxy, admin):
        sock = open_stream(proxy.url, "/v1/chat/completions", CHAT, knobs)
        read_until(sock, b'"content":"', 4)  # the role chunk's content is "" (not a token)
        assert scrape(admin).value(ACTIVE, upstream="test") == 1
        sock.close()
        m = wait_for(admin, finished())
    assert_one_stream(m, "gpt-x", "client_disconnect")
    assert_dropped(m, "client", "mid_stream")
    assert m.value(TTFT + "_count", upstream="test", model="gpt-x") == 1
    assert m.total(ERRORS) == 0


def test_client_disconnect_before_first_token(start_proxy, mock_url):
    """A client that leaves during a 2 s wait for the first token (after the role chunk):
    client side, before_first_token, no TTFT observed."""
    knobs = {"x-mock-ttft": "2", "x-mock-tokens": "5"}
    with metered(start_proxy, mock_url) as (proxy, admin):
        sock = open_stream(proxy.url, "/v1/chat/completions", CHAT, knobs)
        read_until(sock, b'"role":"assistant"', 1)
        time.sleep(0.3)
        sock.close()
        m = wait_for(admin, finished())
    assert_one_stream(m, "gpt-x", "client_disconnect")
    assert_dropped(m, "client", "before_first_token")
    assert m.value(TTFT + "_count", upstream="test", model="gpt-x") == 0
    assert (
        m.value(DURATION + "_sum", upstream="test", model="gpt-x", outcome="client_disconnect")
        < 1.5
    )


@pytest.mark.parametrize(("after", "phase"), [("0", "before_first_token"), ("3", "mid_stream")])
def test_upstream_abort(start_proxy, mock_url, after, phase):
    """An upstream that cuts the connection (before the first token, or after 3): outcome
    upstream_error, one drop on the upstream side in that phase, reason protocol."""
    knobs = {"x-mock-abort-after": after, "x-mock-tokens": "6", "x-mock-ttft": "0.1"}
    with metered(start_proxy, mock_url) as (proxy, admin):
        response = post(proxy.url, "/v1/chat/completions", CHAT, knobs)
        assert not response.complete
        m = wait_for(admin, finished())
    assert_one_stream(m, "gpt-x", "upstream_error")
    assert_dropped(m, "upstream", phase)
    assert m.total(ERRORS) == 1
    assert m.value(ERRORS, upstream="test", reason="protocol") == 1
    assert m.value(TTFT + "_count", upstream="test", model="gpt-x") == (phase == "mid_stream")


def test_upstream_timeout_mid_stream(start_proxy, mock_url):
    """An upstream silent for longer than read_timeout mid-stream: outcome upstream_timeout,
    reason timeout, one upstream drop mid_stream."""
    upstream = UpstreamConfig(name="test", url=mock_url, read_timeout=0.5)
    knobs = {"x-mock-stall": "2", "x-mock-stall-after": "2", "x-mock-tokens": "4"}
    with metered(start_proxy, [upstream]) as (proxy, admin):
        response = post(proxy.url, "/v1/chat/completions", CHAT, knobs)
        assert not response.complete
        m = wait_for(admin, finished())
    assert_one_stream(m, "gpt-x", "upstream_timeout")
    assert_dropped(m, "upstream", "mid_stream")
    assert m.total(ERRORS) == 1
    assert m.value(ERRORS, upstream="test", reason="timeout") == 1


def test_clean_end_without_terminal_marker(start_proxy):
    """An OpenAI stream that ends cleanly (chunked terminator) but without `[DONE]` is an
    upstream_disconnect, not a completed stream; the client still gets every byte."""
    events = [_chat_delta("a"), _chat_delta("b")]
    with (
        replay(events, "text/event-stream") as upstream,
        metered(start_proxy, upstream.url) as (
            proxy,
            admin,
        ),
    ):
        response = post(proxy.url, "/v1/chat/completions", CHAT)
        assert response.body == b"".join(events)
        m = wait_for(admin, finished())
    assert_one_stream(m, "gpt-x", "upstream_disconnect")
    assert_dropped(m, "upstream", "mid_stream")
    assert m.total(ERRORS) == 0


IN_STREAM_ERRORS = {
    "vllm": (
        "/v1/chat/completions",
        [
            _chat_delta("a"),
            _sse({"error": {"message": "boom", "type": "BadRequestError", "code": 400}}),
            _sse("[DONE]"),
        ],
    ),
    "anthropic": (
        "/v1/messages",
        [
            _sse({"type": "message_start", "message": {}}, "message_start"),
            _sse(
                {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "a"}},
                "content_block_delta",
            ),
            _sse({"type": "error", "error": {"type": "overloaded_error"}}, "error"),
        ],
    ),
}


@pytest.mark.parametrize("api", list(IN_STREAM_ERRORS))
def test_in_stream_error_is_upstream_error(start_proxy, api):
    """A provider error event followed by a clean end (vLLM sends `[DONE]` after it) is
    relayed byte for byte and complete, but accounted as upstream_error, not completed."""
    path, events = IN_STREAM_ERRORS[api]
    with (
        replay(events, "text/event-stream") as upstream,
        metered(start_proxy, upstream.url) as (
            proxy,
            admin,
        ),
    ):
        response = post(proxy.url, path, CHAT)
        assert response.complete
        assert response.body == b"".join(events)
        m = wait_for(admin, finished())
    assert_one_stream(m, "gpt-x", "upstream_error")
    assert_dropped(m, "upstream", "mid_stream")
    assert m.total(ERRORS) == 0  # no transport failure: the reasons are connect/timeout/protocol


def test_requests_by_status(start_proxy, mock_url):
    """requests_total counts every request by method and status; only streamed bodies
    count in streams_total (a 429 answer and a plain GET do not)."""
    with metered(start_proxy, mock_url) as (proxy, admin):
        assert post(proxy.url, "/v1/chat/completions", CHAT, {"x-mock-tokens": "2"}).complete
        assert post(proxy.url, "/v1/chat/completions", CHAT, {"x-mock-status": "429"}).status == 429
        assert client.request(proxy.url, "GET", "/v1/models").status == 200
        m = wait_for(admin, lambda m: m.total(REQUESTS) >= 3)
    assert m.value(REQUESTS, upstream="test", method="POST", status_code="200") == 1
    assert m.value(REQUESTS, upstream="test", method="POST", status_code="429") == 1
    assert m.value(REQUESTS, upstream="test", method="GET", status_code="200") == 1
    assert m.total(REQUESTS) == 3
    assert_one_stream(m, "gpt-x", "completed")
    assert m.value(TTFB + "_count", upstream="test") == 3


def test_early_committed_stream_counts_its_200(start_proxy, mock_url):
    """With keepalive.before_headers, a stream whose 200 was committed before the upstream
    answered counts as a 200 request even when the upstream then times out."""
    upstream = UpstreamConfig(name="test", url=mock_url, read_timeout=0.6)
    with metered(start_proxy, [upstream], keepalive=0.2, before_headers=True) as (proxy, admin):
        response = post(proxy.url, "/v1/chat/completions", CHAT, {"x-mock-headers-delay": "3"})
        assert response.status == 200
        assert b'"type":"upstream_timeout"' in response.body
        m = wait_for(admin, finished())
    assert_one_stream(m, "gpt-x", "upstream_timeout")
    assert_dropped(m, "upstream", "before_first_token")
    assert m.value(ERRORS, upstream="test", reason="timeout") == 1
    assert m.value(KEEPALIVES, upstream="test") >= 1
    assert m.value(REQUESTS, upstream="test", method="POST", status_code="200") == 1


# --- the model label -------------------------------------------------------------------------


def test_model_label_sources(start_proxy, mock_url):
    """model comes from the JSON body, from a Gemini path, and is `unknown` when absent."""
    knobs = {"x-mock-tokens": "2", "x-mock-ttft": "0"}
    with metered(start_proxy, mock_url) as (proxy, admin):
        post(proxy.url, "/v1/chat/completions", CHAT, knobs)
        post(proxy.url, "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse", {}, knobs)
        post(proxy.url, "/v1/chat/completions", {"stream": True}, knobs)
        m = wait_for(admin, finished(3))
    assert m.label_values(STREAMS, "model") == {"gpt-x", "gemini-2.5-pro", "unknown"}
    for model in ("gpt-x", "gemini-2.5-pro", "unknown"):
        assert m.value(STREAMS, upstream="test", model=model, outcome="completed") == 1
        assert m.value(TTFT + "_count", upstream="test", model=model) == 1


def test_model_label_is_capped(start_proxy, mock_url):
    """Past `metrics.max_models` distinct models, new ones are labelled `other`; models seen
    before the cap keep their name."""
    knobs = {"x-mock-tokens": "2", "x-mock-ttft": "0"}
    with metered(start_proxy, mock_url, metrics=MetricsConfig(max_models=2)) as (proxy, admin):
        for model in ("m1", "m2", "m3", "m4", "m1"):
            post(proxy.url, "/v1/chat/completions", {"model": model, "stream": True}, knobs)
        m = wait_for(admin, finished(5))
    assert m.label_values(STREAMS, "model") == {"m1", "m2", "other"}
    assert m.value(STREAMS, upstream="test", model="m1", outcome="completed") == 2
    assert m.value(STREAMS, upstream="test", model="other", outcome="completed") == 2
    assert m.label_values(ITL + "_count", "model") == {"m1", "m2", "other"}
    assert m.value(TOKENS, upstream="test", model="other") == 4


# --- keepalives ------------------------------------------------------------------------------


def test_keepalives_counted(start_proxy, mock_url):
    """keepalives_sent_total equals the comment lines the client received during a stall
    (tests/e2e/test_keepalive.py covers where they go)."""
    knobs = {"x-mock-stall": "0.8", "x-mock-tokens": "4", "x-mock-ttft": "0"}
    with metered(start_proxy, mock_url, keepalive=0.15) as (proxy, admin):
        response = post(proxy.url, "/v1/chat/completions", CHAT, knobs)
        assert response.complete
        m = wait_for(admin, finished())
    comments = response.body.count(b": keepalive\n")
    assert comments >= 2
    assert m.value(KEEPALIVES, upstream="test") == comments
    assert_one_stream(m, "gpt-x", "completed")


def test_a_bodyless_answer_with_a_stream_type_is_no_dropped_stream(start_proxy):
    """HEAD answered with SSE headers and, as HEAD must be, no body: complete for the
    client, and no stream the upstream dropped (nor one in streams_active)."""
    from tests.e2e.test_http1 import req, wire
    from tests.rawserver import read_request

    head_only = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )

    async def handler(reader, writer, state):
        while True:
            try:
                await read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            writer.write(head_only)
            await writer.drain()

    with raw_server(handler, raw=True) as upstream, start_proxy(upstream.url) as proxy:
        with wire(proxy.url) as w:
            w.send(req("HEAD", "/v1/chat/completions"))
            reply = w.response("HEAD")
            assert reply.status == 200
            assert reply.complete
        time.sleep(0.2)
        drop = {"upstream": "test", "side": "upstream", "phase": "before_first_token"}
        disconnect = {"upstream": "test", "model": "unknown", "outcome": "upstream_disconnect"}
        assert proxy.metric("streamproxy_dropped_connections_total", drop) == 0
        assert proxy.metric(STREAMS, disconnect) == 0
        assert proxy.metric(ACTIVE, {"upstream": "test"}) == 0
