"""The upstream client's HTTP/1.1 behaviour against raw servers: reuse, stale
connections, framing by length, chunks or close, HEAD, informational responses."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

from streamproxy import upstream as upstream_module
from streamproxy.config import UpstreamConfig
from streamproxy.errors import UpstreamError
from tests import client
from tests.rawserver import raw_server, read_request

OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


async def serve_many(reader, writer, state, response: bytes = OK, close_after: int = 0):
    served = 0
    while True:
        try:
            await read_request(reader)
        except asyncio.IncompleteReadError:
            return
        writer.write(response)
        await writer.drain()
        served += 1
        if close_after and served >= close_after:
            return  # close without saying so (no Connection: close)


def test_keepalive_connections_are_reused(start_proxy):
    """Sequential requests share one upstream connection."""
    with raw_server(serve_many, raw=True) as upstream, start_proxy(upstream.url) as proxy:
        for _ in range(5):
            assert client.request(proxy.url, "GET", "/x").body == b"{}"
        assert upstream.connections == 1


def test_connection_closed_by_server_is_retried(start_proxy):
    """A reused connection the server closed while idle is replaced transparently."""

    async def one_per_connection(reader, writer, state):
        await serve_many(reader, writer, state, close_after=1)

    with raw_server(one_per_connection, raw=True) as upstream, start_proxy(upstream.url) as proxy:
        for _ in range(3):
            response = client.request(proxy.url, "POST", "/x", body=b"{}")
            assert response.status == 200
            assert response.body == b"{}"
            # Let the close reach the proxy half of the time, not the other half.
        assert upstream.connections == 3


def test_connection_close_header_is_honoured(start_proxy):
    """`Connection: close` from the upstream: the connection is not reused (and the
    header itself is not forwarded)."""
    closing = OK.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1)

    async def handler(reader, writer, state):
        await serve_many(reader, writer, state, response=closing, close_after=1)

    with raw_server(handler, raw=True) as upstream, start_proxy(upstream.url) as proxy:
        for _ in range(2):
            response = client.request(proxy.url, "GET", "/x")
            assert response.body == b"{}"
            assert response.header(b"connection") is None
        assert upstream.connections == 2


def test_close_delimited_body(start_proxy):
    """A body framed by the end of the connection (no length, not chunked) is complete."""

    async def handler(reader, writer, state):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n")
        for i in range(3):
            writer.write(b"data: %d\n\n" % i)
            await writer.drain()
            await asyncio.sleep(0.05)

    with raw_server(handler, raw=True) as upstream, start_proxy(upstream.url) as proxy:
        response = client.request(proxy.url, "GET", "/x")
        assert response.complete
        assert response.body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


def test_head_response_has_no_body(start_proxy):
    """HEAD: the Content-Length is relayed, no body is awaited, later requests still work."""
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1234\r\n\r\n"

    async def handler(reader, writer, state):
        request = await read_request(reader)
        writer.write(head if request.startswith(b"HEAD") else OK)
        await serve_many(reader, writer, state)

    with raw_server(handler, raw=True) as upstream, start_proxy(upstream.url) as proxy:
        response = client.request(proxy.url, "HEAD", "/x", timeout=5)
        assert response.status == 200
        assert response.header(b"content-length") == b"1234"
        assert response.body == b""
        assert client.request(proxy.url, "GET", "/x").body == b"{}"


def test_informational_response_is_skipped(start_proxy):
    """A 100 Continue before the real response is not mistaken for it."""

    async def handler(reader, writer, state):
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
        await writer.drain()

    with raw_server(handler, raw=True) as upstream, start_proxy(upstream.url) as proxy:
        response = client.request(proxy.url, "GET", "/x")
        assert response.status == 200
        assert response.body == b"{}"


def test_oversized_response_head_is_502(start_proxy):
    """An upstream response head over the limit is a protocol error, not a memory sink."""
    huge = b"HTTP/1.1 200 OK\r\n" + b"x-big: " + b"a" * 100_000 + b"\r\ncontent-length: 0\r\n\r\n"

    async def handler(reader, writer, state):
        await read_request(reader)
        writer.write(huge)
        await writer.drain()

    with raw_server(handler, raw=True) as upstream, start_proxy(upstream.url) as proxy:
        assert client.request(proxy.url, "GET", "/x").status == 502


def test_idle_connections_are_closed_when_they_expire(start_proxy, monkeypatch):
    """Idle keep-alive connections are closed once IDLE_EXPIRY passes, by a timer, not
    by the next request; one still in use is left alone."""
    monkeypatch.setattr(upstream_module, "IDLE_EXPIRY", 0.3)

    async def serve_until_eof(reader, writer, state):
        await serve_many(reader, writer, state)
        state.closed_at.append(time.monotonic())

    with raw_server(serve_until_eof, raw=True) as upstream, start_proxy(upstream.url) as proxy:
        assert client.request(proxy.url, "GET", "/x").body == b"{}"
        released = time.monotonic()
        closed = upstream.wait_closed(1, timeout=5.0)
        assert closed is not None, "the idle connection was never closed"
        assert 0.2 <= closed - released <= 3.0
        assert client.request(proxy.url, "GET", "/x").body == b"{}"  # a fresh one
        assert upstream.connections == 2


def test_bytes_after_the_response_are_not_relayed(start_proxy):
    """An upstream that writes a second response after the one asked for: the client gets
    the first, whole, and nothing of the second; that connection is not reused."""
    extra = b"HTTP/1.1 200 OK\r\ncontent-length: 14\r\n\r\ndata: SMUGGLE\n"

    async def two_responses(reader, writer, state):
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\nd\r\ndata: hello\n\n\r\n0\r\n\r\n" + extra
        )
        await writer.drain()
        await asyncio.sleep(0.5)

    with raw_server(two_responses, raw=True) as upstream, start_proxy(upstream.url) as proxy:
        first = client.request(proxy.url, "GET", "/x")
        second = client.request(proxy.url, "GET", "/x")
    assert first.complete
    assert first.body == b"data: hello\n\n"
    assert first.header(b"content-length") is None
    assert second.complete  # on a new upstream connection, not the spoiled one
    assert upstream.connections == 2


def test_the_head_is_handed_on_from_the_read_callback():
    """The head reaches the listener inside the read callback that completed it, with the
    body bytes of that read: before an awaited `request()` returns, and, sent with
    `send()` on an idle connection, with no task at all; a failure before any head
    reaches the listener too."""
    calls: list[tuple[str, int, bytes]] = []

    class Listener:
        def head_received(self, response: upstream_module.UpstreamResponse) -> None:
            calls.append(("head", response.status, response.take_buffered()))
            response.close()

        def head_failed(self, error: UpstreamError, retryable: bool) -> None:
            calls.append(("failed", int(retryable), str(error).encode()))

    async def run(url: str) -> None:
        pool = upstream_module.UpstreamPool(UpstreamConfig(name="t", url=url))
        listener = Listener()
        try:
            response = await pool.request("POST", b"/x", [], b"{}", listener)
            calls.append(("returned", response.status, b""))
            assert pool.send("POST", b"/x", [], b"{}", listener) is not None  # reused
            while len(calls) < 3:
                await asyncio.sleep(0.01)
            assert pool.send("POST", b"/x", [], b"{}", listener) is not None
            while len(calls) < 4:  # the third answer is not HTTP
                await asyncio.sleep(0.01)
            assert pool.send("POST", b"/x", [], b"{}", listener) is None  # none idle now
        finally:
            await pool.aclose()

    async def garbage_third(reader, writer, state):
        for answer in (OK, OK, b"NOT HTTP\r\n\r\n"):
            await read_request(reader)
            writer.write(answer)
        await asyncio.sleep(1)

    with raw_server(garbage_third, raw=True) as upstream:
        asyncio.run(run(upstream.url))
    assert calls[:3] == [("head", 200, b"{}"), ("returned", 200, b""), ("head", 200, b"{}")]
    assert calls[3][:2] == ("failed", 0)
    assert b"invalid HTTP" in calls[3][2]


def test_a_request_cancelled_once_its_head_is_in_closes_its_connection(monkeypatch):
    """`request()` without a listener, cancelled after the head came in but before the
    awaiting task ran again (the early commit's client leaving in that turn): nobody
    else has the response, so its connection is closed (the upstream stops)."""
    closed = threading.Event()

    async def streams_on(reader, writer, state):
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        try:
            for _ in range(500):
                writer.write(b"d\r\ndata: token\n\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
        except ConnectionError:
            closed.set()
            return
        while await reader.read(65536):
            pass
        closed.set()

    async def run(url: str) -> None:
        pool = upstream_module.UpstreamPool(UpstreamConfig(name="t", url=url))
        task: asyncio.Task | None = None
        original = upstream_module._HeadWaiter.head_received

        def head_then_cancel(self, response):
            original(self, response)
            assert task is not None
            task.cancel()  # before the task has taken its response

        monkeypatch.setattr(upstream_module._HeadWaiter, "head_received", head_then_cancel)
        try:
            task = asyncio.ensure_future(pool.request("POST", b"/x", [], b"{}"))
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert task.cancelled()
        finally:
            await pool.aclose()

    with raw_server(streams_on, raw=True) as upstream:
        asyncio.run(run(upstream.url))
        assert closed.wait(2), "the connection was left streaming"
