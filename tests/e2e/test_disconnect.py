"""A client that leaves mid-stream makes the proxy close its upstream request at once."""

from __future__ import annotations

import asyncio
import socket
import time

from tests.rawserver import SSE_HEAD, RawServer, chunk, raw_server

TOKEN = b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'


async def endless_stream(reader, writer: asyncio.StreamWriter, state: RawServer) -> None:
    writer.write(SSE_HEAD)
    while True:
        writer.write(chunk(TOKEN))
        await writer.drain()
        await asyncio.sleep(0.05)


def _open_stream(proxy_url: str) -> socket.socket:
    host, port = proxy_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    body = b'{"model": "m", "stream": true}'
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    received = b""
    while received.count(TOKEN) < 3:
        received += sock.recv(65536)
    return sock


def test_client_disconnect_closes_upstream(start_proxy):
    """Closing the client socket mid-stream closes the upstream connection within a second
    (the benchmark measures how far under 100 ms), and counts a client-side drop."""
    with raw_server(endless_stream) as upstream, start_proxy(upstream.url) as proxy:
        sock = _open_stream(proxy.url)
        assert upstream.closed_at == []
        closed = time.monotonic()
        sock.close()
        upstream_closed = upstream.wait_closed(timeout=5)
        assert upstream_closed is not None, "the upstream request was never closed"
        assert upstream_closed - closed < 1.0
        deadline = time.monotonic() + 5
        labels = {"upstream": "test", "side": "client", "phase": "mid_stream"}
        while proxy.metric("streamproxy_dropped_connections_total", labels) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert proxy.metric("streamproxy_streams_active", {"upstream": "test"}) == 0
