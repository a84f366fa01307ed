"""ProxyApp: the hot path. One `Exchange` per request, one `Pump` per response body.

Theory of operation
-------------------
Everything is a callback on one event loop; a task runs only for what must wait.

1. The request head is in (http1.py calls `ProxyApp.handle`). Route the raw path
   (longest `path_prefix`). If the body came along and an idle pooled upstream
   connection is at hand, the request goes upstream in this same call; a body still
   arriving, a new connection or the early commit take a task (`_open_slowly`).
   Failures before the response starts become a JSON error in the SDK's shape.
2. The upstream connection's read callback that completes the response head calls
   `head_received`: the response head goes out there, with any body bytes that came
   along, in one write. Then a `Pump` takes the body from inside that connection's
   read callbacks: each network read is written to the client at once (http1.py frames
   it) and only then observed (scanner, token timings). No task, future or queue per
   chunk, nor per request on the common path.
3. Backpressure: when the client's transport passes its high-water mark the pump stops
   reading the upstream, and resumes once the client has caught up, so a slow client
   holds at most the transports' buffers.
4. A client that leaves is reported from its connection's `connection_lost`: the pump,
   or the exchange waiting for the head, closes the upstream connection right there
   (a task waiting instead is cancelled, which closes it too).
5. Keepalive, for identity-encoded SSE: one TimerHandle per stream checks for silence
   and writes the comment itself. Every write is a callback on one event loop, so a
   comment can only land between two chunks, where the scanner (fed after each write)
   says whether a line ended.
6. End: a clean upstream EOF ends the body normally. Any failure (upstream error,
   timeout, drain abort) sends the contract's SSE error event if the stream stands at an
   event boundary, then closes the connection without the chunked terminator, so every
   client sees a broken stream.
7. Account exactly once (`_finish`): the observer's record goes to metrics and one
   access-log line, before the client sees the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Mapping
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
    UpstreamProtocolError,
    UpstreamTimeout,
    describe_error_body,
    json_error_body,
    sse_error_frame,
)
from streamproxy.http1 import Headers, Request, Response
from streamproxy.keepalive import SLACK, KeepaliveTimer, comment_line
from streamproxy.metrics import GapRecorder, Metrics
from streamproxy.observer import Outcome, StreamObserver, body_kind
from streamproxy.providers import Api, detect_api, request_model, wants_stream
from streamproxy.routing import Route, RouteTable
from streamproxy.upstream import UpstreamPool, UpstreamResponse

clock = time.monotonic
log = structlog.get_logger("streamproxy.relay")
# Request ids: 48 random bits per process, then a counter (24 hex digits, as unique as a
# uuid4 for telling requests apart in logs, and no getrandom() syscall per request).
_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count()


class ProxyApp:
    """Relays every request to its upstream: `handle` is the http1 server's handler."""

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
        self.tasks: set[asyncio.Task[None]] = set()  # the exchanges that had to wait
        self._idle: list[asyncio.Future[None]] = []  # wait_idle()'s

    def handle(self, request: Request, response: Response) -> None:
        """The http1 server's handler, called as the request head is in."""
        Exchange(self, request, response).start()

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def exchange_done(self, exchange: Exchange) -> None:
        self.active.discard(exchange)
        if not self.active:
            for waiter in self._idle:
                if not waiter.done():
                    waiter.set_result(None)
            self._idle.clear()

    async def wait_idle(self) -> None:
        """Return once no request is in flight."""
        if self.active:
            waiter = asyncio.get_running_loop().create_future()
            self._idle.append(waiter)
            await waiter

    def abort_all(self, message: str) -> int:
        """End every request in flight as an upstream failure (the drain timeout ran
        out): streams get the error event, requests still waiting for the upstream a 503."""
        exchanges = list(self.active)
        for exchange in exchanges:
            exchange.abort(ProxyShuttingDown(message))
        return len(exchanges)

    async def aclose(self, grace: float = 1.0) -> None:
        """Cancel the tasks still running (after `grace` seconds), close the pools."""
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=grace)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=grace)
        for pool in self.pools.values():
            await pool.aclose()


Ended = UpstreamError | ClientDisconnected | None  # how a pump's body ended; None: cleanly


class Pump:
    """Moves one response body from the upstream to the client, called by the upstream
    connection (`upstream.BodySink`). `on_done` is called once: with None for a clean end,
    else with what ended it (an UpstreamError, ProxyShuttingDown among them, or
    ClientDisconnected)."""

    __slots__ = (
        "ended",
        "interval",
        "last_write",
        "line",
        "observer",
        "observing",
        "on_done",
        "on_keepalive",
        "request_id",
        "response",
        "timer",
        "upstream",
    )

    def __init__(
        self,
        response: Response,
        upstream: UpstreamResponse,
        observer: StreamObserver,
        on_keepalive: Callable[[], None],
        on_done: Callable[[Ended], None],
        line: bytes,
        interval: float,
        request_id: str,
    ) -> None:
        self.response = response
        # Logged explicitly: the upstream connection's callbacks run in the context of
        # whichever request opened that (pooled) connection, not this one.
        self.request_id = request_id
        self.upstream = upstream
        self.observer = observer
        self.observing = True
        self.on_keepalive = on_keepalive
        self.line = line
        self.interval = interval
        self.last_write = clock()
        self.timer: KeepaliveTimer | None = None
        self.on_done = on_done
        self.ended = False

    # -- upstream.BodySink -----------------------------------------------------------

    def on_body(self, chunk: bytes) -> None:
        """Write one upstream read to the client, then observe it."""
        self.response.write(chunk)
        self.last_write = now = clock()
        self.observe(chunk, now)

    def on_end(self) -> None:
        self._finish(None)

    def on_error(self, error: UpstreamError) -> None:
        self._finish(error)

    # -- the rest --------------------------------------------------------------------

    def observe(self, chunk: bytes, now: float) -> None:
        """Observe a chunk already written to the client."""
        if not self.observing:
            return
        try:
            self.observer.on_chunk(chunk, now)
        except Exception as exc:  # a bug in the metrics must not break the user's stream
            self.observing = False  # the scanners' state is unknown now: no more comments
            log.error(
                "stream observer failed; relaying on unobserved",
                request_id=self.request_id,
                traceback="".join(traceback.format_exception(exc)),
            )

    def start_keepalive(self) -> None:
        loop = asyncio.get_running_loop()
        self.timer = KeepaliveTimer(self, self.interval, self.send_keepalive, loop.call_later)

    def send_keepalive(self) -> None:
        """The timer's call: a comment if the stream is still silent, the client keeps
        up, and the upstream stream stands at a line boundary (otherwise the timer asks
        again one interval later)."""
        if clock() - self.last_write < self.interval - SLACK:
            return  # a chunk went out since the timer fired
        if self.response.paused or not self.observing or not self.observer.at_line_boundary:
            return
        self.response.write(self.line)
        self.last_write = clock()
        self.on_keepalive()

    def pause_writing(self) -> None:
        self.upstream.pause()

    def resume_writing(self) -> None:
        self.upstream.resume()

    def stop(self, reason: UpstreamError | ClientDisconnected) -> None:
        """End the stream now (the client left, or the drain ran out): the upstream
        connection is closed in this very call."""
        self.upstream.close()
        self._finish(reason)

    def stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _finish(self, result: Ended) -> None:
        self.stop_timer()
        if not self.ended:
            self.ended = True
            self.on_done(result)


class Exchange:
    """One request and its response, driven by callbacks: `start` when the request head
    is in, the upstream connection's `head_received`/`head_failed`, the pump's end, and
    the client connection's (http1.ResponseListener). A task runs only what must wait: a
    request body still arriving, a new upstream connection, the early commit. State flags
    are explicit, as in uvicorn's RequestResponseCycle; the outcome is decided once, by
    `_finish()`."""

    __slots__ = (
        "accounted",
        "api",
        "app",
        "arrived",
        "body",
        "can_frame_error",
        "client_left",
        "committed",
        "error",
        "finished",
        "gaps",
        "head_failure",
        "interrupted",
        "method",
        "model",
        "observer",
        "path",
        "pump",
        "request",
        "request_id",
        "response",
        "route",
        "status",
        "streaming",
        "task",
        "upstream",
        "upstream_answered",
        "upstream_name",
        "wants_stream",
    )

    def __init__(self, app: ProxyApp, request: Request, response: Response) -> None:
        self.app = app
        self.request = request
        self.response = response
        response.listener = self
        self.arrived = clock()
        self.method = request.method
        self.path = request.path
        self.upstream_name = "none"
        self.api: Api = "unknown"
        self.model: str | None = None
        self.status = 0
        self.observer: StreamObserver | None = None  # once the response starts
        self.pump: Pump | None = None
        self.request_id = ""
        self.error: ProxyError | None = None
        self.client_left = False
        self.interrupted = False  # this exchange's task was cancelled by _interrupt()
        self.accounted = False
        self.finished = False
        self.wants_stream = False
        self.upstream_answered = False
        self.committed = False  # 200 + SSE headers sent before the upstream answered
        self.can_frame_error = False  # a failure mid-body can be sent as an SSE error event
        self.streaming = False  # counted in streams_active
        self.head_failure: Exception | None = None  # a bug in head_received, for the task
        self.task: asyncio.Task[None] | None = None  # while one runs for this exchange
        self.gaps: GapRecorder | None = None  # inter-token gaps, flushed to the ITL histogram
        # Sent without a task, waiting for the head: kept for a retry on a new connection.
        self.route: Route | None = None
        self.body = b""
        self.upstream: UpstreamResponse | None = None

    # -- the request ---------------------------------------------------------------

    def start(self) -> None:
        """The request head is in (and its body, if it came along). A request whose body
        is all here goes upstream in this call on an idle pooled connection: no task, no
        loop turn before it is sent."""
        self.request_id = self._request_id()
        self.app.active.add(self)
        request = self.request
        try:
            route = self._route()
            self._check_length()
            if not request.body_settled or request.expect_continue:
                self._spawn(self._open_slowly(route))
                return
            body = request.take_body()
        except ProxyError as exc:
            self._finish(self._answer_error(exc))
            return
        try:
            self._send_now(route, body)
        except Exception as exc:  # a bug: nothing above this callback would end the exchange
            self._finish(self._fail_on_bug(exc))

    def _send_now(self, route: Route, body: bytes) -> None:
        self.wants_stream = self._wants_stream(body)
        if self._commits_early():
            self.model = request_model(self.api, self.path, body)
            self._spawn(self._open_slowly(route, body))
            return
        self.route, self.body = route, body
        pool = self.app.pools[route.upstream.name]
        target, headers = self._upstream_request(route, body)
        self.upstream = pool.send(self.method, target, headers, body, self)
        self.model = request_model(self.api, self.path, body)  # not needed to send it
        if self.upstream is None:  # no idle connection: connecting takes a task
            self._retry_on_new_connection()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        self.task = task = self.app.spawn(coroutine)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        # A cancelled task ends here: interrupted (the client left, or the drain ended
        # it before the response began), or at shutdown; perhaps before it even began.
        if self.task is task:
            self.task = None
        if self.finished or not task.cancelled():
            return
        if self.client_left:
            self._finish("client_disconnect")
        elif self.error is not None:
            self._finish(self._answer_error(self.error))
        else:
            self._finish("upstream_error")

    async def _open_slowly(self, route: Route, body: bytes | None = None) -> None:
        """The task for whatever must wait before the request can go upstream: its body,
        a new connection, or the early commit's keepalive comments."""
        structlog.contextvars.bind_contextvars(request_id=self.request_id)
        try:
            outcome = await self._open_and_relay(route, body)
        except ClientDisconnected:
            outcome = "client_disconnect"
        except Exception as exc:  # a bug must not leave the client hanging
            outcome = self._fail_on_bug(exc)
        finally:
            self.task = None
        if outcome is not None:  # else the pump runs: its end finishes the exchange
            self._finish(outcome)

    async def _open_and_relay(self, route: Route, body: bytes | None) -> Outcome | None:
        try:
            if body is None:
                body = await self.request.read_body()
                self.wants_stream = self._wants_stream(body)
                self.model = request_model(self.api, self.path, body)
            if self._commits_early():
                upstream = await self._open_committing_early(route, body)
            else:
                upstream = await self._open_upstream(route, body)
        except ProxyError as exc:
            return self._send_error_response(exc)
        return await self._relay(upstream)

    def _retry_on_new_connection(self) -> None:
        route, body = self.route, self.body
        assert route is not None
        self._drop_upstream()
        self._spawn(self._open_slowly(route, body))

    def _drop_upstream(self) -> None:
        """Stop waiting for a head without a task: that upstream request is over."""
        if self.upstream is not None:
            self.upstream.close()
        self.route, self.body, self.upstream = None, b"", None

    def _request_id(self) -> str:
        value: bytes | None = hdrs.get(self.request.headers, b"x-request-id")
        if value is not None and 0 < len(value) <= 128:
            return value.decode("latin-1")
        return f"{_ID_PREFIX}{next(_ID_COUNTER):012x}"

    def _route(self) -> Route:
        if self.method == "CONNECT":
            raise MethodNotAllowed("CONNECT is not supported: this is a reverse proxy")
        route = self.app.routes.match(self.request.raw_path)
        self.upstream_name = route.upstream.name
        self.api = detect_api(self.path)
        return route

    def _check_length(self) -> None:
        limit = self.app.max_body
        length = hdrs.get(self.request.headers, b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise BodyTooLarge(f"request body over the {limit}-byte limit")

    def _wants_stream(self, body: bytes) -> bool:
        accept = hdrs.get(self.request.headers, b"accept")
        return wants_stream(self.api, self.path, accept, body)

    def _upstream_request(self, route: Route, body: bytes) -> tuple[bytes, Headers]:
        request = self.request
        headers = hdrs.request_headers(request.headers, request.client, "http")
        if self._commits_early():
            # Once 200 and SSE headers are committed, an encoded body has nowhere to say
            # so: ask for an identity one.
            headers = [(name, value) for name, value in headers if name != b"accept-encoding"]
        if route.credential is not None:
            headers = hdrs.with_credential(headers, route.credential)
        return route.target(request.raw_path, request.query), headers

    async def _open_upstream(self, route: Route, body: bytes) -> UpstreamResponse:
        target, headers = self._upstream_request(route, body)
        pool = self.app.pools[route.upstream.name]
        listener = None if self._commits_early() else self
        return await pool.request(self.method, target, headers, body, listener)

    # -- upstream.HeadListener --------------------------------------------------------

    def head_received(self, upstream: UpstreamResponse) -> None:
        """The response head is in: the client's response starts in this very read
        callback (under load, a turn of the loop is milliseconds of TTFB)."""
        self.route, self.body, self.upstream = None, b"", None
        if self.client_left or self.interrupted or self.finished:
            upstream.close()
            return  # cancelled, the task ends the exchange
        try:
            self._start_relay(upstream)
        except Exception as exc:
            upstream.close()
            if self.task is None:
                self._finish(self._fail_on_bug(exc))
            else:  # the task waiting for this head raises it
                self.head_failure = exc

    def head_failed(self, error: UpstreamError, retryable: bool) -> None:
        """Sent without a task, the request failed before any head."""
        if retryable:
            self._retry_on_new_connection()
            return
        self._drop_upstream()
        self._finish(self._answer_error(error))

    # -- http1.ResponseListener -----------------------------------------------------

    def client_gone(self) -> None:
        self.client_left = True
        if self.pump is not None:
            self.pump.stop(ClientDisconnected())
        elif self.task is not None:
            self._interrupt()
        elif self.upstream is not None:  # waiting for the head: _finish ends that request
            self._finish("client_disconnect")

    def pause_writing(self) -> None:
        if self.pump is not None:
            self.pump.pause_writing()

    def resume_writing(self) -> None:
        if self.pump is not None:
            self.pump.resume_writing()

    # -- keepalive before the response headers (opt-in) -----------------------------

    def _commits_early(self) -> bool:
        keepalive = self.app.keepalive
        return keepalive.before_headers and keepalive.interval > 0 and self.wants_stream

    async def _open_committing_early(self, route: Route, body: bytes) -> UpstreamResponse:
        """Open the upstream request; if it has not answered within one keepalive
        interval, commit `200` with SSE headers and send comments until it does.

        The trade-off (README): once 200 is committed, an upstream error status can only
        reach the client as the contract's SSE error event."""
        async with asyncio.TaskGroup() as group:
            opening = group.create_task(_outcome_of(self._open_upstream(route, body)))
            try:
                while not (await asyncio.wait({opening}, timeout=self.app.keepalive.interval))[0]:
                    if not self.committed:
                        self.committed = True
                        self.status = 200
                        self.response.start(200, EARLY_HEADERS)
                    self.response.write(self.app.keepalive_line)
                    self._count_keepalive()
            except asyncio.CancelledError:  # interrupted: the client left, or the drain ended it
                opening.cancel()
                if opening.done() and not opening.cancelled():
                    result = opening.result()
                    if isinstance(result, UpstreamResponse):
                        result.close()
                raise
        result = opening.result()
        if isinstance(result, ProxyError):
            raise result
        return result

    async def _frame_upstream_error_status(self, upstream: UpstreamResponse) -> Outcome:
        """After an early commit, an upstream error status becomes the SSE error event."""
        body = b""
        try:
            while len(body) <= 65536 and (chunk := await upstream.read()):
                body += chunk
        except UpstreamError as exc:  # the body is only for the message: keep what came
            exc.__traceback__ = None  # it stays on the connection: no frame cycle
        error_type, message = describe_error_body(body)
        error = UpstreamError(f"upstream answered {upstream.status}: {message}")
        error.error_type = error_type
        self.error = error
        self.response.write(sse_error_frame(error_type, error.message, status=upstream.status))
        self._account("upstream_error")  # counted before the client sees the end
        self.response.abort()
        return "upstream_error"

    # -- the response --------------------------------------------------------------

    async def _relay(self, upstream: UpstreamResponse) -> Outcome | None:
        """The task's part once the head is in (None: the pump runs, and its end finishes
        the exchange). Usually `head_received` has started the relay already."""
        if self.head_failure is not None:  # head_received closed the upstream already
            raise self.head_failure.with_traceback(None)
        if self.upstream_answered:  # by head_received: the pump runs, or has ended
            return None
        try:
            if self.committed:  # the client has its 200 already: that is its status
                if upstream.status >= 400:
                    return await self._frame_upstream_error_status(upstream)
                encoding = hdrs.get(upstream.headers, b"content-encoding")
                if encoding not in (None, b"identity"):
                    return self._send_error_response(
                        UpstreamProtocolError("upstream sent an encoded body after the early 200")
                    )
            self._start_relay(upstream)
        finally:
            if self.pump is None:
                upstream.close()
        return None

    def _start_relay(self, upstream: UpstreamResponse) -> None:
        """Send the response head with the body bytes that came along, in one write, and
        attach the pump that relays the rest (made after the write: the client's first
        byte waits for nothing it does not need)."""
        self.upstream_answered = True
        headers, is_sse = hdrs.response_headers(upstream.headers)
        first = upstream.take_buffered()
        if self.committed:
            self.response.write(first)
        else:
            self.status = upstream.status
            self.response.start(self.status, headers, first)
        # A response without a body (HEAD, 204, 304) is no stream, whatever its type says.
        bodyless = self.method == "HEAD" or upstream.status in (204, 304)
        kind = "none" if bodyless else body_kind(hdrs.get(headers, b"content-type"))
        self.observer = observer = StreamObserver(
            self.api, kind, self.arrived, self._gap_recorder().add
        )
        # Bytes may be added only to an identity-encoded SSE body framed by chunks: a
        # comment inside gzip corrupts it, and past a Content-Length it is an error.
        identity = hdrs.get(headers, b"content-encoding") in (None, b"identity")
        insertable = is_sse and identity and hdrs.get(headers, b"content-length") is None
        self.can_frame_error = insertable
        keepalive = self.app.keepalive
        pump = Pump(
            self.response,
            upstream,
            observer,
            self._count_keepalive,
            self._body_ended,
            self.app.keepalive_line,
            keepalive.interval,
            self.request_id,
        )
        if first:
            pump.observe(first, pump.last_write)
        if kind != "none":
            self.streaming = True
            self.app.metrics.child("streams_active", self.upstream_name).inc()
        self.pump = pump
        upstream.attach(pump)  # the body may be complete already: then it has ended too
        if pump.ended:
            return
        if self.response.paused:  # the client fell behind before the pump existed
            pump.pause_writing()
        if insertable and keepalive.interval > 0:
            pump.start_keepalive()

    def _body_ended(self, ended: Ended) -> None:
        """The pump's end (a clean one, or what ended it)."""
        pump = self.pump
        assert pump is not None
        if self.streaming:
            self.streaming = False
            self.app.metrics.child("streams_active", self.upstream_name).dec()
        try:
            outcome = self._end_stream(pump, ended, self.can_frame_error)
        except Exception as exc:  # raised in a read callback: nobody else would finish it
            outcome = self._fail_on_bug(exc)
        pump.upstream.close()
        self._finish(outcome)

    def _end_stream(self, pump: Pump, ended: Ended, can_frame_error: bool) -> Outcome:
        observer = pump.observer
        if ended is None:
            if pump.observing:
                observer.on_eof(clock())
            outcome = observer.clean_end_outcome()
            pump.upstream.close()  # back to the pool before the client can send again
            self._account(outcome)  # counted before the client sees the end
            self.response.end()
            return outcome
        if isinstance(ended, ClientDisconnected):
            self.response.abort()
            return "client_disconnect"
        self.error = ended
        if can_frame_error and pump.observing and observer.at_event_boundary:
            self.response.write(sse_error_frame(ended.error_type, ended.message))
        outcome = _failure_outcome(ended)
        self._account(outcome)  # counted before the client sees the end
        # No chunked terminator: the client sees an incomplete body.
        self.response.abort()
        return outcome

    def abort(self, error: UpstreamError) -> None:
        """End this stream as an upstream failure (used by the drain on shutdown)."""
        if self.finished:
            return
        if self.pump is not None:
            self.pump.stop(error)
            return
        if self.error is None:
            self.error = error
        if self.task is not None:
            self._interrupt()
        elif self.upstream is not None:  # waiting for the head: _finish ends that request
            self._finish(self._answer_error(error))

    def _interrupt(self) -> None:
        if not self.interrupted and self.task is not None:
            self.interrupted = True
            self.task.cancel()

    def _send_error_response(self, exc: ProxyError) -> Outcome:
        # Kept without its traceback: its frames hold this exchange (and the request
        # body), a reference cycle only the cyclic GC would free.
        self.error = exc.with_traceback(None)
        outcome = _failure_outcome(exc)
        if self.committed:  # 200 is on the wire: the error can only be an SSE event
            self.response.write(sse_error_frame(exc.error_type, exc.message, status=exc.status))
            self._account(outcome)  # counted before the client sees the end
            self.response.abort()
            return outcome
        self.status = exc.status
        body = json_error_body(exc, anthropic=self.api == "anthropic")
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode("ascii")),
        ]
        self._account(outcome)  # counted before the client sees the answer
        self.response.start(exc.status, headers, body)
        self.response.end()
        return outcome

    def _answer_error(self, exc: ProxyError) -> Outcome:
        """`_send_error_response` from a callback, where nothing above would catch a bug
        (a log stream that broke, say): the exchange must still end."""
        try:
            return self._send_error_response(exc)
        except Exception as bug:
            return self._fail_on_bug(bug)

    def _fail_on_bug(self, exc: Exception) -> Outcome:
        """A bug in the relay: logged, and the client gets a 500 or a cut stream."""
        log.error(
            "request failed",
            request_id=self.request_id,
            error=repr(exc),
            traceback="".join(traceback.format_exception(exc)),
        )
        if not self.response.started and not self.client_left:
            self.status = 500
            with contextlib.suppress(Exception):  # the access log itself may be what failed
                self._account("upstream_error")
            self.response.start(500, [(b"content-length", b"0")])
            self.response.end()
        return "upstream_error"

    def _finish(self, outcome: Outcome) -> None:
        """The exchange is over: account it (once), cut a response nobody ended, and
        break the reference cycles (response <-> listener, pump <-> its callbacks), so
        that refcounting frees the whole exchange at once, without the cyclic GC."""
        if self.finished:
            return
        self.finished = True
        try:
            self._account(outcome)
        finally:
            self.response.abort()  # a no-op after end()
            self.response.listener = None
            self.pump = None
            self._drop_upstream()  # still waiting for a head: that request ends too
            self.app.exchange_done(self)

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
        observer = self.observer or StreamObserver("unknown", "none", self.arrived)
        streamed = observer.kind != "none" or (self.wants_stream and not self.upstream_answered)
        record = observer.finish(outcome, clock(), streamed=streamed)
        model = self.app.metrics.model_label(self.model)
        status = self.status or 499  # nginx's code for "client closed before the response"
        self.app.metrics.record(self.upstream_name, self.method, status, model, record)
        logs.access_line(
            request_id=self.request_id,
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
