"""HAProxy's idle timeouts vs keepalive: a load balancer that cuts connections silent for
2 s lets a stream with a 5 s upstream stall through only because the proxy keeps it busy.

Rig: client -> HAProxy (timeout client/server 2s, http-no-delay) -> proxy -> mock. The
keepalive-off run of each case (run at the same time, through its own HAProxy) is the
control: it shows HAProxy really cuts the stall.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from streamproxy.mock_upstream import expected_text
from tests import client

pytestmark = pytest.mark.lb

TOKENS = 16
STALLS = {
    "event": {"x-mock-stall": "5"},  # between two events, mid-stream
    # before the first event, with nothing but the headers sent
    "first": {"x-mock-stall": "5", "x-mock-stall-mode": "first", "x-mock-role-chunk": "0"},
}


def _stream(url: str, knobs: dict[str, str]) -> tuple[client.RawResponse, float]:
    """A streamed chat request through `url`, and how long the whole exchange took."""
    headers = [("content-type", "application/json"), ("x-mock-tokens", str(TOKENS)), *knobs.items()]
    body = json.dumps({"model": "m", "stream": True}).encode()
    started = time.monotonic()
    response = client.request(url, "POST", "/v1/chat/completions", headers=headers, body=body)
    return response, time.monotonic() - started


def _chat_text(body: bytes) -> str:
    """The text of an OpenAI chat stream (comment lines and [DONE] skipped)."""
    text = []
    for line in body.splitlines():
        if line.startswith(b"data: {"):
            for choice in json.loads(line[6:])["choices"]:
                text.append(choice["delta"].get("content") or "")
    return "".join(text)


@pytest.mark.parametrize("stall", list(STALLS))
def test_keepalive_carries_a_stall_through_haproxy(start_proxy, mock_url, haproxy, stall):
    """With keepalive every 0.5 s, a 5 s stall passes HAProxy's 2 s idle timeouts and the
    stream completes with its full text and [DONE]; the same stream with keepalive off,
    run alongside as the control, is cut after ~2 s without [DONE]."""
    with (
        start_proxy(mock_url, keepalive=0.5) as keeping,
        start_proxy(mock_url, keepalive=0) as silent,
        ThreadPoolExecutor(2) as pool,
    ):
        kept_lb, cut_lb = haproxy(keeping.url, timeout="2s"), haproxy(silent.url, timeout="2s")
        kept_run = pool.submit(_stream, kept_lb.url, STALLS[stall])
        cut_run = pool.submit(_stream, cut_lb.url, STALLS[stall])
        (kept, kept_elapsed), (cut, cut_elapsed) = kept_run.result(), cut_run.result()

    assert kept.status == 200
    assert kept.complete, kept_lb.output()
    assert kept.body.rstrip().endswith(b"data: [DONE]")
    assert _chat_text(kept.body) == expected_text(TOKENS)
    assert b": keepalive\n" in kept.body
    assert kept_elapsed > 4.5  # it really went through the whole stall

    assert cut.status == 200  # the control: HAProxy does cut this stall
    assert not cut.complete
    assert b"[DONE]" not in cut.body
    assert 1.5 < cut_elapsed < 4.0  # by the 2 s idle timeout, long before the stall ends
