"""The upstream client: HTTP/1.1 over asyncio, parsed by httptools (llhttp), pooled.

Why not httpx: profiled under 200 concurrent streams, httpcore's connection pool scanned
every connection (with a `select()` per idle one) on each request and each release, and
every body read went through five async generator layers, an anyio cancel scope and
h11's pure-Python chunked parser: ~200 µs of CPU per relayed event against nginx's ~12.
This client keeps the same promises with one C parser and no layers:

- `UpstreamConnection` is an `asyncio.BufferedProtocol`: each read lands in the pool's
  buffer and `buffer_updated` feeds llhttp. The response head, or what failed before
  it, goes to a `HeadListener` from the read callback (`UpstreamPool.send`, on an idle
  connection, needs no task; `request()` awaits it, connecting if need be). The body
  then goes to a `BodySink` (the relay's pump) from inside the read callbacks, one call
  per network read, without a task or a future per chunk; `read()` pulls a body
  instead (small error bodies). Unread pieces
  pause the socket once 64 KiB wait: backpressure reaches the upstream's TCP window.
- Bodies are never decoded: the sink gets the bytes of the HTTP message body exactly
  (chunked framing removed, Content-Encoding untouched).
- Silence is measured by one timer per response, re-armed lazily: the hot path only
  stores the time of the last read, never creates or cancels a timer per chunk.
- Closing a response that is not finished closes its connection: a client that leaves
  mid-stream ends the upstream request at once.
- Errors are raised (or given to the sink) as the proxy's own (`UpstreamConnectError`,
  `UpstreamTimeout`, `UpstreamProtocolError`), so the relay never sees a transport
  exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Sequence
from typing import Protocol, cast
from urllib.parse import urlsplit

import httptools

from streamproxy.config import UpstreamConfig
from streamproxy.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)

Headers = list[tuple[bytes, bytes]]

MAX_IDLE = 256  # idle keep-alive connections kept per upstream
# Seconds an idle connection is kept for reuse (nginx's upstream keepalive_timeout is
# 60 s, Go's net/http 90 s): a new connection to an https API costs a TLS handshake.
# Servers close idle connections sooner (uvicorn after 5 s): the pool notices the close
# (the connection is read while idle), and a request on a connection closed under it
# before any byte of answer is sent again on a new one (`request`).
IDLE_EXPIRY = 60.0
MAX_HEAD = 64 * 1024  # response head limit (h11 allows 16 KiB, nginx 4-8 KiB per buffer)
# Body bytes held unread before the socket stops being read (asyncio's StreamReader
# pauses at 2 x 64 KiB). Pausing per piece instead would cost two epoll_ctl calls per event.
HIGH_WATER = 64 * 1024
# Bytes taken from the socket per loop turn and connection. uvloop reads 256 KiB at a
# time, and libuv reads again, up to 32 times, while each read fills the buffer: under a
# flood one callback could relay and observe megabytes, tens of thousands of events, a
# loop turn over dozens of such streams took hundreds of ms, and a new stream, whose
# request needs a few turns, waited seconds (measured: of 100 streams opened into a
# flood, half got no first byte within 5 s; nginx reads 8 KiB per event and served all
# within 0.9 s). So reads land in a 32 KiB buffer and a full one yields the loop (see
# `buffer_updated`); a stream at 50 events/s never fills it.
READ_SIZE = 32 * 1024


class HeadListener(Protocol):
    """Who waits for a response head (called from the connection's callbacks): exactly
    one of `head_received`, or `head_failed` with what went wrong before the head;
    `retryable` if the request went out on a reused connection the server had closed,
    before any byte of answer (it may be sent again on a new one)."""

    def head_received(self, response: UpstreamResponse) -> None: ...
    def head_failed(self, error: UpstreamError, retryable: bool) -> None: ...


class BodySink(Protocol):
    """Where a response body goes as it arrives (called from the connection's callbacks):
    `on_body` per network read, then exactly one of `on_end` or `on_error`."""

    def on_body(self, chunk: bytes) -> None: ...
    def on_end(self) -> None: ...
    def on_error(self, error: UpstreamError) -> None: ...


class UpstreamConnection(asyncio.BufferedProtocol):
    """One TCP (or TLS) connection to the upstream, carrying one response at a time."""

    # httptools looks every callback up with getattr(); one that is missing costs an
    # AttributeError per connection. These it may skip:
    on_status = None
    on_chunk_header = None
    on_chunk_complete = None

    __slots__ = (
        "buffer",
        "buffered",
        "close_delimited",
        "closed",
        "error",
        "got_bytes",
        "head_request",
        "head_size",
        "headers",
        "headers_done",
        "idle_since",
        "keep_alive",
        "last_data",
        "listener",
        "loop",
        "message_done",
        "parser",
        "paused",
        "pending",
        "pieces",
        "reused",
        "silence_timer",
        "sink",
        "status",
        "transport",
        "waiter",
        "yielded",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, buffer: memoryview) -> None:
        self.buffer = buffer  # the pool's: reads land here one at a time (get_buffer)
        self.yielded = False  # reading paused for the rest of this loop turn (not per response)
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.reset()

    def reset(self) -> None:
        self.status = 0
        self.headers: Headers = []
        self.head_size = 0
        self.headers_done = False
        self.message_done = False
        self.keep_alive = False
        self.close_delimited = False
        self.got_bytes = False
        self.pieces: list[bytes] = []
        self.buffered = 0  # bytes in `pieces`
        self.error: UpstreamError | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.last_data = 0.0
        self.paused = False  # reading paused: unread pieces, or a slow client
        self.silence_timer: asyncio.TimerHandle | None = None
        self.sink: BodySink | None = None
        # Waiting for the head: who is told, and of which response.
        self.listener: HeadListener | None = None
        self.pending: UpstreamResponse | None = None
        self.reused = False  # the request went out on a connection used before
        self.head_request = False  # a HEAD request: no body follows the head

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        """A read landed in the buffer: parse it, hand the body on (or wake the waiter)."""
        self.got_bytes = True
        self.last_data = self.loop.time()
        try:
            # httptools copies what it hands on (body pieces are new bytes objects), so
            # the shared buffer is free again when this returns.
            self.parser.feed_data(self.buffer[:nbytes])
        except httptools.HttpParserError as exc:
            # An exception in a callback comes out wrapped, the original as its context.
            cause = exc.__context__
            if isinstance(cause, UpstreamProtocolError):
                self._fail(cause)
            else:
                self._fail(UpstreamProtocolError(f"invalid HTTP from upstream: {exc}"))
            return
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamProtocolError("upstream switched protocols"))
            return
        if self.listener is not None and self.headers_done:
            self._head_arrived()
        if self.sink is not None:
            self.deliver()
        else:
            if self.pieces or self.message_done or self.headers_done:
                self._wake()
            if self.buffered > HIGH_WATER:
                self.pause_reading()
        if nbytes == READ_SIZE and not self.paused and not self.closed and self.transport:
            # More is waiting: stop here for this loop turn (libuv would read again at
            # once), so that every other connection gets its turn, then read on.
            self.yielded = True
            self.transport.pause_reading()
            self.loop.call_soon(self._read_on)

    def _head_arrived(self) -> None:
        """Hand the complete head on in this very callback: the relay starts its response
        here, and may attach its sink."""
        listener, response = self.listener, self.pending
        self.listener = self.pending = None  # told once; and no cycle left
        assert listener is not None
        assert response is not None
        if self.head_request:  # no body follows, whatever the headers say; don't reuse
            self.message_done = True
            self.closed = True
        listener.head_received(response)

    def _head_failed(self) -> None:
        listener, error = self.listener, self.error
        self.listener = self.pending = None
        assert listener is not None
        assert error is not None
        # The request is over on this connection whoever listens (a timed-out one too):
        # nobody owns it any more. Only a close before any byte may be sent again.
        retryable = self.reused and not self.got_bytes and not isinstance(error, UpstreamTimeout)
        self.abort()
        listener.head_failed(error, retryable)

    def _read_on(self) -> None:
        if self.yielded:
            self.yielded = False
            if not self.paused and not self.closed and self.transport is not None:
                self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.parser = None  # type: ignore[assignment]  # breaks parser <-> protocol for refcounting
        if self.message_done:
            return
        if self.headers_done and self.close_delimited and exc is None:
            self.message_done = True  # a body framed by the end of the connection
        elif self.error is None:
            where = "mid-body" if self.headers_done else "before the response headers"
            detail = f": {exc}" if exc else ""
            self.error = UpstreamProtocolError(f"upstream closed the connection {where}{detail}")
        self._notify()

    # -- httptools callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.message_done:  # llhttp parses on past the end of the one response asked for
            raise UpstreamProtocolError("upstream sent more than the one response asked for")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value)
        if self.head_size > MAX_HEAD:
            raise UpstreamProtocolError("upstream response head too large")
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # informational: the real response follows
            self.headers = []
            return
        self.status = status
        self.headers_done = True
        framed = False  # by a length or by chunks; else the close ends the body
        for name, value in self.headers:
            if name == b"content-length" or (
                name == b"transfer-encoding" and value.lower().find(b"chunked") >= 0
            ):
                framed = True
        self.close_delimited = not framed

    def on_body(self, body: bytes) -> None:
        self.pieces.append(body)
        self.buffered += len(body)

    def on_message_complete(self) -> None:
        if self.headers_done:
            self.message_done = True
            # llhttp answers this only inside the callback; afterwards it has reset.
            self.keep_alive = self.parser.should_keep_alive()

    # -- used by UpstreamResponse ----------------------------------------------------

    def take_pieces(self) -> bytes:
        """The body bytes parsed and not yet handed out, as one chunk (b"" if none)."""
        pieces = self.pieces
        if not pieces:
            return b""
        self.pieces = []
        self.buffered = 0
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def pause_reading(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def deliver(self) -> None:
        """Hand what the parser has to the sink: the pieces of this read as one chunk,
        then the end or the error, once."""
        sink = self.sink
        if sink is None:
            return
        chunk = self.take_pieces()
        if chunk:
            sink.on_body(chunk)
        if self.message_done:
            self.sink = None
            sink.on_end()
        elif self.error is not None:
            self.sink = None
            sink.on_error(self.error)

    def _notify(self) -> None:
        if self.sink is not None:
            self.deliver()
        elif self.listener is not None and self.headers_done:
            self._head_arrived()  # a whole response, then an error (extra bytes, a close)
        elif self.listener is not None and self.error is not None:
            self._head_failed()
        else:
            self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        self.error = error
        self.abort()
        self._notify()

    def abort(self) -> None:
        self.closed = True
        self.stop_silence_timer()
        if self.transport is not None:
            self.transport.abort()

    async def wait(self) -> None:
        """Wait until the parser or the silence timer has something to say."""
        self.waiter = self.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def start_silence_timer(self, timeout: float) -> None:
        """One timer per response, re-armed only when it fires (not per chunk)."""
        self.last_data = self.loop.time()
        self.silence_timer = self.loop.call_at(
            self.last_data + timeout, self._check_silence, timeout
        )

    def stop_silence_timer(self) -> None:
        if self.silence_timer is not None:
            self.silence_timer.cancel()
            self.silence_timer = None

    def _check_silence(self, timeout: float) -> None:
        now = self.loop.time()
        if self.message_done or self.error is not None:
            self.silence_timer = None
            return
        if self.paused or (self.sink is None and self.waiter is None and self.listener is None):
            # We are not waiting for the upstream (the client is slow): not its silence.
            deadline = now + timeout
        else:
            deadline = self.last_data + timeout
            if now >= deadline:
                self.silence_timer = None
                self.error = UpstreamTimeout(f"upstream was silent for {timeout:g} s")
                self._notify()
                return
        self.silence_timer = self.loop.call_at(deadline, self._check_silence, timeout)

    def reusable(self, now: float) -> bool:
        return (
            not self.closed
            and self.transport is not None
            and not self.transport.is_closing()
            and now - self.idle_since < IDLE_EXPIRY
        )


class UpstreamResponse:
    """A response whose body goes to a sink (`attach`) or is pulled (`read`); `close()`
    gives the connection back to the pool, or closes it if the body is not finished."""

    __slots__ = ("_closed", "_conn", "_pool")

    def __init__(self, pool: UpstreamPool, conn: UpstreamConnection) -> None:
        self._pool = pool
        self._conn = conn
        self._closed = False

    @property
    def status(self) -> int:
        return self._conn.status

    @property
    def headers(self) -> Headers:
        return self._conn.headers

    def take_buffered(self) -> bytes:
        """The body bytes that arrived with the head (b"" if none), taken: the relay sends
        them with the response head, in one write."""
        chunk = self._conn.take_pieces()
        self.resume()  # a read paused by the unread pieces goes on
        return chunk

    def attach(self, sink: BodySink) -> None:
        """Deliver the rest of the body to `sink`, starting with what is already here."""
        self._conn.sink = sink
        self._conn.deliver()
        self.resume()

    def pause(self) -> None:
        """Stop reading from the upstream (the client is not keeping up)."""
        if not self._closed:
            self._conn.pause_reading()

    def resume(self) -> None:
        if not self._closed:
            self._conn.resume_reading()

    async def read(self) -> bytes:
        """The next piece of the body as it arrived; b"" at its end. Raises UpstreamError."""
        conn = self._conn
        while True:
            chunk = conn.take_pieces()
            if chunk:
                self.resume()
                return chunk
            if conn.message_done:
                return b""
            if conn.error is not None:
                raise conn.error
            await conn.wait()

    def close(self) -> None:
        """Give the connection back if the body was read to its end; close it otherwise.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        conn = self._conn
        conn.sink = None
        conn.listener = conn.pending = None
        conn.stop_silence_timer()
        if conn.message_done and not conn.pieces and conn.error is None:
            conn.resume_reading()  # idle in the pool, it must see the server's close
            self._pool.release(conn)
        else:
            conn.abort()


class UpstreamPool:
    """Connections to one upstream: LIFO reuse of idle keep-alive connections."""

    def __init__(self, upstream: UpstreamConfig) -> None:
        parts = urlsplit(upstream.url)
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        default_port = (parts.scheme, self.port) in (("http", 80), ("https", 443))
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = (host if default_port else f"{host}:{self.port}").encode("idna")
        self.ssl = tls_context() if parts.scheme == "https" else None
        self.connect_timeout = upstream.connect_timeout
        self.read_timeout = upstream.read_timeout
        self.idle: list[UpstreamConnection] = []  # oldest first; reuse takes the newest
        self.sweeper: asyncio.TimerHandle | None = None
        # One read buffer for all of this pool's connections: the loop reads one socket
        # at a time and `buffer_updated` is done with it before the next read, so 1,000
        # open streams hold 32 KiB, not 32 MiB. (A pool belongs to one event loop.)
        self.read_buffer = memoryview(bytearray(READ_SIZE))

    def send(
        self,
        method: str,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        listener: HeadListener,
    ) -> UpstreamResponse | None:
        """Send a request in this call, on an idle connection: its head, or what failed
        before it, reaches `listener` from the connection's read callback. None if no
        idle connection is at hand (then `await request()`, which connects)."""
        conn = self._take_idle()
        if conn is None:
            return None
        head = _request_head(method, target, self.host_header, headers, len(body))
        return self._send(conn, method, head, body, listener, reused=True)

    async def request(
        self,
        method: str,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        listener: HeadListener | None = None,
    ) -> UpstreamResponse:
        """Send a request and wait for the response head. A reused connection the server
        had already closed (no byte of answer) is retried once on a fresh one. `listener`,
        if given, gets the head from the read callback that completed it, before this
        returns (failures are raised here instead)."""
        head = _request_head(method, target, self.host_header, headers, len(body))
        conn = self._take_idle()
        if conn is not None:
            with contextlib.suppress(_StaleConnection):
                return await self._exchange(conn, method, head, body, True, listener)
        conn = await self._connect()
        return await self._exchange(conn, method, head, body, False, listener)

    def _send(
        self,
        conn: UpstreamConnection,
        method: str,
        head: bytes,
        body: bytes,
        listener: HeadListener,
        reused: bool,
    ) -> UpstreamResponse:
        assert conn.transport is not None
        conn.reset()
        response = UpstreamResponse(self, conn)
        conn.listener = listener
        conn.pending = response
        conn.reused = reused
        conn.head_request = method == "HEAD"
        conn.start_silence_timer(self.read_timeout)
        conn.transport.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            conn.transport.write(body)
        return response

    async def _exchange(
        self,
        conn: UpstreamConnection,
        method: str,
        head: bytes,
        body: bytes,
        reused: bool,
        listener: HeadListener | None,
    ) -> UpstreamResponse:
        waiter = _HeadWaiter(conn.loop, listener)
        response = self._send(conn, method, head, body, waiter, reused)
        try:
            retryable = await waiter.future
        except BaseException:
            # Cancelled: this request ends, and with it its connection, unless the head
            # went on to the caller's listener already (the relay owns the connection
            # then, and it may even be back in the pool by now).
            if conn.listener is waiter or listener is None:
                response.close()
            raise
        if retryable is not None:  # the head failed (the connection closed itself)
            error = conn.error
            assert error is not None
            if retryable:
                raise _StaleConnection
            raise error
        return response

    def _take_idle(self) -> UpstreamConnection | None:
        now = asyncio.get_running_loop().time()
        while self.idle:
            conn = self.idle.pop()
            if conn.reusable(now):
                return conn
            conn.abort()
        return None

    async def _connect(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(loop, self.read_buffer),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                )
        except TimeoutError as exc:
            raise UpstreamConnectError(
                f"connect to {self.host}:{self.port} timed out", timed_out=True
            ) from exc
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamConnectError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        if conn.closed or not conn.keep_alive or len(self.idle) >= MAX_IDLE:
            conn.abort()
            return
        conn.idle_since = conn.loop.time()
        self.idle.append(conn)
        if self.sweeper is None:
            self.sweeper = conn.loop.call_later(IDLE_EXPIRY, self._sweep)

    def _sweep(self) -> None:
        """Close the idle connections past IDLE_EXPIRY while nobody waits, so that no
        request pays for closing them (after a quiet spell, a burst's first request would
        otherwise close hundreds of expired connections in `_take_idle`)."""
        self.sweeper = None
        if not self.idle:
            return
        loop = self.idle[0].loop
        now = loop.time()
        expired = 0
        while expired < len(self.idle) and now - self.idle[expired].idle_since >= IDLE_EXPIRY:
            self.idle[expired].abort()
            expired += 1
        del self.idle[:expired]
        if self.idle:
            due = self.idle[0].idle_since + IDLE_EXPIRY - now
            self.sweeper = loop.call_later(due, self._sweep)

    async def aclose(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None
        while self.idle:
            self.idle.pop().abort()


class _StaleConnection(Exception):
    """A reused connection was closed by the server before it answered."""


class _HeadWaiter:
    """The HeadListener of `UpstreamPool.request`: the head or its failure resolves
    `future` (None for a head, else whether the failure may be retried); a head is also
    passed on to the caller's listener, from the read callback."""

    __slots__ = ("future", "listener")

    def __init__(self, loop: asyncio.AbstractEventLoop, listener: HeadListener | None) -> None:
        self.future: asyncio.Future[bool | None] = loop.create_future()
        self.listener = listener

    def head_received(self, response: UpstreamResponse) -> None:
        if self.listener is not None:
            self.listener.head_received(response)
        if not self.future.done():
            self.future.set_result(None)

    def head_failed(self, error: UpstreamError, retryable: bool) -> None:
        if not self.future.done():
            self.future.set_result(retryable)


def _request_head(
    method: str, target: bytes, host: bytes, headers: Sequence[tuple[bytes, bytes]], length: int
) -> bytes:
    lines = [method.encode("ascii") + b" " + target + b" HTTP/1.1", b"host: " + host]
    lines.extend(name + b": " + value for name, value in headers)
    if length or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        lines.append(b"content-length: " + str(length).encode("ascii"))
    return b"\r\n".join(lines) + b"\r\n\r\n"


class TrustStoreError(Exception):
    """The CA certificates named by SSL_CERT_FILE / SSL_CERT_DIR cannot be loaded."""


def tls_context() -> ssl.SSLContext:
    """The TLS context of https upstreams: certifi's CA bundle, or the file and directory
    named by SSL_CERT_FILE / SSL_CERT_DIR (the variables OpenSSL and httpx honour), for
    upstreams behind a private CA or a TLS-inspecting gateway."""
    cafile = os.environ.get("SSL_CERT_FILE") or None
    capath = os.environ.get("SSL_CERT_DIR") or None
    if cafile is None and capath is None:
        try:
            import certifi
        except ImportError:  # pragma: no cover - certifi is a dependency
            pass
        else:
            cafile = certifi.where()
    try:
        context = ssl.create_default_context(cafile=cafile, capath=capath)
    except (OSError, ssl.SSLError) as exc:
        where = f"{cafile or capath} (SSL_CERT_FILE/SSL_CERT_DIR)"
        raise TrustStoreError(f"cannot load CA certificates from {where}: {exc}") from exc
    context.set_alpn_protocols(["http/1.1"])
    return context
