"""Opt-in keepalive.before_headers: commit 200 + SSE early for slow-to-answer upstreams."""

from __future__ import annotations

import json
import time

import openai
import pytest

from streamproxy.mock_upstream import expected_text
from tests import client

CHAT = b'{"model": "m", "stream": true, "messages": []}'
SLOW_HEADERS = [
    ("content-type", "application/json"),
    ("x-mock-headers-delay", "1.5"),
    ("x-mock-tokens", "4"),
]


def _comment_lines(body: bytes) -> int:
    return sum(1 for line in body.split(b"\n") if line == b": keepalive")


def test_slow_headers_get_early_200_and_comments(start_proxy, mock_url):
    """An upstream that takes 1.5 s to send headers: the client gets 200 and SSE headers
    after one interval, comments meanwhile, then the upstream's events, completely."""
    with start_proxy(mock_url, keepalive=0.4, before_headers=True) as proxy:
        response = client.request(proxy.url, "POST", "/v1/chat/completions", SLOW_HEADERS, CHAT)
        assert response.status == 200
        assert response.header(b"content-type").startswith(b"text/event-stream")
        assert response.complete
        assert response.chunks[0][0] < 1.0  # the first comment came well before the headers
        assert response.chunks[0][1] == b": keepalive\n"
        assert _comment_lines(response.body) >= 2
        assert response.body.endswith(b"data: [DONE]\n\n")
        assert proxy.metric("streamproxy_keepalives_sent_total", {"upstream": "test"}) >= 2


def test_sdk_reads_early_committed_stream(start_proxy, mock_url, sdk):
    """The openai SDK reads a stream whose headers were committed early, text intact."""
    with start_proxy(mock_url, keepalive=0.4, before_headers=True) as proxy:
        oa = sdk.openai(proxy.url)
        stream = oa.chat.completions.create(
            model="m",
            messages=[],
            stream=True,
            extra_headers={"x-mock-headers-delay": "1.2", "x-mock-tokens": "6"},
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == expected_text(6)


def test_error_status_after_early_commit_becomes_error_event(start_proxy, mock_url, sdk):
    """An upstream error status after the early commit reaches the client as the SSE
    error event carrying that status and message, and the SDK raises."""
    headers = [*SLOW_HEADERS, ("x-mock-status", "429")]
    with start_proxy(mock_url, keepalive=0.4, before_headers=True) as proxy:
        response = client.request(proxy.url, "POST", "/v1/chat/completions", headers, CHAT)
        assert response.status == 200
        assert not response.complete
        event = response.body.split(b"event: error\n", 1)[1]
        error = json.loads(event.split(b"data: ", 1)[1])["error"]
        assert error["status"] == 429
        assert "429" in error["message"]
        oa = sdk.openai(proxy.url)
        with pytest.raises(openai.APIError, match="429"):
            for _ in oa.chat.completions.create(
                model="m",
                messages=[],
                stream=True,
                extra_headers={"x-mock-headers-delay": "1", "x-mock-status": "429"},
            ):
                pass


def test_fast_upstream_keeps_its_own_status(start_proxy, mock_url):
    """An upstream that answers within the interval is relayed as usual: its own error
    status and JSON body, no early commit."""
    headers = [("content-type", "application/json"), ("x-mock-status", "429")]
    with start_proxy(mock_url, keepalive=1.0, before_headers=True) as proxy:
        response = client.request(proxy.url, "POST", "/v1/chat/completions", headers, CHAT)
    assert response.status == 429
    assert "error" in json.loads(response.body)


def test_off_by_default_and_not_for_non_stream_requests(start_proxy, mock_url):
    """Without the option, or for a request that does not ask for a stream, nothing is
    committed early: the client waits for the upstream's own headers."""
    body = b'{"model": "m", "stream": false, "messages": []}'
    with start_proxy(mock_url, keepalive=0.3, before_headers=True) as proxy:
        started = time.monotonic()
        response = client.request(proxy.url, "POST", "/v1/chat/completions", SLOW_HEADERS, body)
        assert response.header(b"content-type") == b"application/json"
        assert time.monotonic() - started > 1.4
    with start_proxy(mock_url, keepalive=0.3) as proxy:
        response = client.request(proxy.url, "POST", "/v1/chat/completions", SLOW_HEADERS, CHAT)
        assert response.chunks[0][1] != b": keepalive\n"
        assert response.chunks[0][0] > 1.4
