"""The client side of the proxy: an HTTP/1.1 server on asyncio, parsed by httptools (llhttp).

Why not uvicorn here (it still serves the admin port): a proxy's work per stream is
accepting a connection and moving body chunks, and on the benchmark's 2-core machine
uvicorn with a trivial ASGI app spent 0.57 ms of CPU per new connection and stream (an
asyncio Protocol with httptools: 0.28 ms), and every body chunk of the relay went through
an ASGI message dict, a coroutine `send()` and a wake-up of the relay's task. Here the
relay writes each chunk from inside the upstream connection's read callback.

- `ClientConnection` is an `asyncio.Protocol`: httptools parses the requests, and
  `handler(request, response)` is called once a request's head (and whatever of its body
  came in the same read) is parsed. The handler owns the response until it ends or
  aborts it (it may start a task to wait for the body). The connection is kept alive
  between requests; a pipelined request waits until the response before it has ended.
- `Response` writes straight to the transport: the head (status line and headers), then
  the body framed for the client (chunked for HTTP/1.1, close-delimited for HTTP/1.0, or
  as is under a Content-Length). `end()` finishes it; `abort()` closes the connection
  without the chunked terminator, so the client sees an incomplete body.
- Flow control and disconnects reach the handler through `Response.listener`: the
  transport's `pause_writing`/`resume_writing`, and `client_gone` from `connection_lost`,
  at once, so the relay can close the upstream request in the same callback.
- Bad requests get a 400 (431 for an oversized head) and the connection is closed; they
  never reach the handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import socket
import traceback
from collections import deque
from collections.abc import Callable
from typing import Protocol, cast
from urllib.parse import unquote

import httptools
import structlog

from streamproxy.errors import (
    BadRequestBody,
    BodyTimeout,
    BodyTooLarge,
    ClientDisconnected,
    RequestError,
    json_error_body,
)

Headers = list[tuple[bytes, bytes]]
Handler = Callable[["Request", "Response"], None]

log = structlog.get_logger("streamproxy.http")

# Request line and headers together (nginx: 4 x 8 KiB buffers, h11: 16 KiB, Node: 16 KiB).
MAX_HEAD = 64 * 1024
# Idle keep-alive connections are closed after this (above an AWS ALB's 60 s, as nginx's
# keepalive_timeout 75 s), and so is a new connection that sends no request.
KEEP_ALIVE_TIMEOUT = 75.0
# A request body that stops arriving for this long gets 408 (nginx's client_body_timeout
# is 60 s), and a client that reads nothing of its response for this long is cut off
# (nginx's send_timeout, 60 s): neither holds a connection, and an upstream one, forever.
BODY_TIMEOUT = 75.0
SEND_TIMEOUT = 75.0
# An answer (413, 404) sent before the request body was all in: the rest of the body is
# read and dropped for up to this long, so that the client, still sending, reads the
# answer instead of a connection reset (nginx's lingering close). Then the connection
# goes on with its next request, or closes when the time is up.
LINGER = 5.0

STATUS_LINES: dict[int, bytes] = {
    int(code): b"HTTP/1.1 %d %s\r\n" % (code, code.phrase.encode("ascii"))
    for code in http.HTTPStatus
}


def status_line(code: int) -> bytes:
    return STATUS_LINES.get(code) or b"HTTP/1.1 %d \r\n" % code


class ResponseListener(Protocol):
    """What the handler learns about its client while it answers."""

    def client_gone(self) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...


class Request:
    """One request's head, and its body as it arrives."""

    __slots__ = (
        "_body",
        "_body_size",
        "_broken",
        "_complete",
        "_conn",
        "_overflow",
        "_waiter",
        "client",
        "expect_continue",
        "headers",
        "http_version",
        "keep_alive",
        "method",
        "path",
        "query",
        "raw_path",
    )

    def __init__(
        self,
        conn: ClientConnection,
        method: str,
        target: bytes,
        headers: Headers,
        http_version: str,
        keep_alive: bool,
    ) -> None:
        self._conn = conn
        self.method = method
        raw_path, _, self.query = target.partition(b"?")
        self.raw_path = raw_path
        path = raw_path.decode("latin-1")
        self.path = unquote(path) if "%" in path else path
        self.headers = headers
        self.http_version = http_version
        self.keep_alive = keep_alive
        self.client: str | None = conn.peer
        self.expect_continue = False
        self._body: list[bytes] = []
        self._body_size = 0
        self._overflow = False  # more body than max_body: the rest is dropped
        self._broken = False  # the parser failed inside the body
        self._complete = False
        self._waiter: asyncio.Future[None] | None = None

    async def read_body(self) -> bytes:
        """The whole body. Raises BodyTooLarge past the server's `max_body`,
        BadRequestBody if its framing is broken, ClientDisconnected if the client leaves
        first. Answers `Expect: 100-continue` on the first call."""
        conn = self._conn
        if self.expect_continue:
            self.expect_continue = False
            if not self._complete and not self._body_size:
                conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        while not self.body_settled:
            if conn.gone:
                raise ClientDisconnected
            self._waiter = conn.loop.create_future()
            try:
                await asyncio.wait_for(self._waiter, BODY_TIMEOUT)
            except TimeoutError:
                raise BodyTimeout(f"no request body byte for {BODY_TIMEOUT:g} s") from None
            finally:
                self._waiter = None
        return self.take_body()

    @property
    def body_settled(self) -> bool:
        """`take_body()` can answer now: the body is all in, too large, or broken."""
        return self._complete or self._overflow or self._broken

    def take_body(self) -> bytes:
        """The whole body, once `body_settled`; raises as `read_body` does."""
        conn = self._conn
        if conn.gone:
            raise ClientDisconnected
        if self._overflow:
            raise BodyTooLarge(f"request body over the {conn.server.max_body}-byte limit")
        if self._broken:
            raise BadRequestBody("the request body is not valid HTTP/1.1 framing")
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._body = []
        return body

    @property
    def body_received(self) -> bool:
        """The whole body has gone through the parser: the connection can be reused."""
        return self._complete and not self._broken

    def _drop_body(self) -> None:
        """The response was sent before the body arrived: read the rest, keep none of it."""
        self._overflow = True
        self._body = []

    def _break(self) -> None:
        self._broken = True
        self._wake()

    def _feed(self, piece: bytes) -> None:
        self._body_size += len(piece)
        if self._body_size > self._conn.server.max_body:
            self._overflow = True
            self._body = []
        elif not self._overflow:
            self._body.append(piece)
        self._wake()

    def _end(self) -> None:
        self._complete = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


# How a response body is delimited on the wire.
NO_BODY = 0  # HEAD, 1xx, 204, 304
LENGTH = 1  # Content-Length: the bytes as they are
CHUNKED = 2  # HTTP/1.1 without a length
CLOSE = 3  # HTTP/1.0 without a length: the end of the connection ends the body


class Response:
    """Writes one response to its client. Every method is synchronous and a no-op once
    the client is gone."""

    __slots__ = (
        "_conn",
        "_framing",
        "_remaining",
        "ended",
        "listener",
        "paused",
        "request",
        "started",
    )

    def __init__(self, conn: ClientConnection, request: Request) -> None:
        self._conn = conn
        self.request = request
        self.listener: ResponseListener | None = None
        self.started = False
        self.ended = False
        # The client is not reading fast enough. Pause and resume are edges: a response
        # that follows one the client fell behind on starts paused.
        self.paused = conn.write_paused
        self._framing = NO_BODY
        self._remaining = 0

    def start(self, status: int, headers: Headers, body: bytes = b"") -> None:
        """Send the status line and `headers` (lower-case names, no hop-by-hop ones),
        with the first piece of the body if there is one already."""
        if self.started:
            raise RuntimeError("response already started")
        request = self.request
        head = [status_line(status)]
        length: int | None = None
        for name, value in headers:
            if name == b"content-length":
                length = int(value)
            head.append(b"%s: %s\r\n" % (name, value))
        if request.method == "HEAD" or status in (204, 304) or status < 200:
            self._framing = NO_BODY
        elif length is not None:
            self._framing = LENGTH
            self._remaining = length
        elif request.http_version == "1.1":
            self._framing = CHUNKED
            head.append(b"transfer-encoding: chunked\r\n")
        else:
            self._framing = CLOSE
            request.keep_alive = False
        if request.expect_continue and not request.body_received:
            # Answered without "100 Continue": the client need not send its body, so
            # where the next request would start is unknown. Close after this answer.
            request.keep_alive = False
        if not request.keep_alive or self._conn.server.draining:
            request.keep_alive = False
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        if body:
            head.append(self._frame(body))
        self.started = True
        self._conn.write(b"".join(head))

    def write(self, chunk: bytes) -> None:
        """Send one piece of the body, as it is, in the client's framing."""
        if chunk and not self.ended and self._framing != NO_BODY:
            self._conn.write(self._frame(chunk))

    def _frame(self, chunk: bytes) -> bytes:
        if self._framing == CHUNKED:  # the common case first: this runs per event
            return b"%x\r\n%s\r\n" % (len(chunk), chunk)
        if self._framing == NO_BODY:
            return b""
        self._remaining -= len(chunk)  # counted under LENGTH, harmless under CLOSE
        return chunk

    def end(self) -> None:
        """Finish the body; the connection goes on to its next request or closes."""
        if self.ended:
            return
        self.ended = True
        if self._framing == CHUNKED:
            self._conn.write(b"0\r\n\r\n")
        elif self._framing == LENGTH and self._remaining != 0:
            self.request.keep_alive = False  # the client would wait for bytes that never come
        self._conn.response_done(self)

    def abort(self) -> None:
        """End the response as a failure: close the connection (after what is already
        written) without the chunked terminator. (An HTTP/1.0 client's close-delimited
        body has no terminator to withhold: there only the error event tells.)"""
        if self.ended:
            return
        self.ended = True
        self.request.keep_alive = False
        self._conn.response_done(self)


class ClientConnection(asyncio.Protocol):
    """One client connection: requests in, responses out, one at a time."""

    # httptools looks every callback up with getattr(); one that is missing costs an
    # AttributeError per connection. These it may skip:
    on_chunk_header = None
    on_chunk_complete = None

    __slots__ = (
        "began",
        "current",
        "head_bytes",
        "head_size",
        "headers",
        "idle_timer",
        "in_head",
        "linger_timer",
        "lingering",
        "loop",
        "no_more_requests",
        "parser",
        "parsing",
        "peer",
        "queue",
        "raw_body_left",
        "read_paused",
        "send_timer",
        "server",
        "transport",
        "url",
        "write_paused",
    )

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        # A pipelined request after one with `Connection: close` is ignored, not an error.
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.peer: str | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.write_paused = False
        self.read_paused = False
        self.send_timer: asyncio.TimerHandle | None = None  # runs while the client reads nothing
        self.lingering: Request | None = None  # answered, its body still arriving
        self.linger_timer: asyncio.TimerHandle | None = None
        # Parser state: the request being parsed, and its head so far.
        self.in_head = True  # inside a request head, or before the first one
        self.began = False  # a request head began in the read being parsed
        self.url = b""
        self.headers: Headers = []
        self.head_size = 0  # bytes of the head parsed so far
        self.head_bytes = 0  # bytes received while the head was incomplete
        self.parsing: Request | None = None
        self.raw_body_left = 0  # an Upgrade request's Content-Length body, read as is
        # Requests whose head is complete: the first is being answered.
        self.current: Response | None = None
        self.queue: deque[Request] = deque()
        self.no_more_requests = False  # after an Upgrade or a bad pipelined request

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else None
        self.server.connections.add(self)
        self._arm_idle_timer()

    def data_received(self, data: bytes) -> None:
        if self.raw_body_left:
            self._feed_raw_body(data)
            return
        if self.no_more_requests:
            return
        self.began = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._start_queued()
            self._after_upgrade(data[upgrade.args[0] :])
            return
        except httptools.HttpParserError as exc:
            self._start_queued()
            # An exception in a callback comes out wrapped, the original as its context.
            bad = exc.__context__
            if isinstance(bad, BadHead):
                self._refuse(bad.status, bad.message)
            else:
                self._refuse(400, f"invalid HTTP request: {exc}")
            return
        # Started after the whole read is parsed, so that a body that came along with
        # its head is all there: the handler can send the request on at once.
        self._start_queued()
        # A head arriving piece by piece, or never ending: count every read after the one
        # it began in (that one may hold the end of the previous body), so a head is
        # bounded by MAX_HEAD plus one read.
        if self.in_head and not self.began:
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD:
                self._refuse(431, "request head too large")

    def _after_upgrade(self, rest: bytes) -> None:
        """llhttp ends a request that asks for an Upgrade (h2c, websocket) at its head:
        what follows would be the other protocol. The proxy speaks none, so it serves the
        request as plain HTTP (RFC 9110 7.8 lets a server ignore Upgrade), reads a
        Content-Length body as the raw bytes that follow, and closes afterwards."""
        self.no_more_requests = True
        if self.raw_body_left:
            self._feed_raw_body(rest)

    def _feed_raw_body(self, data: bytes) -> None:
        request = self.parsing
        piece = data[: self.raw_body_left]
        self.raw_body_left -= len(piece)
        if request is None:
            return
        if piece:
            request._feed(piece)
        if not self.raw_body_left:
            self.parsing = None
            self._body_done(request)

    def eof_received(self) -> bool | None:
        return None  # a half-closed client is a gone client (uvicorn does the same)

    @property
    def gone(self) -> bool:
        """The client connection is closed (`connection_lost` drops the transport)."""
        return self.transport is None

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self._stop_lingering()
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.parsing is not None:
            self.parsing._wake()
        self.queue.clear()
        current = self.current
        self.current = None
        if current is not None and not current.ended:
            current.request._wake()
            if current.listener is not None:
                current.listener.client_gone()
        # Break the reference cycles (parser <-> protocol <-> transport), so that refcounting
        # frees a closed connection at once, not a garbage collection later.
        self.parser = None  # type: ignore[assignment]
        self.transport = None
        self.parsing = None

    def pause_writing(self) -> None:
        self.write_paused = True
        self.send_timer = self.loop.call_later(SEND_TIMEOUT, self._client_stalled)
        current = self.current
        if current is not None:
            current.paused = True
            if current.listener is not None:
                current.listener.pause_writing()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None
        current = self.current
        if current is not None:
            current.paused = False
            if current.listener is not None:
                current.listener.resume_writing()

    # -- httptools callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_head = self.began = True
        self.url = b""
        self.headers = []
        self.head_size = self.head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4  # with ": " and CRLF
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        if self.idle_timer is not None:  # it also bounds how long a head may take
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.no_more_requests or self.transport is None or self.transport.is_closing():
            return  # parsed from the same read after this connection's last answer
        # A head that arrived whole in one read is measured here; one that arrives in
        # pieces, or never ends, is counted as it comes (data_received).
        if self.head_size + len(self.url) + 16 > MAX_HEAD:  # + method and version
            raise BadHead(431, "request head too large")
        parser = self.parser
        version = parser.get_http_version()
        if version not in ("1.0", "1.1"):
            raise BadHead(505, f"HTTP/{version} is not supported")
        request = Request(
            self,
            parser.get_method().decode("ascii"),
            self.url,
            self.headers,
            version,
            keep_alive=version == "1.1" and parser.should_keep_alive(),
        )
        for name, value in self.headers:
            if name == b"expect" and value.lower() == b"100-continue":
                request.expect_continue = version == "1.1"  # HTTP/1.0 must ignore it
        if parser.should_upgrade():  # see _after_upgrade
            request.keep_alive = False
            self.raw_body_left = _upgrade_body_length(self.headers)
        self.parsing = request
        self.queue.append(request)
        if (self.current is not None or len(self.queue) > 1) and not self.read_paused:
            # A pipelined request waits for the one before it; read no further meanwhile
            # (as uvicorn does), so that queued bodies cannot pile up in memory.
            self.read_paused = True
            self.transport.pause_reading()

    def on_body(self, body: bytes) -> None:
        if self.parsing is not None:
            self.parsing._feed(body)

    def on_message_complete(self) -> None:
        request = self.parsing
        if request is not None and not self.raw_body_left:
            self.parsing = None
            self._body_done(request)

    def _body_done(self, request: Request) -> None:
        request._end()
        if request is self.lingering:  # its answer went out before: now it is all over
            self._stop_lingering()
            self._after(request)

    # -- requests and responses -----------------------------------------------------

    def _start_queued(self) -> None:
        """Hand the next parsed request to the handler, unless one is being answered."""
        if self.current is None and self.queue and self.transport is not None:
            request = self.queue.popleft()
            response = Response(self, request)
            self.current = response
            try:
                self.server.handler(request, response)
            except Exception as exc:  # a bug in the handler must not leave the client hanging
                trace = "".join(traceback.format_exception(exc))
                log.error("request failed", error=repr(exc), traceback=trace)
                if not response.started and not self.gone:
                    response.start(500, [(b"content-length", b"0")])
                    response.end()
                response.abort()  # a no-op after end()

    def response_done(self, response: Response) -> None:
        """The response is complete (or cut): on to the next request, or close."""
        if response is not self.current:
            return
        self.current = None
        request = response.request
        still_sending = not request.body_received and not request._broken
        if still_sending and not self.gone:
            request._drop_body()
            self.lingering = request
            self.linger_timer = self.loop.call_later(LINGER, self._linger_over)
            return
        self._after(request)

    def _after(self, request: Request) -> None:
        """The request and its response are both over."""
        transport = self.transport
        if transport is None:  # the client is gone
            return
        # After an Upgrade request the parser reads no further, but what it parsed
        # before (that very request, pipelined behind this one) is still served.
        more = not self.no_more_requests or bool(self.queue)
        reusable = request.keep_alive and request.body_received and more
        if not reusable or self.server.draining:
            self.no_more_requests = True  # what the parser still finds is not served
            transport.close()
            return
        if self.read_paused:
            self.read_paused = False
            transport.resume_reading()
        if self.queue:
            # A pipelined request: started from the loop, not from inside the callback
            # that ended this response (which may be an upstream connection's read).
            self.loop.call_soon(self._start_queued)
        else:
            self._arm_idle_timer()

    def _linger_over(self) -> None:
        self._stop_lingering()
        if self.transport is not None:
            self.transport.close()

    def _stop_lingering(self) -> None:
        self.lingering = None
        if self.linger_timer is not None:
            self.linger_timer.cancel()
            self.linger_timer = None

    def _refuse(self, status: int, message: str) -> None:
        """Answer a request that cannot be parsed, then close (nothing after it can be
        trusted to be where the parser thinks)."""
        self.no_more_requests = True
        self.queue.clear()
        log.warning("bad request", status=status, error=message, client=self.peer)
        if self.lingering is not None:  # it has its answer already: no second one
            self._stop_lingering()
            if self.transport is not None:
                self.transport.close()
            return
        current = self.current
        if current is not None:  # a response is running: let it finish, then close
            current.request.keep_alive = False
            if self.parsing is current.request:  # the broken part is its own body
                current.request._break()
            return
        error = RequestError(message)
        error.status = status
        body = json_error_body(error, anthropic=False)
        head = (
            b"%scontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        )
        self.write(head % (status_line(status), len(body)) + body)
        if self.transport is not None:
            self.transport.close()

    # -- writing ---------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self.transport  # None once the connection is lost
        if transport is not None and not transport.is_closing():
            transport.write(data)

    # -- idleness and shutdown -------------------------------------------------------

    def _arm_idle_timer(self) -> None:
        # Runs until the next request's head is complete: it closes idle keep-alive
        # connections, and connections whose head never ends (slowloris).
        self.idle_timer = self.loop.call_later(self.server.keep_alive_timeout, self.close_if_idle)

    def close_if_idle(self) -> None:
        """Close the connection unless a request is being answered (keep-alive timeout,
        shutdown)."""
        if self.idle_timer is not None:
            self.idle_timer.cancel()  # when called by the shutdown rather than the timer
            self.idle_timer = None
        if self.current is None and self.lingering is None and self.transport is not None:
            self.transport.close()

    def _client_stalled(self) -> None:
        self.send_timer = None
        log.warning("client read nothing; closing", seconds=SEND_TIMEOUT, client=self.peer)
        self.abort()  # connection_lost follows: the relay closes the upstream request

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class BadHead(Exception):
    """A request head the server refuses (raised inside a parser callback)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _upgrade_body_length(headers: Headers) -> int:
    """The Content-Length of an Upgrade request (0 if none); a chunked one is refused."""
    length = 0
    for name, value in headers:
        if name == b"transfer-encoding":
            raise BadHead(400, "an Upgrade request with a chunked body is not supported")
        if name == b"content-length":
            if not value.strip().isdigit():
                raise BadHead(400, "invalid Content-Length")
            length = int(value)
    return length


class ProxyServer:
    """The listening sockets, every open connection and every request task."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_body: int,
        keep_alive_timeout: float = KEEP_ALIVE_TIMEOUT,
    ) -> None:
        self.handler = handler
        self.max_body = max_body
        self.keep_alive_timeout = keep_alive_timeout
        self.loop = asyncio.get_running_loop()
        self.servers: list[asyncio.Server] = []
        self.connections: set[ClientConnection] = set()
        self.draining = False

    async def start(self, sockets: list[socket.socket], backlog: int = 4096) -> None:
        for sock in sockets:
            server = await self.loop.create_server(
                lambda: ClientConnection(self), sock=sock, backlog=backlog
            )
            self.servers.append(server)

    def stop_accepting(self) -> None:
        """Close the listeners (new connections are refused) and the idle connections;
        the others close once their current response has ended."""
        self.draining = True
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            conn.close_if_idle()

    async def shutdown(self) -> None:
        """After the drain: close every connection (what is still answered sees its
        client leave) and the listeners."""
        self.stop_accepting()
        for conn in list(self.connections):
            conn.abort()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
