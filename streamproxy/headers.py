"""Header rules for both directions. Pure: header lists in, header lists out.

Headers are ASGI-style lists of `(name, value)` byte pairs with lower-case names.
"""

from __future__ import annotations

from collections.abc import Iterable

Headers = list[tuple[bytes, bytes]]

# RFC 9110 section 7.6.1 and the legacy names every proxy strips (nginx, Envoy, Go's
# httputil.ReverseProxy keep the same list). Names listed in `Connection` are added per message.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Never logged, whatever the log line: the second line of defence behind the access
# line's allow-list (logs.py).
REDACTED = frozenset(
    {
        "authorization",
        "x-api-key",
        "api-key",
        "cookie",
        "set-cookie",
        "proxy-authorization",
        "x-goog-api-key",
    }
)

SSE_CONTENT_TYPE = b"text/event-stream"


def _dropped(headers: list[tuple[bytes, bytes]], always: frozenset[bytes]) -> frozenset[bytes]:
    """`always`, plus the headers a Connection header names (hop-by-hop too)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return always | tokens if tokens else always


_REQUEST_DROP = HOP_BY_HOP | {b"host", b"content-length", b"expect"}


def request_headers(
    headers: Iterable[tuple[bytes, bytes]], client_ip: str | None, scheme: str
) -> Headers:
    """Headers to send upstream: hop-by-hop and Host dropped, X-Forwarded-* set.

    Host comes from the upstream URL (upstream.py sets it), Content-Length from the body we
    send. X-Forwarded-For gets the client appended; an existing X-Forwarded-Proto/-Host
    (set by a load balancer in front) is kept.
    """
    headers = list(headers)
    drop = _dropped(headers, _REQUEST_DROP)
    out: Headers = []
    forwarded_for: bytes | None = None
    host: bytes | None = None
    has_proto = has_fwd_host = False
    for name, value in headers:
        name = name.lower()
        if name == b"host":
            host = value
        if name in drop:
            continue
        if name == b"x-forwarded-for":
            forwarded_for = value if forwarded_for is None else forwarded_for + b", " + value
            continue
        has_proto = has_proto or name == b"x-forwarded-proto"
        has_fwd_host = has_fwd_host or name == b"x-forwarded-host"
        out.append((name, value))
    if client_ip:
        ip = client_ip.encode("latin-1")
        forwarded_for = ip if forwarded_for is None else forwarded_for + b", " + ip
    if forwarded_for is not None:
        out.append((b"x-forwarded-for", forwarded_for))
    if not has_proto:
        out.append((b"x-forwarded-proto", scheme.encode("latin-1")))
    if not has_fwd_host and host is not None:
        out.append((b"x-forwarded-host", host))
    return out


CREDENTIAL_HEADERS = frozenset({b"authorization", b"x-api-key", b"api-key", b"x-goog-api-key"})


def with_credential(headers: Headers, credential: tuple[bytes, bytes]) -> Headers:
    """The upstream's own key in place of any key the client sent (with injection on,
    apps may send a dummy key, and it must not reach the upstream)."""
    kept = [(name, value) for name, value in headers if name not in CREDENTIAL_HEADERS]
    kept.append(credential)
    return kept


def response_headers(headers: Iterable[tuple[bytes, bytes]]) -> tuple[Headers, bool]:
    """Headers to send downstream, and whether the body is SSE.

    Hop-by-hop headers are dropped (http1.py frames the body itself). A body without
    Content-Length is a stream: it gets `X-Accel-Buffering: no` so an nginx in front
    passes it through unbuffered; SSE also gets `Cache-Control: no-cache` unless the
    upstream chose a policy.
    """
    headers = list(headers)
    drop = _dropped(headers, HOP_BY_HOP)
    out: Headers = []
    is_sse = has_length = has_cache_control = has_accel = False
    for name, value in headers:
        name = name.lower()
        if name in drop:
            continue
        if name == b"content-type":
            is_sse = value.split(b";", 1)[0].strip().lower() == SSE_CONTENT_TYPE
        elif name == b"content-length":
            has_length = True
        elif name == b"cache-control":
            has_cache_control = True
        elif name == b"x-accel-buffering":
            has_accel = True
        out.append((name, value))
    if (is_sse or not has_length) and not has_accel:
        out.append((b"x-accel-buffering", b"no"))
    if is_sse and not has_cache_control:
        out.append((b"cache-control", b"no-cache"))
    return out, is_sse


def get(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of a (lower-case) header name, or None."""
    for key, value in headers:
        if key == name:
            return value
    return None
