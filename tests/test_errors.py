"""Error bodies and the in-stream error event, in the shapes the SDKs parse."""

from __future__ import annotations

import json

from streamproxy.errors import (
    NoRoute,
    UpstreamConnectError,
    UpstreamTimeout,
    describe_error_body,
    json_error_body,
    sse_error_frame,
)


def test_openai_shape():
    """Everywhere but Anthropic routes: {"error": {"message", "type", "code"}}."""
    body = json.loads(json_error_body(UpstreamTimeout("slow"), anthropic=False))
    assert body["error"]["message"] == "slow"
    assert {"type", "code", "param"} <= body["error"].keys()


def test_anthropic_shape():
    """On Anthropic routes: {"type": "error", "error": {"type", "message"}}."""
    body = json.loads(json_error_body(NoRoute("nope"), anthropic=True))
    assert body == {"type": "error", "error": {"type": "not_found_error", "message": "nope"}}


def test_statuses_travel_with_the_exceptions():
    """Connect failures are 502 (504 if the connect timed out), silence is 504."""
    assert UpstreamConnectError("x").status == 502
    assert UpstreamConnectError("x", timed_out=True).status == 504
    assert UpstreamTimeout("x").status == 504
    assert (UpstreamConnectError("x").reason, UpstreamTimeout("x").reason) == (
        "connect",
        "timeout",
    )


def test_sse_error_frame_is_one_whole_event():
    """The contract's frame: `event: error`, one data line, one blank line; a status
    only when asked for."""
    frame = sse_error_frame("upstream_error", 'line\nbreak "quoted"')
    assert frame.startswith(b"event: error\ndata: ")
    assert frame.endswith(b"\n\n")
    assert frame.count(b"\n") == 3  # the message's newline is escaped inside the JSON
    data = json.loads(frame.split(b"data: ", 1)[1])
    assert data == {"type": "error", "error": {"type": "upstream_error",
                                               "message": 'line\nbreak "quoted"'}}  # fmt: skip
    assert b'"status":429' in sse_error_frame("rate_limit_error", "slow down", status=429)


def test_describe_error_body():
    """The type and message of OpenAI/Anthropic error bodies, else the text itself."""
    openai = b'{"error": {"message": "Rate limit", "type": "rate_limit_error"}}'
    anthropic = b'{"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}'
    assert describe_error_body(openai) == ("rate_limit_error", "Rate limit")
    assert describe_error_body(anthropic) == ("overloaded_error", "busy")
    assert describe_error_body(b"<html>Bad gateway</html>") == (
        "upstream_error",
        "<html>Bad gateway</html>",
    )
    assert describe_error_body(b"") == ("upstream_error", "no body")
