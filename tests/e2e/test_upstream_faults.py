"""Upstream failures: clear errors before the response, visibly broken streams after it."""

from __future__ import annotations

import asyncio
import json

import anthropic
import openai
import pytest

from streamproxy.config import UpstreamConfig
from tests import client
from tests.rawserver import SSE_HEAD, chunk, raw_server
from tests.support import bind_loopback

CHAT = b'{"model": "gpt-test", "stream": true, "messages": []}'
JSON = [("content-type", "application/json")]


def _closed_port_url() -> str:
    sock = bind_loopback()  # bound, never listening: connections are refused
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    return url


def test_connect_failure_is_502_in_openai_shape(start_proxy, sdk):
    """An unreachable upstream gives 502 with the OpenAI error body, counted as `connect`."""
    with start_proxy(_closed_port_url()) as proxy:
        response = client.request(proxy.url, "POST", "/v1/chat/completions", JSON, CHAT)
        assert response.status == 502
        error = client.json_body(response)["error"]
        assert {"message", "type", "code"} <= error.keys()
        assert (
            proxy.metric(
                "streamproxy_upstream_errors_total", {"upstream": "test", "reason": "connect"}
            )
            == 1
        )
        oa = sdk.openai(proxy.url)
        with pytest.raises(openai.InternalServerError) as raised:
            oa.chat.completions.create(model="m", messages=[], stream=True)
        assert raised.value.status_code == 502


def test_connect_failure_on_anthropic_route_uses_anthropic_shape(start_proxy, sdk):
    """On /v1/messages the 502 body is Anthropic's `{"type": "error", "error": {...}}`."""
    with start_proxy(_closed_port_url()) as proxy:
        response = client.request(proxy.url, "POST", "/v1/messages", JSON, CHAT)
        body = client.json_body(response)
        assert response.status == 502
        assert body["type"] == "error"
        assert {"type", "message"} <= body["error"].keys()
        an = sdk.anthropic(proxy.url)
        with pytest.raises(anthropic.InternalServerError):
            an.messages.create(model="m", max_tokens=5, messages=[])


def test_no_response_headers_within_timeout_is_504(start_proxy, mock_url):
    """An upstream that does not answer within read_timeout gives 504, reason `timeout`."""
    upstream = UpstreamConfig(name="test", url=mock_url, read_timeout=0.5)
    with start_proxy([upstream]) as proxy:
        headers = [*JSON, ("x-mock-headers-delay", "3")]
        response = client.request(proxy.url, "POST", "/v1/chat/completions", headers, CHAT)
        assert response.status == 504
        assert "error" in client.json_body(response)
        assert (
            proxy.metric(
                "streamproxy_upstream_errors_total", {"upstream": "test", "reason": "timeout"}
            )
            == 1
        )
        assert (
            proxy.metric(
                "streamproxy_streams_total",
                {"upstream": "test", "model": "gpt-test", "outcome": "upstream_timeout"},
            )
            == 1
        )


def test_garbage_from_upstream_is_502_protocol(start_proxy):
    """An upstream that answers with something that is not HTTP gives 502, reason `protocol`."""

    async def garbage(reader, writer, state):
        writer.write(b"this is not http\r\n\r\n")
        await writer.drain()

    with raw_server(garbage) as upstream, start_proxy(upstream.url) as proxy:
        response = client.request(proxy.url, "POST", "/v1/chat/completions", JSON, CHAT)
        assert response.status == 502
        assert (
            proxy.metric(
                "streamproxy_upstream_errors_total", {"upstream": "test", "reason": "protocol"}
            )
            == 1
        )


def test_upstream_error_status_passes_through(start_proxy, mock_url, sdk):
    """An upstream 429 reaches the client unchanged: status, body and headers."""
    with start_proxy(mock_url) as proxy:
        headers = [*JSON, ("x-mock-status", "429")]
        response = client.request(proxy.url, "POST", "/v1/chat/completions", headers, CHAT)
        assert response.status == 429
        assert client.json_body(response)["error"]["type"]
        oa = sdk.openai(proxy.url)
        with pytest.raises(openai.RateLimitError):
            oa.chat.completions.create(
                model="m", messages=[], extra_headers={"x-mock-status": "429"}
            )


def test_abort_at_event_boundary_sends_error_event(start_proxy, mock_url):
    """An upstream that dies between events: the client gets the contract's error event
    and a body without its chunked terminator."""
    with start_proxy(mock_url) as proxy:
        headers = [*JSON, ("x-mock-abort-after", "3"), ("x-mock-tokens", "10")]
        response = client.request(proxy.url, "POST", "/v1/chat/completions", headers, CHAT)
        assert response.status == 200
        assert not response.complete
        last_event = response.body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
        assert last_event.startswith(b"event: error\ndata: ")
        data = json.loads(last_event.split(b"data: ", 1)[1])
        assert data["type"] == "error"
        assert data["error"]["type"] == "upstream_error"
        assert "closed the connection mid-body" in data["error"]["message"]


def test_abort_mid_line_adds_nothing(start_proxy, mock_url):
    """An upstream that dies inside an event: nothing is appended (an added byte could
    complete a partial event), and the body is left incomplete."""
    with start_proxy(mock_url) as proxy:
        headers = [
            *JSON,
            ("x-mock-abort-after", "3"),
            ("x-mock-abort-mode", "line"),
            ("x-mock-tokens", "10"),
        ]
        response = client.request(proxy.url, "POST", "/v1/chat/completions", headers, CHAT)
        assert not response.complete
        assert b"event: error" not in response.body
        assert not response.body.endswith(b"\n")


def test_both_sdks_raise_on_midstream_abort(start_proxy, mock_url, sdk):
    """openai and anthropic SDKs raise instead of returning a silently truncated answer."""
    headers = {"x-mock-abort-after": "3", "x-mock-tokens": "10"}
    with start_proxy(mock_url) as proxy:
        oa = sdk.openai(proxy.url)
        with pytest.raises(openai.APIError, match="closed the connection mid-body"):
            for _ in oa.chat.completions.create(
                model="m", messages=[], stream=True, extra_headers=headers
            ):
                pass
        an = sdk.anthropic(proxy.url)
        with (
            pytest.raises(anthropic.APIError),
            an.messages.stream(
                model="m", max_tokens=10, messages=[], extra_headers=headers
            ) as stream,
        ):
            for _ in stream.text_stream:
                pass


def test_silence_past_read_timeout_mid_stream(start_proxy):
    """An upstream silent mid-stream for longer than read_timeout: error event with the
    timeout type, outcome `upstream_timeout`, phase mid_stream."""
    token = b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'

    async def stalls(reader, writer, state):
        writer.write(SSE_HEAD + chunk(token))
        await writer.drain()
        await asyncio.sleep(5)

    with raw_server(stalls) as upstream:
        config = UpstreamConfig(name="test", url=upstream.url, read_timeout=0.5)
        with start_proxy([config], keepalive=0) as proxy:
            response = client.request(proxy.url, "POST", "/v1/chat/completions", JSON, CHAT)
            assert not response.complete
            assert response.body.startswith(token)
            assert b'"type":"upstream_timeout"' in response.body
            assert (
                proxy.metric(
                    "streamproxy_dropped_connections_total",
                    {"upstream": "test", "side": "upstream", "phase": "mid_stream"},
                )
                == 1
            )
