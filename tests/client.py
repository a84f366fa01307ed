"""A low-level HTTP/1.1 client for tests: h11 over a plain socket.

It sees what SDKs hide: every body chunk with its arrival time, whether the body ended
with its proper terminator (`complete`) or the connection was cut, and the exact bytes.
"""

from __future__ import annotations

import base64
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import h11


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    chunks: list[tuple[float, bytes]] = field(default_factory=list)  # (seconds since send, data)
    complete: bool = False  # EndOfMessage seen (chunked terminator / full Content-Length)

    @property
    def body(self) -> bytes:
        return b"".join(data for _, data in self.chunks)

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


def request(
    url: str,
    method: str = "GET",
    target: str = "/",
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    timeout: float = 30.0,
    max_seconds: float | None = None,
    raw_body: bytes | None = None,
    http_version: str = "1.1",
) -> RawResponse:
    """Send one request and read the whole response (or until the peer cuts it).
    `raw_body` is written as is after the head (for hand-made chunked bodies)."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
    try:
        return exchange(
            sock,
            f"{parts.hostname}:{parts.port}",
            method,
            target,
            headers,
            body,
            max_seconds,
            raw_body,
            http_version,
        )
    finally:
        sock.close()


def exchange(
    sock: socket.socket,
    host: str,
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None,
    body: bytes,
    max_seconds: float | None = None,
    raw_body: bytes | None = None,
    http_version: str = "1.1",
) -> RawResponse:
    conn = h11.Connection(h11.CLIENT)
    all_headers = [("host", host), *(headers or [])]
    if body:
        all_headers.append(("content-length", str(len(body))))
    started = time.monotonic()
    if raw_body is not None or http_version != "1.1":  # h11 only writes HTTP/1.1 framing
        lines = [f"{method} {target} HTTP/{http_version}", *(f"{k}: {v}" for k, v in all_headers)]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode()
        sock.sendall(head + (body if raw_body is None else raw_body))
        conn = h11.Connection(h11.CLIENT)  # in the state of having sent a request
        conn.send(
            h11.Request(method=method, target="/", headers=[("host", "x"), ("content-length", "0")])
        )
        conn.send(h11.EndOfMessage())
    else:
        request = h11.Request(method=method, target=target, headers=all_headers)
        sock.sendall(conn.send(request))
        if body:
            sock.sendall(conn.send(h11.Data(data=body)))
        sock.sendall(conn.send(h11.EndOfMessage()))
    response: RawResponse | None = None
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            break  # the peer cut the body short: `complete` stays False
        if event is h11.NEED_DATA:
            if max_seconds is not None and time.monotonic() - started > max_seconds:
                break
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                data = b""
            try:
                conn.receive_data(data)
            except h11.RemoteProtocolError:
                break
            continue
        if isinstance(event, h11.Response):
            response = RawResponse(event.status_code, list(event.headers))
        elif isinstance(event, h11.Data):
            assert response is not None
            response.chunks.append((time.monotonic() - started, bytes(event.data)))
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            response.complete = True
            break
        elif isinstance(event, h11.ConnectionClosed):
            break
    assert response is not None, "no response"
    return response


def script(
    chunks: list[bytes | tuple[bytes, float]],
    *,
    status: int = 200,
    content_type: str = "text/event-stream",
    headers: list[tuple[str, str]] | None = None,
    end: str = "complete",
) -> bytes:
    """The JSON body for the mock upstream's /mock/script endpoint."""
    items = [c if isinstance(c, tuple) else (c, 0.0) for c in chunks]
    return json.dumps(
        {
            "status": status,
            "headers": [["content-type", content_type], *(headers or [])],
            "chunks": [{"b64": base64.b64encode(b).decode(), "delay": d} for b, d in items],
            "end": end,
        }
    ).encode()


def json_body(response: RawResponse) -> Any:
    return json.loads(response.body)
