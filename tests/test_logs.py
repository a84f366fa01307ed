"""The redaction processor: the second line of defence behind the access line's allow-list."""

from __future__ import annotations

import io
import json

import structlog

from streamproxy import logs
from streamproxy.logs import MASK, redact
from streamproxy.observer import StreamRecord


def test_sensitive_keys_are_masked_whatever_their_case():
    """Authorization, x-api-key, api-key, cookie and set-cookie values never survive."""
    event = {k: "secret-value" for k in ("Authorization", "x-api-key", "API-KEY", "cookie",
                                          "Set-Cookie")}  # fmt: skip
    assert set(redact(None, "info", dict(event)).values()) == {MASK}


def test_nested_headers_are_masked():
    """Header dicts and (name, value) lists, str or bytes names, are masked inside."""
    event = {
        "headers": {"authorization": "Bearer abc", "accept": "*/*"},
        "raw": [(b"x-api-key", b"k"), (b"accept", b"*/*")],
    }
    out = redact(None, "info", event)
    assert out["headers"] == {"authorization": MASK, "accept": "*/*"}
    assert out["raw"] == [(b"x-api-key", MASK), (b"accept", b"*/*")]


def test_secret_shapes_inside_strings_are_cut():
    """Bearer tokens, OpenAI/Anthropic key shapes and query-string keys are cut from any text."""
    event = {
        "error": "upstream said: Bearer sk-proj-abcdefghijklmnop is invalid",
        "url": "/v1beta/models/x:streamGenerateContent?alt=sse&key=AIzaSyTOPSECRET",
        "note": "key sk-ant-api03-ABCDEFGHIJKLMNOP leaked",
    }
    out = redact(None, "info", event)
    text = json.dumps(out)
    for secret in ("abcdefghijklmnop", "AIzaSyTOPSECRET", "ABCDEFGHIJKLMNOP"):
        assert secret not in text
    assert out["url"].endswith("key=" + MASK)


def test_plain_values_pass_untouched():
    """Numbers, None and ordinary strings are left exactly as they were."""
    event = {"status": 200, "ttft": 1.5, "output_tokens": None, "path": "/v1/chat/completions"}
    assert redact(None, "info", dict(event)) == event


def test_configured_json_lines_are_redacted():
    """Through the configured pipeline, a line with a secret comes out masked, as JSON."""
    out = io.StringIO()
    logs.configure("info", "json", stream=out, cache=False)
    structlog.get_logger("t").info("oops", authorization="Bearer sk-live-1234567890")
    line = json.loads(out.getvalue().splitlines()[-1])
    assert line["authorization"] == MASK
    assert line["event"] == "oops"
    logs.configure("warning", "console", cache=False)


ACCESS_FIELDS = dict(
    method="POST",
    path="/v1/chat/completions",
    upstream="openai",
    model="gpt-4o",
    status=200,
    record=StreamRecord("completed", True, 5120, 0.0123, 0.02, 16, None, 1.5, "body"),
    error="upstream said: Bearer sk-live-1234567890",
)


def test_the_direct_access_line_is_what_structlog_would_write():
    """The JSON access line skips structlog's pipeline for speed; it must still be the
    same object in the same key order as the pipeline's, request id and redaction included."""
    fields = ACCESS_FIELDS
    out = io.StringIO()
    logs.configure("info", "json", stream=out, cache=False)
    try:
        logs.access_line(request_id="rid-7", **fields)
        logs._access.json_out = None  # the same line through structlog's pipeline
        with structlog.contextvars.bound_contextvars(request_id="rid-7"):
            logs.access_line(request_id="rid-7", **fields)
    finally:
        logs.configure("warning", "console", cache=False)
    direct, piped = (json.loads(line) for line in out.getvalue().splitlines())
    assert direct["error"] == "upstream said: Bearer " + MASK
    assert direct.pop("timestamp").endswith("Z")
    assert piped.pop("timestamp").endswith("Z")
    assert list(direct.items()) == list(piped.items())
    assert direct["request_id"] == "rid-7"
    assert direct["ttfb"] == 12.3


def test_access_lines_follow_the_level():
    out = io.StringIO()
    logs.configure("warning", "json", stream=out, cache=False)
    try:
        logs.access_line(request_id="r", **ACCESS_FIELDS)
    finally:
        logs.configure("warning", "console", cache=False)
    assert out.getvalue() == ""
