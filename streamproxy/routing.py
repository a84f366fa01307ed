"""The route table: which upstream serves a request path, and the URL to send it to.

Pure. The proxy only ever contacts its configured upstream URLs: the target is built
from the upstream's scheme, host and base path plus the request's *path*, so no request
line, Host header or path (absolute-form, `//host/x`, CONNECT) can choose another host.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from streamproxy.config import UpstreamConfig
from streamproxy.errors import BadTarget, NoRoute


@dataclass(frozen=True, slots=True)
class Route:
    """One upstream with its URL split once, at start-up."""

    upstream: UpstreamConfig
    prefix: bytes  # path_prefix, no trailing slash ("/" stays "/")
    base_path: bytes  # the upstream URL's own path, no trailing slash ("" for none)
    credential: tuple[bytes, bytes] | None  # the header injected from api_key_env

    def matches(self, raw_path: bytes) -> bool:
        """Segment-wise prefix match: /v1 matches /v1 and /v1/x, not /v10."""
        prefix = self.prefix
        if prefix == b"/":
            return True
        return raw_path.startswith(prefix) and (
            len(raw_path) == len(prefix) or raw_path[len(prefix)] == 0x2F  # "/"
        )

    def target(self, raw_path: bytes, query: bytes) -> bytes:
        """The request target to send upstream: base path + (stripped) path + query.
        The host is the upstream's own, never taken from the request."""
        path = raw_path
        if self.upstream.strip_prefix and self.prefix != b"/":
            path = raw_path[len(self.prefix) :] or b"/"
        target = self.base_path + path
        return target + b"?" + query if query else target


class RouteTable:
    """Longest matching path_prefix wins (the contract)."""

    def __init__(self, upstreams: Sequence[UpstreamConfig], env: Mapping[str, str]) -> None:
        routes = [_make_route(u, env) for u in upstreams]
        self.routes = sorted(routes, key=lambda r: len(r.prefix), reverse=True)

    def match(self, raw_path: bytes) -> Route:
        """The route for an origin-form path; BadTarget or NoRoute otherwise."""
        check_target(raw_path)
        for route in self.routes:
            if route.matches(raw_path):
                return route
        raise NoRoute(f"no upstream serves {raw_path.decode('latin-1')!r}")


def check_target(raw_path: bytes) -> None:
    """Refuse what is not a plain origin-form path: absolute-form targets, `//host`,
    and dot segments that could climb out of an upstream's base path."""
    if not raw_path.startswith(b"/") or raw_path.startswith(b"//"):
        raise BadTarget("request target must be an origin-form path")
    lowered = raw_path.lower().replace(b"%2e", b".")
    if b".." in lowered.split(b"/"):
        raise BadTarget("request path must not contain '..' segments")


def _make_route(upstream: UpstreamConfig, env: Mapping[str, str]) -> Route:
    parts = urlsplit(upstream.url)
    prefix = upstream.path_prefix.rstrip("/") or "/"
    return Route(
        upstream=upstream,
        prefix=prefix.encode("ascii"),
        base_path=parts.path.rstrip("/").encode("ascii"),
        credential=_credential(upstream, env),
    )


def _credential(upstream: UpstreamConfig, env: Mapping[str, str]) -> tuple[bytes, bytes] | None:
    """The key header for `api_key_env`, read once at start-up (config.py checked it is set)."""
    if not upstream.api_key_env:
        return None
    key = env.get(upstream.api_key_env, "").strip().encode("latin-1")
    header = upstream.api_key_header.encode("ascii")
    return (header, b"Bearer " + key if header == b"authorization" else key)
