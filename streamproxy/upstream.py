"""Upstream HTTP clients and the one place httpx exceptions become ours.

One `httpx.AsyncClient` per upstream, built from its config. The request is built with
`httpx.Request` and sent with `client.send()`: that keeps the client's default headers
(its own Accept-Encoding, User-Agent) out, so the upstream sees the app's headers.
Bodies are read with `aiter_raw()`: each network read as it arrives, never decoded
(`aiter_bytes()` would decompress gzip and break byte-exactness).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import httpx

from streamproxy.config import UpstreamConfig
from streamproxy.errors import UpstreamConnectError, UpstreamProtocolError, UpstreamTimeout


def make_client(upstream: UpstreamConfig) -> httpx.AsyncClient:
    """A pooled client for one upstream.

    No connection cap: httpx's default of 100 would queue the 101st concurrent stream.
    `read` is the longest silence tolerated, both before the response headers (-> 504)
    and between body reads (-> upstream_timeout mid-stream).
    """
    timeout = httpx.Timeout(
        connect=upstream.connect_timeout,
        read=upstream.read_timeout,
        write=upstream.read_timeout,
        pool=None,
    )
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    return httpx.AsyncClient(timeout=timeout, limits=limits, follow_redirects=False)


@contextlib.contextmanager
def classify_errors() -> Iterator[None]:
    """Translate httpx's exceptions into the proxy's tree (httpcore's `map_exceptions`)."""
    try:
        yield
    except httpx.ConnectTimeout as exc:
        raise UpstreamConnectError(f"connect to upstream timed out: {exc}", timed_out=True) from exc
    except httpx.ConnectError as exc:
        raise UpstreamConnectError(f"cannot connect to upstream: {exc}") from exc
    except httpx.TimeoutException as exc:  # ReadTimeout, WriteTimeout, PoolTimeout
        raise UpstreamTimeout("upstream did not answer within read_timeout") from exc
    except (httpx.TransportError, httpx.StreamError) as exc:
        raise UpstreamProtocolError(
            f"upstream connection failed: {str(exc) or type(exc).__name__}"
        ) from exc
