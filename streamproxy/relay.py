"""ProxyApp: the pure-ASGI hot path. One `Exchange` per request.

Theory of operation
-------------------
1. Route the raw path (longest `path_prefix`), read the request body up to the limit,
   send it upstream (upstream.py: asyncio + httptools) and wait for the response head.
   Failures before the response starts become a JSON error in the SDK's shape (502/504/4xx).
2. Send the response headers, then pump: `while chunk := await read(): send(chunk)`.
   One await per chunk and no reading ahead, so uvicorn's `drain()` gives backpressure
   for free and a slow client holds at most the transport's buffers. Each chunk is
   observed (scanner, token timings) only *after* it has been handed to the transport.
3. Beside the pump, in one TaskGroup: a watcher on `receive()` (uvicorn reports a gone
   client only there: its `send()` returns silently after a disconnect) that cancels the
   pump, which closes the upstream connection at once (`UpstreamResponse.aclose`). For
   identity-encoded SSE a keepalive timer (a TimerHandle, not a task) nudges the pump's
   pending read after `interval` of silence; the pump then writes the comment itself.
   The pump is the only writer, so a comment lands only between two chunks, where the
   scanner, fed right after each write, says whether a line ended.
4. End: a clean upstream EOF ends the body normally. Any failure (upstream error,
   timeout, drain abort) sends the contract's SSE error event if the stream stands at an
   event boundary, then returns *without* `more_body: False`: uvicorn closes the
   connection without the chunked terminator and every client sees a broken stream.
5. Account exactly once: the observer's record goes to metrics and one access-log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import structlog

from streamproxy import headers as hdrs, logs
from streamproxy.config import Config
from streamproxy.errors import (
    BodyTooLarge,
    ClientDisconnected,
    MethodNotAllowed,
    ProxyError,
    ProxyShuttingDown,
    UpstreamError,
    UpstreamTimeout,
    describe_error_body,
    json_error_body,
    sse_error_frame,
)
from streamproxy.keepalive import SLACK, KeepaliveTimer, comment_line
from streamproxy.metrics import GapRecorder, Metrics
from streamproxy.observer import Outcome, StreamObserver, body_kind
from streamproxy.providers import Api, detect_api, request_model, wants_stream
from streamproxy.routing import Route, RouteTable
from streamproxy.upstream import UpstreamPool, UpstreamResponse

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

clock = time.monotonic


class ProxyApp:
    """The ASGI application that relays every request to its upstream."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.routes = RouteTable(config.upstreams, os.environ if env is None else env)
        self.pools = {u.name: UpstreamPool(u) for u in config.upstreams}
        self.keepalive = config.keepalive
        self.keepalive_line = comment_line(config.keepalive.comment)
        self.max_body = config.limits.max_request_body
        self.metrics = metrics
        self.active: set[Exchange] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await Exchange(self, scope, receive, send).run()

    def abort_all(self, message: str) -> int:
        """End every running stream as an upstream failure (the drain timeout ran out)."""
        exchanges = list(self.active)
        for exchange in exchanges:
            exchange.abort(ProxyShuttingDown(message))
        return len(exchanges)

    async def aclose(self) -> None:
        for pool in self.pools.values():
            await pool.aclose()


class Downstream:
    """The single path of bytes to the client. Only the pump task writes through it (the
    keepalive timer nudges the pump instead of writing), so writes never interleave."""

    __slots__ = ("interval", "last_write", "line", "observer", "on_keepalive", "send")

    def __init__(
        self,
        send: Send,
        observer: StreamObserver,
        on_keepalive: Callable[[], None],
        line: bytes = b"",
        interval: float = 0.0,
    ) -> None:
        self.send = send
        self.observer = observer
        self.on_keepalive = on_keepalive
        self.line = line
        self.interval = interval
        self.last_write = clock()

    async def write(self, chunk: bytes) -> None:
        """Send one upstream chunk, then observe it."""
        await self.send({"type": "http.response.body", "body": chunk, "more_body": True})
        self.last_write = now = clock()
        self.observer.on_chunk(chunk, now)

    async def write_keepalive(self) -> None:
        """Send a comment if the stream is still silent and stands at a line boundary
        (otherwise the timer asks again one interval later)."""
        if clock() - self.last_write < self.interval - SLACK:
            return  # a chunk went out since the timer fired
        if not self.observer.at_line_boundary:
            return
        await self.send({"type": "http.response.body", "body": self.line, "more_body": True})
        self.last_write = clock()
        self.on_keepalive()


class Exchange:
    """One request and its response. State flags are explicit, as in uvicorn's
    RequestResponseCycle; the outcome is decided once, by `finish()`."""

    def __init__(self, app: ProxyApp, scope: Scope, receive: Receive, send: Send) -> None:
        self.app = app
        self.scope = scope
        self.receive = receive
        self.send = send
        self.arrived = clock()
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        self.upstream_name = "none"
        self.api: Api = "unknown"
        self.model: str | None = None
        self.status = 0
        self.observer = StreamObserver("unknown", "none", self.arrived)
        self.error: ProxyError | None = None
        self.client_gone = False
        self.interrupted = False  # this exchange's task was cancelled by _interrupt()
        self.interrupt_absorbed = False
        self.accounted = False
        self.wants_stream = False
        self.upstream_answered = False
        self.committed = False  # 200 + SSE headers sent before the upstream answered
        self.task: asyncio.Task[Any] | None = None  # the task running this exchange
        self.group: asyncio.TaskGroup | None = None  # owns the watcher (and the early commit)
        self.gaps: GapRecorder | None = None  # inter-token gaps, flushed to the ITL histogram

    # -- the request ---------------------------------------------------------------

    async def run(self) -> None:
        structlog.contextvars.bind_contextvars(request_id=self._request_id())
        self.task = asyncio.current_task()
        outcome: Outcome = "upstream_error"  # if anything unforeseen escapes below
        try:
            outcome = await self._serve()
        except ClientDisconnected:
            outcome = "client_disconnect"
        except asyncio.CancelledError:
            if not self._uncancel_interrupt():
                raise
            outcome = "client_disconnect" if self.client_gone else "upstream_error"
        finally:
            self._account(outcome)

    async def _serve(self) -> Outcome:
        try:
            route = self._route()
            body = await self._read_body()
        except ProxyError as exc:
            return await self._send_error_response(exc)
        accept = hdrs.get(self.scope["headers"], b"accept")
        self.wants_stream = wants_stream(self.api, self.path, accept, body)
        # From here on a watcher on receive() notices a client that leaves, whether the
        # upstream is still thinking about its headers or already streaming.
        async with asyncio.TaskGroup() as group:
            self.group = group
            watcher = group.create_task(self._watch_disconnect())
            try:
                return await self._open_and_relay(route, body)
            finally:
                watcher.cancel()

    async def _open_and_relay(self, route: Route, body: bytes) -> Outcome:
        try:
            if self._commits_early():
                response = await self._open_committing_early(route, body)
            else:
                response = await self._open_upstream(route, body)
        except ProxyError as exc:
            return await self._send_error_response(exc)
        return await self._relay(response)

    def _request_id(self) -> str:
        value: bytes | None = hdrs.get(self.scope["headers"], b"x-request-id")
        if value is not None and 0 < len(value) <= 128:
            return value.decode("latin-1")
        return os.urandom(12).hex()  # as unique as a uuid4 for this purpose, cheaper

    def _route(self) -> Route:
        if self.method == "CONNECT":
            raise MethodNotAllowed("CONNECT is not supported: this is a reverse proxy")
        route = self.app.routes.match(self.raw_path)
        self.upstream_name = route.upstream.name
        self.api = detect_api(self.path)
        return route

    async def _read_body(self) -> bytes:
        limit = self.app.max_body
        length = hdrs.get(self.scope["headers"], b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise BodyTooLarge(f"request body over the {limit}-byte limit")
        parts: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"request body over the {limit}-byte limit")
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    async def _open_upstream(self, route: Route, body: bytes) -> UpstreamResponse:
        self.model = request_model(self.api, self.path, body)
        client = self.scope.get("client")
        headers = hdrs.request_headers(
            self.scope["headers"], client[0] if client else None, self.scope["scheme"]
        )
        if route.credential is not None:
            headers = hdrs.with_credential(headers, route.credential)
        target = route.target(self.raw_path, self.scope["query_string"])
        return await self.app.pools[route.upstream.name].request(self.method, target, headers, body)

    # -- keepalive before the response headers (opt-in) -----------------------------

    def _commits_early(self) -> bool:
        keepalive = self.app.keepalive
        return keepalive.before_headers and keepalive.interval > 0 and self.wants_stream

    async def _open_committing_early(self, route: Route, body: bytes) -> UpstreamResponse:
        """Open the upstream request; if it has not answered within one keepalive
        interval, commit `200` with SSE headers and send comments until it does.

        The trade-off (README): once 200 is committed, an upstream error status can only
        reach the client as the contract's SSE error event."""
        assert self.group is not None
        opening = self.group.create_task(_outcome_of(self._open_upstream(route, body)))
        try:
            while not (await asyncio.wait({opening}, timeout=self.app.keepalive.interval))[0]:
                if not self.committed:
                    self.committed = True
                    self.status = 200
                    start = {"type": "http.response.start", "status": 200, "headers": EARLY_HEADERS}
                    await self.send(start)
                line = self.app.keepalive_line
                await self.send({"type": "http.response.body", "body": line, "more_body": True})
                self._count_keepalive()
        except asyncio.CancelledError:  # interrupted: the client left, or the drain ended it
            opening.cancel()
            if opening.done() and not opening.cancelled():
                result = opening.result()
                if isinstance(result, UpstreamResponse):
                    await result.aclose()
            raise
        result = opening.result()
        if isinstance(result, ProxyError):
            raise result
        return result

    async def _frame_upstream_error_status(self, response: UpstreamResponse) -> Outcome:
        """After an early commit, an upstream error status becomes the SSE error event."""
        body = b""
        with contextlib.suppress(UpstreamError):
            while len(body) <= 65536 and (chunk := await response.read()):  # never None:
                body += chunk  # no keepalive timer nudges this read
        error_type, message = describe_error_body(body)
        error = UpstreamError(f"upstream answered {response.status}: {message}")
        error.error_type = error_type
        self.error = error
        await self._send_error_frame(error, status=response.status)
        return "upstream_error"

    async def _send_error_frame(self, error: ProxyError, status: int | None = None) -> None:
        frame = sse_error_frame(error.error_type, error.message, status=status)
        await self.send({"type": "http.response.body", "body": frame, "more_body": True})

    # -- the response --------------------------------------------------------------

    async def _relay(self, response: UpstreamResponse) -> Outcome:
        self.upstream_answered = True
        try:
            headers, is_sse = hdrs.response_headers(response.headers)
            kind = body_kind(hdrs.get(headers, b"content-type"))
            self.observer = StreamObserver(self.api, kind, self.arrived, self._gap_recorder())
            identity = hdrs.get(headers, b"content-encoding") in (None, b"identity")
            self.status = response.status
            if self.committed:
                if self.status >= 400:
                    return await self._frame_upstream_error_status(response)
            else:
                start = {"type": "http.response.start", "status": self.status, "headers": headers}
                await self.send(start)
            # Bytes may be added only to an identity-encoded SSE body framed by chunks: a
            # comment inside gzip corrupts it, and past a Content-Length it is an error.
            insertable = is_sse and identity and hdrs.get(headers, b"content-length") is None
            keepalive = insertable and self.app.keepalive.interval > 0
            return await self._stream(response, keepalive, can_frame_error=insertable)
        finally:
            await response.aclose()

    async def _stream(
        self, response: UpstreamResponse, keepalive: bool, can_frame_error: bool
    ) -> Outcome:
        writer = Downstream(
            self.send,
            self.observer,
            self._count_keepalive,
            self.app.keepalive_line,
            self.app.keepalive.interval,
        )
        streamed = self.observer.kind != "none"
        if streamed:
            self.app.metrics.child("streams_active", self.upstream_name).inc()
        self.app.active.add(self)
        try:
            outcome = await self._run_pump(response, writer, keepalive)
        finally:
            self.app.active.discard(self)
            if streamed:
                self.app.metrics.child("streams_active", self.upstream_name).dec()
        if outcome in ("completed", "upstream_disconnect") and self.error is None:
            await response.aclose()  # back to the pool before the client sees the end
            self._account(outcome)  # so are the metrics
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})
        elif outcome != "client_disconnect" and can_frame_error and self.observer.at_event_boundary:
            await self._send_error_frame(self.error or UpstreamError("upstream failed"))
        # Otherwise return without `more_body: False`: uvicorn closes the connection
        # without the chunked terminator, so the client sees an incomplete body.
        return outcome

    async def _run_pump(
        self, response: UpstreamResponse, writer: Downstream, keepalive: bool
    ) -> Outcome:
        """Pump in this task, with the keepalive timer nudging it (and the disconnect
        watcher started by `_serve`).

        A client disconnect or a drain abort stops the pump the only way a pending read
        can be stopped: by cancelling this task (`_interrupt`). The flag set first says
        why, so a cancellation from anyone else still propagates."""
        timer = None
        if keepalive:
            loop = asyncio.get_running_loop()
            timer = KeepaliveTimer(writer, writer.interval, response.nudge, loop.call_later)
        try:
            return await self._pump(response, writer)
        except asyncio.CancelledError:
            if not self._uncancel_interrupt():
                raise
            return "client_disconnect" if self.client_gone else "upstream_error"
        finally:
            if timer is not None:
                timer.cancel()

    async def _pump(self, response: UpstreamResponse, writer: Downstream) -> Outcome:
        """Relay the body: one await per chunk, nothing read ahead."""
        read = response.read
        try:
            while (chunk := await read()) != b"":
                if chunk is None:  # nudged by the keepalive timer: the upstream is silent
                    await writer.write_keepalive()
                    continue
                if response.finished:  # the last piece: free the connection before the
                    await response.aclose()  # client can see the end and send again
                await writer.write(chunk)
        except UpstreamError as exc:
            self.error = exc
            return _failure_outcome(exc)
        self.observer.on_eof(clock())
        return self.observer.clean_end_outcome()

    async def _watch_disconnect(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.client_gone = True
                self._interrupt()
                return

    def abort(self, error: UpstreamError) -> None:
        """End this stream as an upstream failure (used by the drain on shutdown)."""
        if self.error is None:
            self.error = error
        self._interrupt()

    def _interrupt(self) -> None:
        if not self.interrupted and self.task is not None:
            self.interrupted = True
            self.task.cancel()

    def _uncancel_interrupt(self) -> bool:
        """Absorb the cancellation `_interrupt` caused (once); False if it was not ours."""
        if not self.interrupted or self.interrupt_absorbed or self.task is None:
            return False
        self.interrupt_absorbed = True
        self.task.uncancel()
        return True

    async def _send_error_response(self, exc: ProxyError) -> Outcome:
        self.error = exc
        if self.committed:  # 200 is on the wire: the error can only be an SSE event
            await self._send_error_frame(exc, status=exc.status)
            return _failure_outcome(exc)
        self.status = exc.status
        anthropic = self.api == "anthropic"
        body = json_error_body(exc, anthropic=anthropic)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode("ascii")),
        ]
        await self.send({"type": "http.response.start", "status": exc.status, "headers": headers})
        self._account(_failure_outcome(exc))  # counted before the client sees the end
        await self.send({"type": "http.response.body", "body": body, "more_body": False})
        return _failure_outcome(exc)

    # -- accounting ----------------------------------------------------------------

    def _gap_recorder(self) -> GapRecorder:
        model = self.app.metrics.model_label(self.model)
        self.gaps = GapRecorder(self.app.metrics.child("itl", self.upstream_name, model))
        return self.gaps

    def _count_keepalive(self) -> None:
        self.app.metrics.child("keepalives", self.upstream_name).inc()

    def _account(self, outcome: Outcome) -> None:
        """Record the exchange in metrics and the access log, once."""
        if self.accounted:
            return
        self.accounted = True
        if self.gaps is not None:
            self.gaps.flush()
        error = self.error
        if isinstance(error, UpstreamError):
            self.app.metrics.child("upstream_errors", self.upstream_name, error.reason).inc()
        # A stream request that failed before its response started still counts as a
        # stream, so failure rates include the streams that never began.
        streamed = self.observer.kind != "none" or (
            self.wants_stream and not self.upstream_answered
        )
        record = self.observer.finish(outcome, clock(), streamed=streamed)
        model = self.app.metrics.model_label(self.model)
        status = self.status or 499  # nginx's code for "client closed before the response"
        self.app.metrics.record(self.upstream_name, self.method, status, model, record)
        logs.access_line(
            method=self.method,
            path=self.path,
            upstream=self.upstream_name,
            model=model,
            status=status,
            record=record,
            error=None if self.error is None else self.error.message,
        )


EARLY_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


async def _outcome_of(opening: Awaitable[UpstreamResponse]) -> UpstreamResponse | ProxyError:
    """The response, or the ProxyError it raised (kept out of the TaskGroup's way)."""
    try:
        return await opening
    except ProxyError as exc:
        return exc


def _failure_outcome(error: ProxyError) -> Outcome:
    if isinstance(error, UpstreamTimeout):
        return "upstream_timeout"
    return "upstream_error" if isinstance(error, UpstreamError) else "completed"
