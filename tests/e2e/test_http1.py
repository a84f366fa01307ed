"""The proxy's own HTTP/1.1 server (http1.py) as a client sees it, over raw sockets.

Every request here is written by hand, byte for byte, and every answer is read off the
socket: keep-alive, pipelining, Connection: close, HTTP/1.0 framing, HEAD, Expect:
100-continue, chunked request bodies, bad and oversized requests, the lingering 413,
Upgrade, the idle timeout and absolute-form targets. Responses are parsed with h11 on the
client side; whether and when the server closes is read from the socket itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import h11
import pytest
from prometheus_client import CollectorRegistry

from streamproxy import http1
from streamproxy.config import Config, KeepaliveConfig, LimitsConfig, UpstreamConfig
from streamproxy.http1 import MAX_HEAD
from streamproxy.metrics import Metrics
from streamproxy.relay import ProxyApp
from tests import client
from tests.rawserver import SSE_HEAD, chunk, raw_server, read_request
from tests.support import serve_proxy

TIMEOUT = 10.0  # every socket operation: generous, but no test can hang


@dataclass
class Reply:
    """One response as parsed off the wire."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    complete: bool = False  # h11 saw the end of the body (length, terminator or clean EOF)
    informational: list[int] = field(default_factory=list)  # 1xx before the final status

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def json(self) -> Any:
        return json.loads(self.body)


class Wire:
    """One client connection: bytes out exactly as written, responses parsed with h11,
    and the server's close (EOF or reset) seen on the socket itself."""

    def __init__(self, url: str, timeout: float = TIMEOUT) -> None:
        parts = urlsplit(url)
        self.host = f"{parts.hostname}:{parts.port}"
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        self.timeout = timeout
        self.buffer = b""  # received, not yet parsed
        self.eof = False  # the server closed the connection
        self.reset = False  # ...with a reset

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv(self) -> bytes:
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            self.reset = True
            data = b""
        if not data:
            self.eof = True
        return data

    def read_head(self) -> bytes:
        """The next response head, raw (status line and headers up to the blank line)."""
        while b"\r\n\r\n" not in self.buffer:
            assert not self.eof, f"closed before a complete head: {self.buffer!r}"
            self.buffer += self._recv()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        return head + b"\r\n\r\n"

    def response(self, method: str = "GET") -> Reply:
        """The next whole response (h11 is told the request `method`, for framing)."""
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())
        if self.buffer:  # (b"" would mean EOF to h11)
            conn.receive_data(self.buffer)
        self.buffer = b""
        reply: Reply | None = None
        informational: list[int] = []
        error: h11.RemoteProtocolError | None = None
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                error = exc
                break  # cut short: `complete` stays False
            if event is h11.NEED_DATA:
                if self.eof:
                    break
                conn.receive_data(self._recv())
            elif isinstance(event, h11.InformationalResponse):
                informational.append(event.status_code)
            elif isinstance(event, h11.Response):
                headers = [(k.lower(), v) for k, v in event.headers]
                reply = Reply(event.status_code, headers, informational=informational)
            elif isinstance(event, h11.Data):
                assert reply is not None
                reply.body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                assert reply is not None
                reply.complete = True
                self.buffer = conn.trailing_data[0]
                break
            else:  # ConnectionClosed
                break
        assert reply is not None, f"no response ({error!r}, eof={self.eof}, reset={self.reset})"
        return reply

    def quiet(self, seconds: float) -> bytes:
        """Whatever arrives within `seconds` (b"" if the server sends nothing more)."""
        got = self.buffer
        self.buffer = b""
        deadline = time.monotonic() + seconds
        while not self.eof and (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                got += self._recv()
            except TimeoutError:
                break
        self.sock.settimeout(self.timeout)
        return got

    def wait_closed(self, timeout: float = 5.0) -> bytes:
        """Wait for the server to close the connection; return any bytes that came before.
        Fails if it is still open after `timeout` seconds."""
        got = self.buffer
        self.buffer = b""
        deadline = time.monotonic() + timeout
        while not self.eof:
            left = deadline - time.monotonic()
            assert left > 0, f"the server did not close within {timeout} s (got {got!r})"
            self.sock.settimeout(left)
            with suppress(TimeoutError):
                got += self._recv()
        self.sock.settimeout(self.timeout)
        return got


@contextmanager
def wire(url: str) -> Iterator[Wire]:
    connection = Wire(url)
    try:
        yield connection
    finally:
        connection.close()


def req(
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    *,
    version: str = "1.1",
    host: str | None = "proxy.test",
) -> bytes:
    """One request, by hand. Content-Length is added for a body unless a
    Transfer-Encoding or Content-Length is among `headers`."""
    headers = list(headers or [])
    names = {name.lower() for name, _ in headers}
    if host is not None:
        headers.insert(0, ("Host", host))
    if body and not names & {"content-length", "transfer-encoding"}:
        headers.append(("Content-Length", str(len(body))))
    lines = [f"{method} {target} HTTP/{version}", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def echo(reply: Reply) -> dict[str, Any]:
    assert reply.status == 200, (reply.status, reply.body)
    assert reply.complete
    data: dict[str, Any] = reply.json()
    return data


def assert_error(reply: Reply, status: int) -> None:
    """A JSON error answer from the server itself, with a proper length."""
    assert reply.status == status, (reply.status, reply.body)
    assert reply.complete
    assert reply.header(b"content-type") == b"application/json"
    assert "error" in reply.json()


def assert_still_serving(url: str) -> None:
    """A fresh connection still gets its answer."""
    with wire(url) as w:
        w.send(req("GET", "/echo/after"))
        assert echo(w.response())["raw_path"] == "/echo/after"


# -- keep-alive and pipelining -----------------------------------------------------------


def test_keep_alive_two_requests_on_one_connection(start_proxy, mock_url):
    """HTTP/1.1 connections persist: a second request on the same socket, sent after the
    first response, is answered too, and the connection stays open after both."""
    with start_proxy(mock_url) as proxy, wire(proxy.url) as w:
        w.send(req("GET", "/echo/one"))
        first = w.response()
        assert echo(first)["raw_path"] == "/echo/one"
        assert first.header(b"connection") is None  # no close announced
        w.send(req("POST", "/echo/two", body=b'{"n": 2}'))
        second = echo(w.response())
        assert second["raw_path"] == "/echo/two"
        assert second["body"] == '{"n": 2}'
        assert w.quiet(0.3) == b""
        assert not w.eof


def test_pipelined_requests_answered_complete_and_in_order(start_proxy, mock_url):
    """Three requests written in ONE sendall (the middle one with a body) get three whole
    responses, in the order of the requests, on the same connection."""
    data = (
        req("GET", "/echo/first")
        + req("POST", "/echo/second", [("Content-Type", "application/json")], b'{"k": "v"}')
        + req("GET", "/echo/third?q=3")
    )
    with start_proxy(mock_url) as proxy, wire(proxy.url) as w:
        w.send(data)
        replies = [echo(w.response()) for _ in range(3)]
        assert [r["raw_path"] for r in replies] == ["/echo/first", "/echo/second", "/echo/third"]
        assert [r["method"] for r in replies] == ["GET", "POST", "GET"]
        assert replies[1]["body"] == '{"k": "v"}'
        assert replies[2]["query"] == "q=3"
        # ...and the connection is still usable afterwards.
        w.send(req("GET", "/echo/fourth"))
        assert echo(w.response())["raw_path"] == "/echo/fourth"


def test_pipelined_streams_do_not_interleave(start_proxy, mock_url):
    """Two pipelined streamed (chunked) responses: the second starts only after the first
    has ended, each with its own bytes, whole."""
    one = client.script([(b"data: one-%d\n\n" % i, 0.05) for i in range(4)])
    two = client.script([(b"data: two-%d\n\n" % i, 0.05) for i in range(4)])
    with start_proxy(mock_url, keepalive=0) as proxy, wire(proxy.url) as w:
        w.send(req("POST", "/mock/script", body=one) + req("POST", "/mock/script", body=two))
        first, second = w.response(), w.response()
    assert first.complete
    assert second.complete
    assert first.header(b"transfer-encoding") == b"chunked"
    assert first.body == b"".join(b"data: one-%d\n\n" % i for i in range(4))
    assert second.body == b"".join(b"data: two-%d\n\n" % i for i in range(4))


# -- closing -----------------------------------------------------------------------------


def test_connection_close_from_client(start_proxy, mock_url):
    """`Connection: close` from the client: the response says `connection: close` and the
    server closes the socket after it (nothing else follows)."""
    with start_proxy(mock_url) as proxy, wire(proxy.url) as w:
        w.send(req("GET", "/echo/bye", [("Connection", "close")]))
        reply = w.response()
        assert echo(reply)["raw_path"] == "/echo/bye"
        assert reply.header(b"connection") == b"close"
        assert w.wait_closed() == b""


def test_request_pipelined_after_connection_close_is_not_answered(start_proxy, mock_url):
    """A request pipelined behind one with `Connection: close` is dropped: one response,
    then the close (never a second response, never a 400 for it)."""
    with start_proxy(mock_url) as proxy, wire(proxy.url) as w:
        w.send(req("GET", "/echo/last", [("Connection", "close")]) + req("GET", "/echo/ignored"))
        assert echo(w.response())["raw_path"] == "/echo/last"
        assert w.wait_closed() == b""


# -- HTTP/1.0 ----------------------------------------------------------------------------


def test_http10_stream_is_close_delimited(start_proxy, mock_url):
    """An HTTP/1.0 client never gets chunked framing: a streamed SSE body (no length)
    comes as is, delimited by the server closing the connection."""
    chunks = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]
    with start_proxy(mock_url, keepalive=0) as proxy, wire(proxy.url) as w:
        w.send(req("POST", "/mock/script", body=client.script(chunks), version="1.0"))
        head = w.read_head()
        assert head.startswith(b"HTTP/1.1 200 ")
        lowered = head.lower()
        assert b"transfer-encoding" not in lowered
        assert b"content-length" not in lowered
        assert b"\r\nconnection: close\r\n" in lowered
        rest = w.wait_closed()  # the body is whatever comes before the close
    assert rest == b"".join(chunks)
    assert not w.reset


def test_http10_json_is_delimited_by_content_length(start_proxy, mock_url):
    """An HTTP/1.0 request for a JSON answer with a Content-Length: that length frames the
    body (not chunks), and the connection closes after it (1.0 is not kept alive)."""
    with start_proxy(mock_url) as proxy, wire(proxy.url) as w:
        w.send(req("POST", "/echo/old", body=b"ping", version="1.0"))
        reply = w.response()
        assert reply.header(b"transfer-encoding") is None
        assert reply.header(b"content-length") == str(len(reply.body)).encode()
        assert reply.header(b"connection") == b"close"
        got = echo(reply)
        assert (got["raw_path"], got["body"]) == ("/echo/old", "ping")
        assert w.wait_closed() == b""


# -- HEAD --------------------------------------------------------------------------------


def test_head_has_no_body_and_keeps_the_connection(start_proxy, mock_url):
    """HEAD gets the head only (its Content-Length says what GET would send), no body
    byte after it; the connection is then reused for a GET that gets its full body."""
    with start_proxy(mock_url) as proxy, wire(proxy.url) as w:
        w.send(req("HEAD", "/echo/h"))
        head = w.read_head()
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"transfer-encoding" not in head.lower()
        assert w.quiet(0.5) == b""  # not one byte of body
        assert not w.eof
        w.send(req("GET", "/echo/h"))
        assert echo(w.response())["method"] == "GET"


# -- Expect: 100-continue -----------------------------------------------------------------


def test_expect_100_continue(start_proxy, mock_url):
    """`Expect: 100-continue`: after only the head the client gets `100 Continue`; then it
    sends the body and gets the final 200, whose echo shows the body."""
    body = b'{"hello": "world"}'
    headers = [("Expect", "100-continue"), ("Content-Length", str(len(body)))]
    with start_proxy(mock_url) as proxy, wire(proxy.url) as w:
        w.send(req("POST", "/echo/expect", headers))
        assert w.read_head() == b"HTTP/1.1 100 Continue\r\n\r\n"
        assert w.quiet(0.2) == b""  # nothing more until the body is in
        w.send(body)
        got = echo(w.response())
    assert got["body"] == body.decode()
    assert "expect" not in {name for name, _ in got["headers"]}  # hop-by-hop: not forwarded


def test_expect_100_continue_ignored_for_http10(start_proxy, mock_url):
    """RFC 9110 §10.1.1: a server MUST ignore a 100-continue expectation in an HTTP/1.0
    request. The client that waits anyway and then sends its body gets only the final
    response, no `100 Continue` before it."""
    body = b"old-client"
    headers = [("Expect", "100-continue"), ("Content-Length", str(len(body)))]
    with start_proxy(mock_url) as proxy, wire(proxy.url) as w:
        w.send(req("POST", "/echo/expect10", headers, version="1.0"))
        early = w.quiet(1.0)
        w.send(body)
        w.buffer = early + w.buffer
        reply = w.response()
    assert not early.startswith(b"HTTP/1.1 100"), early
    assert reply.informational == []
    assert echo(reply)["body"] == "old-client"


def test_expect_100_continue_refused_early_announces_the_close(start_proxy, mock_url):
    """`Expect: 100-continue` with a Content-Length over the limit: the 413 comes at once,
    without `100 Continue`. The client may now skip sending the body, so the server cannot
    tell the next bytes from the body: the 413 must say `connection: close` (RFC 9110
    §10.1.1: say whether the connection is closed or the body still read; Go's net/http
    closes), never leave a next request on the connection unanswered."""
    limits = LimitsConfig(max_request_body=1000)
    headers = [("Expect", "100-continue"), ("Content-Length", "5000")]
    with start_proxy(mock_url, limits=limits) as proxy, wire(proxy.url) as w:
        w.send(req("POST", "/echo/expect-big", headers))
        reply = w.response()
        assert_error(reply, 413)
        assert reply.informational == []
        assert reply.header(b"connection") == b"close"


# -- request bodies ----------------------------------------------------------------------


def test_chunked_request_body_reaches_upstream_whole(start_proxy, mock_url):
    """A hand-chunked request body (odd chunk sizes, a chunk extension, an uppercase hex
    size) is de-chunked and reaches the upstream whole, byte for byte."""
    parts = [b"a" * 1, b"b" * 17, b"c" * 4096, b"d" * 300]
    chunked = (
        b"1\r\n" + parts[0] + b"\r\n"
        b"11;ext=1\r\n" + parts[1] + b"\r\n"
        b"1000\r\n" + parts[2] + b"\r\n"
        b"12C\r\n" + parts[3] + b"\r\n"
        b"0\r\n\r\n"
    )
    whole = b"".join(parts)
    with start_proxy(mock_url) as proxy, wire(proxy.url) as w:
        w.send(req("POST", "/echo/chunked", [("Transfer-Encoding", "chunked")], chunked))
        got = echo(w.response())
        assert got["body_len"] == len(whole)
        assert got["body"] == whole.decode()
        # The body ended where its terminator said: the connection is in step.
        w.send(req("GET", "/echo/next"))
        assert echo(w.response())["raw_path"] == "/echo/next"


def test_chunked_body_sent_slowly_reaches_upstream(start_proxy, mock_url):
    """Chunks written one by one, with pauses, are all collected before forwarding."""
    with start_proxy(mock_url) as proxy, wire(proxy.url) as w:
        w.send(req("POST", "/echo/slow", [("Transfer-Encoding", "chunked")]))
        for piece in (b"5\r\nhello\r\n", b"1\r\n \r\n", b"5\r\nworld\r\n", b"0\r\n\r\n"):
            time.sleep(0.05)
            w.send(piece)
        assert echo(w.response())["body"] == "hello world"


def test_broken_chunked_body_is_400_and_closed(start_proxy, mock_url):
    """A chunked body whose chunk-size line is not hex gets a 400 (JSON error), is never
    forwarded, the connection closes; other connections are still served."""
    broken = b"5\r\nhello\r\nzz\r\nnot a chunk\r\n0\r\n\r\n"
    with start_proxy(mock_url) as proxy:
        with wire(proxy.url) as w:
            w.send(req("POST", "/echo/broken", [("Transfer-Encoding", "chunked")], broken))
            reply = w.response()
            assert_error(reply, 400)
            assert reply.header(b"connection") == b"close"
            assert w.wait_closed() == b""
        assert_still_serving(proxy.url)


def test_broken_chunked_body_after_a_pause_is_400(start_proxy, mock_url):
    """The same, when the bad chunk line comes later than the head (the request is
    already being handled, waiting for its body)."""
    with start_proxy(mock_url) as proxy:
        with wire(proxy.url) as w:
            w.send(req("POST", "/echo/broken", [("Transfer-Encoding", "chunked")]))
            w.send(b"5\r\nhello\r\n")
            time.sleep(0.2)
            w.send(b"xyz\r\n")
            reply = w.response()
            assert_error(reply, 400)
            assert w.wait_closed() == b""
        assert_still_serving(proxy.url)


@pytest.mark.parametrize(
    "framing",
    [
        [("Content-Length", "5"), ("Transfer-Encoding", "chunked")],
        [("Content-Length", "5"), ("Content-Length", "6")],
    ],
    ids=["cl-and-te", "two-lengths"],
)
def test_ambiguous_body_framing_is_400(start_proxy, mock_url, framing):
    """Request smuggling defence: a body framed two ways (Content-Length with chunked, or
    two different lengths) is refused with a 400 and the connection closed."""
    with start_proxy(mock_url) as proxy:
        with wire(proxy.url) as w:
            w.send(req("POST", "/echo/smuggle", framing, b"5\r\nhello\r\n0\r\n\r\n"))
            assert_error(w.response(), 400)
            assert w.wait_closed() == b""
        assert_still_serving(proxy.url)


# -- bad requests ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64) + b"\r\n\r\n",  # TLS hello
        b"HELLO THERE\r\n\r\n",
        b"GET /echo/x HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET /echo/x HTTP/1.1\r\nBad Header Name: x\r\n\r\n",
        b"GET /echo/x HTTP/1.1\r\nHost: x\r\nNo-Colon\r\n\r\n",
    ],
    ids=["tls", "words", "version", "space-in-name", "no-colon"],
)
def test_malformed_request_is_400_and_closed(start_proxy, mock_url, garbage):
    """Bytes that are not an HTTP/1.1 request get a 400 with a JSON `error` body and
    `connection: close`, then the close; the proxy goes on serving new connections."""
    with start_proxy(mock_url) as proxy:
        with wire(proxy.url) as w:
            w.send(garbage)
            reply = w.response()
            assert_error(reply, 400)
            assert reply.header(b"connection") == b"close"
            assert w.wait_closed() == b""
        assert_still_serving(proxy.url)


def test_bad_request_pipelined_behind_a_good_one(start_proxy, mock_url):
    """Garbage pipelined after a valid request: the valid one is answered whole, then the
    connection closes (nothing after the bad bytes can be trusted)."""
    with start_proxy(mock_url) as proxy:
        with wire(proxy.url) as w:
            w.send(req("GET", "/echo/good") + b"BAD REQUEST LINE\r\n\r\n")
            assert echo(w.response())["raw_path"] == "/echo/good"
            rest = w.wait_closed()
            assert rest == b"" or rest.startswith(b"HTTP/1.1 400 "), rest
        assert_still_serving(proxy.url)


@pytest.mark.parametrize("where", ["header", "url"])
def test_oversized_head_is_431_and_closed(start_proxy, mock_url, where):
    """A request head over MAX_HEAD (64 KiB), here one 70 KiB header or a 70 KiB URL,
    gets a 431 and the connection closes; the proxy goes on serving."""
    big = "a" * (70 * 1024)
    assert len(big) > MAX_HEAD
    if where == "header":
        data = req("GET", "/echo/x", [("X-Big", big)])
    else:
        data = req("GET", "/echo/" + big)
    with start_proxy(mock_url) as proxy:
        with wire(proxy.url) as w:
            with suppress(BrokenPipeError, ConnectionResetError):
                w.send(data)  # the server may stop reading once it has answered
            reply = w.response()
            assert_error(reply, 431)
            assert reply.header(b"connection") == b"close"
            assert w.wait_closed() == b""
        assert_still_serving(proxy.url)


def test_head_just_under_the_limit_is_served(start_proxy, mock_url):
    """A head below MAX_HEAD is not refused: the limit is not smaller than it says."""
    value = "b" * (MAX_HEAD - 2048)
    with start_proxy(mock_url) as proxy, wire(proxy.url) as w:
        w.send(req("GET", "/echo/big-but-fine", [("X-Big", value)]))
        got = echo(w.response())
    assert dict((k, v) for k, v in got["headers"])["x-big"] == value


def test_head_of_many_small_headers_over_the_limit_is_431(start_proxy, mock_url):
    """MAX_HEAD is "request line and headers together": 9000 short headers make a 97 KiB
    head, well over 64 KiB, and get a 431 like one big header does."""
    data = req("GET", "/echo/many", [(f"x{i:05d}", "b") for i in range(9000)])
    assert len(data) > 1.5 * MAX_HEAD
    with start_proxy(mock_url) as proxy, wire(proxy.url) as w:
        with suppress(BrokenPipeError, ConnectionResetError):
            w.send(data)
        assert_error(w.response(), 431)


def test_never_ending_header_is_refused(start_proxy, mock_url):
    """A header line that goes on past MAX_HEAD without ever ending is refused (431, or
    at least the connection closed) while it is still arriving; the server must not
    keep buffering it."""
    with start_proxy(mock_url) as proxy, wire(proxy.url) as w:
        w.send(b"GET /echo/x HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        try:
            for _ in range(16):  # 256 KiB, four times the limit, never a CRLF
                w.send(b"z" * 16384)
        except (BrokenPipeError, ConnectionResetError):
            pass
        got = w.quiet(3.0)
    assert w.eof or got.startswith(b"HTTP/1.1 431 "), got


# -- an answer before the body: 413 and the lingering close ---------------------------------


def _send_in_pieces(w: Wire, total: int, piece: int = 8192) -> None:
    sent = 0
    while sent < total:
        size = min(piece, total - sent)
        w.send(b"x" * size)
        sent += size


def test_413_is_readable_while_the_body_is_still_coming(start_proxy, mock_url):
    """A 413 answered on the Content-Length alone, while the client is still writing a
    200 000-byte body (reading nothing): the server reads and drops the rest (lingers)
    instead of resetting, so the client finishes sending and reads the 413; the same
    connection then serves the next request."""
    limits = LimitsConfig(max_request_body=1000)
    with start_proxy(mock_url, limits=limits) as proxy, wire(proxy.url) as w:
        w.send(req("POST", "/echo/big", [("Content-Length", "200000")]))
        _send_in_pieces(w, 200000)  # blocks (and times out) if the server stops reading
        reply = w.response()
        assert_error(reply, 413)
        assert not w.reset
        w.send(req("GET", "/echo/after-413"))
        assert echo(w.response())["raw_path"] == "/echo/after-413"


def test_413_for_a_chunked_body_lingers_too(start_proxy, mock_url):
    """A chunked body that passes the limit gets its 413 as soon as it does; the rest of
    the chunks are read and dropped, and the connection goes on after the terminator."""
    limits = LimitsConfig(max_request_body=1000)
    chunk = b"%x\r\n%s\r\n" % (4096, b"y" * 4096)
    with start_proxy(mock_url, limits=limits) as proxy, wire(proxy.url) as w:
        w.send(req("POST", "/echo/big", [("Transfer-Encoding", "chunked")]))
        w.send(chunk)
        reply = w.response()  # answered before the body is over
        assert_error(reply, 413)
        for _ in range(40):
            w.send(chunk)
        w.send(b"0\r\n\r\n")
        w.send(req("GET", "/echo/after-chunks"))
        assert echo(w.response())["raw_path"] == "/echo/after-chunks"


def test_linger_ends_with_a_close_when_the_body_never_comes(start_proxy, mock_url):
    """Lingering is bounded: if the rest of the body never arrives, the server closes the
    connection after LINGER (5 s), and the 413 was readable before that."""
    limits = LimitsConfig(max_request_body=1000)
    with start_proxy(mock_url, limits=limits) as proxy, wire(proxy.url) as w:
        w.send(req("POST", "/echo/big", [("Content-Length", "200000")]) + b"x" * 5000)
        assert_error(w.response(), 413)
        started = time.monotonic()
        assert w.wait_closed(timeout=15.0) == b""
        assert time.monotonic() - started > 2.0  # not closed at once: it waited


@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_413_with_close_is_readable_while_the_body_is_still_coming(start_proxy, mock_url, version):
    """The lingering close holds when the connection is not kept alive either
    (`Connection: close`, or HTTP/1.0): a client writing a 1 MB body as fast as it can
    finishes writing it without a reset, reads the 413, and only then sees the close."""
    limits = LimitsConfig(max_request_body=1000)
    total = 1_000_000
    headers = [("Content-Length", str(total))]
    if version == "1.1":
        headers.append(("Connection", "close"))
    with start_proxy(mock_url, limits=limits) as proxy, wire(proxy.url) as w:
        try:
            w.send(req("POST", "/echo/big", headers, version=version) + b"x" * 65536)
            _send_in_pieces(w, total - 65536)
            sent_all = True
        except (BrokenPipeError, ConnectionResetError):
            sent_all = False
        answer = w.wait_closed()
    assert answer.startswith(b"HTTP/1.1 413 "), (answer, w.reset)
    assert sent_all
    assert not w.reset


# -- Upgrade, absolute-form --------------------------------------------------------------


def test_upgrade_request_is_answered_as_plain_http_then_closed(start_proxy, mock_url):
    """`Connection: upgrade` + `Upgrade: websocket`: no protocol switch (never a 101);
    the request is answered as plain HTTP by the upstream, and then the connection is
    closed (what follows belongs to another protocol). Nothing hangs."""
    headers = [
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    ]
    with start_proxy(mock_url) as proxy:
        with wire(proxy.url) as w:
            w.send(req("GET", "/echo/ws", headers) + b"\x81\x85not-http-anymore")
            reply = w.response()
            assert reply.status != 101
            got = echo(reply)
            assert got["raw_path"] == "/echo/ws"
            assert "upgrade" not in {name for name, _ in got["headers"]}
            assert w.wait_closed() == b""
        assert_still_serving(proxy.url)


def test_upgrade_response_announces_the_close(start_proxy, mock_url):
    """The connection is closed after answering an Upgrade request, so the response says
    so (`connection: close`, RFC 9112 §9.6) instead of inviting the client to reuse it."""
    headers = [("Connection", "Upgrade"), ("Upgrade", "websocket")]
    with start_proxy(mock_url) as proxy, wire(proxy.url) as w:
        w.send(req("GET", "/echo/ws", headers))
        reply = w.response()
        assert reply.status == 200
        assert w.wait_closed() == b""
    assert reply.header(b"connection") == b"close"


def test_upgrade_request_with_a_body_is_not_forwarded_without_it(start_proxy, mock_url):
    """A POST with a body and `Upgrade: h2c` (what `curl --http2` sends to an http://
    URL): the proxy does not switch protocols, so it must ignore the Upgrade (RFC 9110
    §7.8) and forward the body, or refuse the request; never pass it on as an empty POST."""
    headers = [
        ("Connection", "Upgrade, HTTP2-Settings"),
        ("Upgrade", "h2c"),
        ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ("Content-Type", "application/json"),
    ]
    body = b'{"model": "m", "messages": []}'
    with start_proxy(mock_url) as proxy, wire(proxy.url) as w:
        w.send(req("POST", "/echo/h2c", headers, body))
        reply = w.response()
    assert reply.status != 101
    if reply.status == 200:
        got = echo(reply)
        assert (got["body_len"], got["body"]) == (len(body), body.decode())
    else:
        assert 400 <= reply.status < 600


def test_absolute_form_target_is_400_never_forwarded(start_proxy, mock_url):
    """`GET http://host/x HTTP/1.1` (a forward-proxy request) gets a 400 with a JSON error,
    and the named host is never contacted."""
    contacted = []

    async def other_host(reader, writer, state):
        contacted.append(True)

    with raw_server(other_host) as other, start_proxy(mock_url) as proxy, wire(proxy.url) as w:
        target = other.url + "/echo/x"
        w.send(req("GET", target, host=other.url.removeprefix("http://")))
        assert_error(w.response(), 400)
        w.send(req("GET", "http://example.com/x"))
        assert_error(w.response(), 400)
    assert contacted == []


# -- the idle timeout --------------------------------------------------------------------


@contextmanager
def proxy_with_idle_timeout(upstream_url: str, keep_alive_timeout: float) -> Iterator[str]:
    """A proxy in front of `upstream_url`, built as the start_proxy fixture builds it, but
    with its own keep-alive timeout."""
    config = dataclasses.replace(
        Config(),
        upstreams=(UpstreamConfig(name="test", url=upstream_url),),
        keepalive=KeepaliveConfig(interval=15.0),
    )
    app = ProxyApp(config, Metrics(CollectorRegistry(), config.metrics), env={})
    with serve_proxy(
        app.handle,
        max_body=config.limits.max_request_body,
        keep_alive_timeout=keep_alive_timeout,
        cleanup=app.aclose,
    ) as url:
        yield url


def test_idle_keep_alive_connection_is_closed(mock_url):
    """After its response, a kept-alive connection that sends nothing more is closed by
    the server once keep_alive_timeout (0.5 s here) has passed; a connection still busy
    is not, and every request answered in time was answered."""
    with proxy_with_idle_timeout(mock_url, 0.5) as url, wire(url) as w:
        w.send(req("GET", "/echo/one"))
        assert echo(w.response())["raw_path"] == "/echo/one"
        time.sleep(0.2)  # within the timeout: still open, still served
        w.send(req("GET", "/echo/two"))
        assert echo(w.response())["raw_path"] == "/echo/two"
        started = time.monotonic()
        assert w.wait_closed(timeout=5.0) == b""
        assert time.monotonic() - started > 0.2  # idle first, then closed
        assert not w.reset


def test_connection_that_never_sends_a_request_is_closed(mock_url):
    """A new connection that sends nothing at all is closed after keep_alive_timeout."""
    with proxy_with_idle_timeout(mock_url, 0.5) as url, wire(url) as w:
        assert w.wait_closed(timeout=5.0) == b""


def test_long_response_is_not_cut_by_the_idle_timeout(mock_url):
    """The idle timeout counts from the end of a response, not during one: a stream that
    lasts well past keep_alive_timeout arrives whole."""
    chunks = [(b"data: %d\n\n" % i, 0.3) for i in range(5)]  # 1.5 s against a 0.5 s timeout
    with proxy_with_idle_timeout(mock_url, 0.5) as url, wire(url) as w:
        w.send(req("POST", "/mock/script", body=client.script(chunks)))
        reply = w.response()
    assert reply.complete
    assert reply.body == b"".join(c for c, _ in chunks)


def test_connection_that_stops_inside_its_head_is_closed(mock_url):
    """A client that sends part of a request head and then nothing (slowloris) does not
    hold its connection forever: it is closed like an idle one (here keep_alive_timeout
    0.5 s; nginx has client_header_timeout for this)."""
    with proxy_with_idle_timeout(mock_url, 0.5) as url, wire(url) as w:
        w.send(b"GET /echo/x HTTP/1.1\r\nHost: proxy.test\r\n")
        rest = w.wait_closed(timeout=4.0)  # fails if still open
    assert rest == b"" or rest.startswith(b"HTTP/1.1 408 "), rest


# -- found in review: what a connection must not do after its last answer ----------------


async def _streaming_upstream(reader, writer, state) -> None:
    """Answers every request with a 3 s SSE stream; records each request head."""
    try:
        while True:
            state.heads.append(await read_request(reader))
            writer.write(SSE_HEAD)
            for i in range(30):
                writer.write(chunk(b"data: %d\n\n" % i))
                await writer.drain()
                await asyncio.sleep(0.1)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass


@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_request_after_the_last_answer_is_never_forwarded(start_proxy, version):
    """An early 413 closes the connection once its body is in (Expect without 100, or
    HTTP/1.0). A streaming request that arrives in the same read as the rest of that body
    is not served: it never reaches the upstream (nobody would read its stream)."""
    limits = LimitsConfig(max_request_body=1000)
    if version == "1.1":
        first = [("Expect", "100-continue"), ("Content-Length", "2000")]
    else:
        first = [("Connection", "keep-alive"), ("Content-Length", "2000")]
    keep = [("Connection", "keep-alive")] if version == "1.0" else []
    stream = req("POST", "/v1/chat/completions", keep, b'{"stream":true}', version=version)
    with raw_server(_streaming_upstream, raw=True) as upstream:
        with start_proxy(upstream.url, limits=limits) as proxy, wire(proxy.url) as w:
            w.send(req("POST", "/v1/chat/completions", first, version=version))
            assert_error(w.response(), 413)
            w.send(b"x" * 2000 + stream)
            w.wait_closed(timeout=3)
            time.sleep(0.5)
            assert not proxy.app.active
        assert upstream.heads == []


def test_no_second_answer_while_lingering(start_proxy, mock_url):
    """A 413 sent while the chunked body still arrives; the body then turns out broken:
    the connection closes, without a second (400) answer to the same request."""
    limits = LimitsConfig(max_request_body=1000)
    big = b"%x\r\n%s\r\n" % (4096, b"y" * 4096)
    with start_proxy(mock_url, limits=limits) as proxy, wire(proxy.url) as w:
        w.send(req("POST", "/echo/big", [("Transfer-Encoding", "chunked")]) + big)
        assert_error(w.response(), 413)
        w.send(b"zz-not-a-chunk-size\r\n")
        assert not w.wait_closed(timeout=3).startswith(b"HTTP/1.1")


def test_upgrade_body_answered_early_ends_when_the_body_is_in(start_proxy, mock_url):
    """An Upgrade request with a Content-Length body, answered (413) before the body: once
    the body is all in, the connection closes at once, not after the 5 s linger."""
    limits = LimitsConfig(max_request_body=1000)
    headers = [("Connection", "Upgrade"), ("Upgrade", "h2c"), ("Content-Length", "2000")]
    with start_proxy(mock_url, limits=limits) as proxy, wire(proxy.url) as w:
        w.send(req("POST", "/echo/u", headers))
        assert_error(w.response(), 413)
        started = time.monotonic()
        w.send(b"x" * 2000)
        w.wait_closed(timeout=10)
        assert time.monotonic() - started < 2.0


def test_pipelined_head_after_a_long_body_is_served(start_proxy, mock_url):
    """A 200 KB body and the start of the next request's head in one write: the short
    head is not mistaken for an oversized one (the body's bytes are not head bytes)."""
    with start_proxy(mock_url) as proxy, wire(proxy.url) as w:
        w.send(req("POST", "/echo/one", body=b"x" * 200_000) + b"GET /echo/two HTTP/1.1\r\n")
        time.sleep(0.3)
        w.send(b"Host: x\r\n\r\n")
        assert echo(w.response(method="POST"))["body_len"] == 200_000
        assert echo(w.response())["raw_path"] == "/echo/two"


def test_a_body_that_stops_arriving_gets_408(start_proxy, mock_url, monkeypatch):
    """Content-Length promises 100 bytes, 10 come, then silence: after BODY_TIMEOUT the
    client gets 408 (and the connection does not hang open forever)."""
    monkeypatch.setattr(http1, "BODY_TIMEOUT", 0.5)
    with start_proxy(mock_url) as proxy, wire(proxy.url) as w:
        w.send(req("POST", "/echo/x", [("Content-Length", "100")]) + b"x" * 10)
        assert_error(w.response(method="POST"), 408)


async def _firehose(reader, writer, state) -> None:
    writer.write(SSE_HEAD)
    event = chunk(b"data: " + b"x" * 16378 + b"\n\n")
    with suppress(ConnectionError):
        while True:
            writer.write(event)
            await writer.drain()


def test_a_client_that_reads_nothing_is_cut_off(start_proxy, monkeypatch):
    """A client that keeps its connection open but reads nothing of its stream is cut off
    after SEND_TIMEOUT, and the upstream request is closed with it."""
    monkeypatch.setattr(http1, "SEND_TIMEOUT", 1.0)
    with raw_server(_firehose) as upstream, start_proxy(upstream.url) as proxy:
        host, port = proxy.url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
        try:
            assert upstream.wait_closed(timeout=10) is not None, "the upstream request stayed open"
        finally:
            sock.close()


def test_an_upgrade_request_pipelined_behind_another_is_answered(start_proxy, mock_url):
    """A request with Upgrade pipelined behind a plain one: both answered (the Upgrade
    one as plain HTTP, then the close), the second not silently dropped."""
    upgrade = [("Connection", "Upgrade"), ("Upgrade", "websocket")]
    with start_proxy(mock_url) as proxy, wire(proxy.url) as w:
        w.send(req("GET", "/echo/one") + req("GET", "/echo/two", upgrade))
        assert echo(w.response())["raw_path"] == "/echo/one"
        assert echo(w.response())["raw_path"] == "/echo/two"
