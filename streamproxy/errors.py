"""Exception types and the error bodies clients' SDKs understand.

The tree, in the spirit of httpx's `_exceptions.py`::

    ProxyError                      every error the relay turns into a response
    ├── RequestError                the client's request cannot be served (4xx)
    │   ├── BadTarget               400: not an origin-form path, or CONNECT
    │   ├── NoRoute                 404: no upstream's path_prefix matches
    │   ├── BadRequestBody          400: the request body's chunked framing is broken
    │   ├── BodyTimeout             408: the request body stopped arriving
    │   └── BodyTooLarge            413: request body over limits.max_request_body
    ├── ClientDisconnected          the client went away (no response possible)
    └── UpstreamError               the upstream failed; `reason` is the metric label
        ├── UpstreamConnectError    502 (504 if the connect timed out), reason "connect"
        ├── UpstreamTimeout         504, reason "timeout"
        └── UpstreamProtocolError   502, reason "protocol" (reset, garbage, truncated body)

Each exception carries the status it implies (h11's `error_status_hint` idea), so the
relay never maps types to statuses itself. Transport failures are raised in these
terms at one place: `upstream.py`.
"""

from __future__ import annotations

from typing import Literal

import orjson

UpstreamReason = Literal["connect", "timeout", "protocol"]


class ProxyError(Exception):
    """Base of every error the relay answers with an error response."""

    status: int = 500
    error_type: str = "proxy_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RequestError(ProxyError):
    """The client's request cannot be served as sent."""

    status = 400
    error_type = "invalid_request_error"


class BadTarget(RequestError):
    """Not an origin-form request target, or a method a reverse proxy must refuse."""

    status = 400


class MethodNotAllowed(RequestError):
    """CONNECT: streamproxy is a reverse proxy, never a tunnel."""

    status = 405


class NoRoute(RequestError):
    """No configured upstream serves this path."""

    status = 404
    error_type = "not_found_error"


class BadRequestBody(RequestError):
    """The request body could not be parsed (broken chunked framing)."""

    status = 400


class BodyTimeout(RequestError):
    """The request body stopped arriving (http1.BODY_TIMEOUT)."""

    status = 408
    error_type = "request_timeout"


class BodyTooLarge(RequestError):
    """The request body exceeds `limits.max_request_body`."""

    status = 413
    error_type = "request_too_large"


class ClientDisconnected(Exception):
    """The client closed its connection; nothing more can be sent to it."""


class UpstreamError(ProxyError):
    """The upstream failed. `reason` is the `streamproxy_upstream_errors_total` label."""

    status = 502
    error_type = "upstream_error"
    reason: UpstreamReason = "protocol"


class UpstreamConnectError(UpstreamError):
    """No connection to the upstream (refused, DNS, TLS, connect timeout)."""

    reason = "connect"

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        if timed_out:
            self.status = 504


class UpstreamTimeout(UpstreamError):
    """The upstream was silent for longer than its read_timeout."""

    status = 504
    error_type = "upstream_timeout"
    reason = "timeout"


class UpstreamProtocolError(UpstreamError):
    """The upstream broke HTTP: reset, garbage, or a body cut short."""

    reason = "protocol"


class ProxyShuttingDown(UpstreamError):
    """The drain timeout ran out while this stream was still running."""

    status = 503
    error_type = "proxy_shutting_down"


def json_error_body(error: ProxyError, *, anthropic: bool) -> bytes:
    """The error body the client's SDK parses: Anthropic's shape on Anthropic routes,
    OpenAI's `{"error": {"message", "type", "code"}}` everywhere else."""
    if anthropic:
        payload: dict[str, object] = {
            "type": "error",
            "error": {"type": _anthropic_type(error), "message": error.message},
        }
    else:
        payload = {
            "error": {
                "message": error.message,
                "type": error.error_type,
                "param": None,
                "code": error.error_type,
            }
        }
    return orjson.dumps(payload)


def sse_error_frame(error_type: str, message: str, status: int | None = None) -> bytes:
    """The contract's in-stream error event, which both the openai and anthropic SDKs raise
    on. `status` is added when the error stands for an HTTP status the client never saw
    (after `keepalive.before_headers` committed 200)."""
    error: dict[str, object] = {"type": error_type, "message": message}
    if status is not None:
        error["status"] = status
    data = orjson.dumps({"type": "error", "error": error})
    return b"event: error\ndata: " + data + b"\n\n"


def _anthropic_type(error: ProxyError) -> str:
    # Anthropic's documented error types; the SDK maps status codes to classes itself.
    if isinstance(error, RequestError):
        return "not_found_error" if error.status == 404 else "invalid_request_error"
    if error.status == 504:
        return "timeout_error"
    return "api_error"


def describe_error_body(body: bytes) -> tuple[str, str]:
    """(type, message) from an OpenAI- or Anthropic-shaped error body, else its text."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        return str(error.get("type") or "upstream_error"), str(error.get("message") or "")
    text = body.decode("utf-8", "replace").strip()[:500]
    return "upstream_error", text or "no body"
