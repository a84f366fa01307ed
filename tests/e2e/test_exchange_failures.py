"""The exchange runs on callbacks (relay.py): whatever goes wrong inside one, in any
phase, the exchange still ends: accounted once, its response ended or cut, its upstream
connection closed, nothing left in `app.active` (the shutdown drain waits on it)."""

from __future__ import annotations

import asyncio
import io
import re
import socket
import threading
import time

from streamproxy import logs
from streamproxy.config import UpstreamConfig
from streamproxy.observer import StreamObserver
from tests import client
from tests.rawserver import raw_server, read_request

CHAT = b'{"model": "m", "stream": false}'
JSON = [("content-type", "application/json")]
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
EVENTS = [b"data: %d\n\n" % i for i in range(3)] + [b"data: [DONE]\n\n"]


def wait_idle(app, seconds: float = 3.0) -> list:
    deadline = time.monotonic() + seconds
    while app.active and time.monotonic() < deadline:
        time.sleep(0.02)
    return list(app.active)


def test_a_timeout_before_the_head_closes_the_pooled_connection_and_is_not_resent(start_proxy):
    """Sent on an idle pooled connection, a request whose upstream stays silent past
    read_timeout: 504 after one timeout, the POST sent once, that connection closed."""
    posts: list[bytes] = []
    closed: list[float] = []

    async def handler(reader, writer, state):
        try:
            while True:
                head = await read_request(reader)
                posts.append(head.split(b"\r\n")[0])
                if b"/slow" in head:
                    while await reader.read(65536):
                        pass
                    closed.append(time.monotonic())
                    return
                writer.write(OK)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    with raw_server(handler, raw=True) as upstream:
        config = UpstreamConfig(name="test", url=upstream.url, read_timeout=0.5)
        with start_proxy([config]) as proxy:
            assert client.request(proxy.url, "POST", "/v1/x", JSON, CHAT).status == 200
            posts.clear()
            started = time.monotonic()
            response = client.request(proxy.url, "POST", "/slow", JSON, CHAT)
            elapsed = time.monotonic() - started
            assert response.status == 504
            assert len(posts) == 1, "a timed-out POST was sent upstream again"
            assert elapsed < 2.0  # one read_timeout, not several
            deadline = time.monotonic() + 2
            while not closed and time.monotonic() < deadline:
                time.sleep(0.02)
            assert closed, "the timed-out upstream connection was left open"
            assert wait_idle(proxy.app) == []


def test_a_retry_cancelled_before_its_task_starts_still_ends_the_exchange(start_proxy):
    """The pooled connection's close (a retry task is spawned) and the client's close
    land in the same loop turn: the task is cancelled before its first step, and the
    exchange must still be finished (accounted as a client disconnect)."""
    got_second = threading.Event()
    close_now = threading.Event()

    async def handler(reader, writer, state):
        await read_request(reader)
        writer.write(OK)
        await writer.drain()
        await read_request(reader)  # the request sent on the pooled connection
        got_second.set()
        await asyncio.get_running_loop().run_in_executor(None, close_now.wait)
        writer.close()  # closes the keep-alive connection without a byte of answer

    with raw_server(handler, raw=True) as upstream, start_proxy(upstream.url) as proxy:
        assert client.request(proxy.url, "POST", "/v1/chat/completions", [], CHAT).status == 200
        loop = proxy.app.pools["test"].idle[0].loop
        port = int(proxy.url.rsplit(":", 1)[1])
        sock = socket.create_connection(("127.0.0.1", port))
        head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n"
        sock.sendall(head % len(CHAT) + CHAT)
        assert got_second.wait(5)
        holding = threading.Event()

        def hold() -> None:  # the loop busy for a moment, as under load
            holding.set()
            time.sleep(0.5)

        loop.call_soon_threadsafe(hold)
        assert holding.wait(5)
        close_now.set()  # 1. the upstream closes the pooled connection
        time.sleep(0.1)
        sock.close()  # 2. the client leaves, in the same loop turn for the proxy
        assert wait_idle(proxy.app) == [], "the exchange never ended"
        labels = {"upstream": "test", "method": "POST", "status_code": "499"}
        assert proxy.metric("streamproxy_requests_total", labels) == 1


def test_a_bug_in_the_pumps_end_still_ends_the_exchange(start_proxy, mock_url, monkeypatch):
    """An exception inside the end of a stream (raised in an upstream read callback):
    the client's response still ends (cut), and the exchange is gone."""

    def broken(self, now):
        raise RuntimeError("metrics bug")

    monkeypatch.setattr(StreamObserver, "on_eof", broken)
    chunks = [(event, 0.05 if i else 0.0) for i, event in enumerate(EVENTS)]
    with start_proxy(mock_url, keepalive=0) as proxy:
        started = time.monotonic()
        client.request(proxy.url, "POST", "/mock/script", body=client.script(chunks), timeout=3.0)
        assert time.monotonic() - started < 2.0, "the client's response never ended"
        assert wait_idle(proxy.app) == []


class BrokenPipe:
    """stderr piped to a log shipper that died."""

    def write(self, data):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        pass


def test_a_broken_log_stream_ends_neither_streams_nor_the_process(
    start_proxy, mock_url, monkeypatch
):
    """The access line cannot be written: the stream still ends, and so does an error
    answered at once (no task), and the exchanges are gone."""
    monkeypatch.setattr(logs._access, "enabled", True)
    monkeypatch.setattr(logs._access, "json_out", BrokenPipe())
    chunks = [(event, 0.05 if i else 0.0) for i, event in enumerate(EVENTS)]
    with start_proxy(mock_url, keepalive=0) as proxy:
        started = time.monotonic()
        client.request(proxy.url, "POST", "/mock/script", body=client.script(chunks), timeout=3.0)
        assert time.monotonic() - started < 2.0, "the client's response never ended"
        response = client.request(proxy.url, "CONNECT", "/x", timeout=3.0)
        assert response.status in (405, 500)
        assert wait_idle(proxy.app) == []


def test_console_access_lines_carry_their_own_request_id(start_proxy, mock_url):
    """In console format the access line goes through structlog's context, and on the
    fast path it is written from a pooled upstream connection's callback (the context
    of whichever request opened that connection): each line has its own request's id."""
    out = io.StringIO()
    logs.configure("info", "console", stream=out, cache=False)
    headers = [*JSON, ("x-mock-tokens", "2"), ("x-mock-ttft", "0")]
    try:
        with start_proxy(mock_url) as proxy:
            for rid in ("first-request", "second-request", "third-request"):
                chat = b'{"model": "m", "stream": true}'
                response = client.request(
                    proxy.url,
                    "POST",
                    "/v1/chat/completions",
                    [*headers, ("x-request-id", rid)],
                    chat,
                )
                assert response.complete
    finally:
        logs.configure("warning", "console", cache=False)
    lines = [line for line in out.getvalue().splitlines() if "method=" in line]
    ids = [m.group(1) if (m := re.search(r"request_id=(\S+)", line)) else None for line in lines]
    assert ids == ["first-request", "second-request", "third-request"]


def test_a_bug_before_the_request_goes_upstream_still_ends_the_exchange(
    start_proxy, mock_url, monkeypatch
):
    """An exception while the request is sent from the client's read callback: the
    client gets a 500 and the exchange is gone (the drain would wait for it)."""
    from streamproxy import relay

    def broken(self, route, body):
        raise RuntimeError("header bug")

    monkeypatch.setattr(relay.Exchange, "_upstream_request", broken)
    with start_proxy(mock_url) as proxy:
        response = client.request(proxy.url, "POST", "/v1/chat/completions", JSON, CHAT)
        assert response.status == 500
        assert wait_idle(proxy.app) == []
