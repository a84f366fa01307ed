"""ProxyApp: the hot path. One `Exchange` per request, one `Pump` per response body.

Theory of operation
-------------------
1. Route the raw path (longest `path_prefix`), read the request body up to the limit,
   send it upstream (upstream.py) and wait for the response head. Failures before the
   response starts become a JSON error in the SDK's shape (502/504/4xx).
2. Send the response head, with any body bytes that came along with it, in one write.
   Then a `Pump` takes the body from inside the upstream connection's read callback:
   each network read is written to the client at once (http1.py frames it) and only
   then observed (scanner, token timings). No task, future or queue per chunk: the
   exchange's task sleeps on one future until the body ends.
3. Backpressure: when the client's transport passes its high-water mark the pump stops
   reading the upstream, and resumes once the client has caught up, so a slow client
   holds at most the transports' buffers.
4. A client that leaves is reported from its connection's `connection_lost`: the pump
   closes the upstream connection right there. Before the response starts, the
   exchange's task is cancelled instead, which closes the upstream connection too.
5. Keepalive, for identity-encoded SSE: one TimerHandle per stream checks for silence
   and writes the comment itself. Every write is a callback on one event loop, so a
   comment can only land between two chunks, where the scanner (fed after each write)
   says whether a line ended.
6. End: a clean upstream EOF ends the body normally. Any failure (upstream error,
   timeout, drain abort) sends the contract's SSE error event if the stream stands at an
   event boundary, then closes the connection without the chunked terminator, so every
   client sees a broken stream.
7. Account exactly once: the observer's record goes to metrics and one access-log line,
   before the client sees the end.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping

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
from streamproxy.http1 import Request, Response
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

    async def handle(self, request: Request, response: Response) -> None:
        await Exchange(self, request, response).run()

    def abort_all(self, message: str) -> int:
        """End every request in flight as an upstream failure (the drain timeout ran
        out): streams get the error event, requests still waiting for the upstream a 503."""
        exchanges = list(self.active)
        for exchange in exchanges:
            exchange.abort(ProxyShuttingDown(message))
        return len(exchanges)

    async def aclose(self) -> None:
        for pool in self.pools.values():
            await pool.aclose()


Ended = UpstreamError | ClientDisconnected | None  # how a pump's body ended; None: cleanly


class Pump:
    """Moves one response body from the upstream to the client, called by the upstream
    connection (`upstream.BodySink`). `done` resolves once: None for a clean end, else
    what ended it (an UpstreamError, ProxyShuttingDown among them, or ClientDisconnected)."""

    __slots__ = (
        "done",
        "interval",
        "last_write",
        "line",
        "observer",
        "observing",
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
        self.done: asyncio.Future[Ended] = asyncio.get_running_loop().create_future()

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
        if not self.done.done():
            self.done.set_result(result)


class Exchange:
    """One request and its response. State flags are explicit, as in uvicorn's
    RequestResponseCycle; the outcome is decided once, by `_account()`. It is also the
    response's listener (http1.ResponseListener): client gone, writing paused, resumed."""

    __slots__ = (
        "accounted",
        "api",
        "app",
        "arrived",
        "can_frame_error",
        "client_left",
        "committed",
        "error",
        "gaps",
        "head_failure",
        "interrupt_absorbed",
        "interrupted",
        "method",
        "model",
        "observer",
        "path",
        "pump",
        "request",
        "request_id",
        "response",
        "status",
        "task",
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
        self.observer = StreamObserver("unknown", "none", self.arrived)
        self.pump: Pump | None = None
        self.request_id = ""
        self.error: ProxyError | None = None
        self.client_left = False
        self.interrupted = False  # this exchange's task was cancelled by _interrupt()
        self.interrupt_absorbed = False
        self.accounted = False
        self.wants_stream = False
        self.upstream_answered = False
        self.committed = False  # 200 + SSE headers sent before the upstream answered
        self.can_frame_error = False  # a failure mid-body can be sent as an SSE error event
        self.head_failure: Exception | None = None  # a bug in `_on_upstream_head`
        self.task: asyncio.Task[object] | None = None  # the task running this exchange
        self.gaps: GapRecorder | None = None  # inter-token gaps, flushed to the ITL histogram

    # -- the request ---------------------------------------------------------------

    async def run(self) -> None:
        self.request_id = self._request_id()
        structlog.contextvars.bind_contextvars(request_id=self.request_id)
        self.task = asyncio.current_task()
        self.app.active.add(self)
        outcome: Outcome = "upstream_error"  # if anything unforeseen escapes below
        try:
            outcome = await self._serve()
        except ClientDisconnected:
            outcome = "client_disconnect"
        except asyncio.CancelledError:
            if not self._uncancel_interrupt():
                raise
            if self.client_left:
                outcome = "client_disconnect"
            elif self.error is not None:  # the drain ended it before the response began
                outcome = self._send_error_response(self.error)
        finally:
            self.app.active.discard(self)
            self._account(outcome)
            # Break the reference cycles (response <-> listener, pump <-> its callbacks):
            # refcounting then frees the whole exchange at once, without the cyclic GC,
            # whose pauses grow with the garbage it has to find.
            self.response.listener = None
            self.pump = None
            self.task = None

    async def _serve(self) -> Outcome:
        try:
            route = self._route()
            body = await self._read_body()
        except ProxyError as exc:
            return self._send_error_response(exc)
        accept = hdrs.get(self.request.headers, b"accept")
        self.wants_stream = wants_stream(self.api, self.path, accept, body)
        try:
            if self._commits_early():
                upstream = await self._open_committing_early(route, body)
            else:
                upstream = await self._open_upstream(route, body)
        except ProxyError as exc:
            return self._send_error_response(exc)
        return await self._relay(upstream)

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

    async def _read_body(self) -> bytes:
        limit = self.app.max_body
        length = hdrs.get(self.request.headers, b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise BodyTooLarge(f"request body over the {limit}-byte limit")
        return await self.request.read_body()

    async def _open_upstream(self, route: Route, body: bytes) -> UpstreamResponse:
        self.model = request_model(self.api, self.path, body)
        request = self.request
        headers = hdrs.request_headers(request.headers, request.client, "http")
        if self._commits_early():
            # Once 200 and SSE headers are committed, an encoded body has nowhere to say
            # so: ask for an identity one.
            headers = [(name, value) for name, value in headers if name != b"accept-encoding"]
        if route.credential is not None:
            headers = hdrs.with_credential(headers, route.credential)
        target = route.target(request.raw_path, request.query)
        pool = self.app.pools[route.upstream.name]
        on_head = None if self._commits_early() else self._on_upstream_head
        return await pool.request(self.method, target, headers, body, on_head)

    def _on_upstream_head(self, upstream: UpstreamResponse) -> None:
        """The upstream connection's call when the response head is in: the client's
        response starts in that same read callback, not a loop turn later when this
        exchange's task wakes (under load, a turn of the loop is milliseconds of TTFB)."""
        if self.client_left or self.interrupted:
            return  # the task, cancelled, ends the exchange
        try:
            self._start_relay(upstream)
        except Exception as exc:  # a bug: raised again in the task (http1 answers 500)
            self.head_failure = exc

    # -- http1.ResponseListener -----------------------------------------------------

    def client_gone(self) -> None:
        self.client_left = True
        if self.pump is not None:
            self.pump.stop(ClientDisconnected())
        else:
            self._interrupt()

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

    async def _relay(self, upstream: UpstreamResponse) -> Outcome:
        try:
            if self.head_failure is not None:
                raise self.head_failure.with_traceback(None)
            if self.pump is None:  # not started from the head's callback
                if self.committed:  # the client has its 200 already: that is its status
                    if upstream.status >= 400:
                        return await self._frame_upstream_error_status(upstream)
                    encoding = hdrs.get(upstream.headers, b"content-encoding")
                    if encoding not in (None, b"identity"):
                        return self._send_error_response(
                            UpstreamProtocolError(
                                "upstream sent an encoded body after the early 200"
                            )
                        )
                self._start_relay(upstream)
            return await self._stream()
        finally:
            upstream.close()

    def _start_relay(self, upstream: UpstreamResponse) -> None:
        """Send the response head with the body bytes that came along, in one write, and
        attach the pump that relays the rest."""
        self.upstream_answered = True
        headers, is_sse = hdrs.response_headers(upstream.headers)
        kind = body_kind(hdrs.get(headers, b"content-type"))
        self.observer = observer = StreamObserver(
            self.api, kind, self.arrived, self._gap_recorder().add
        )
        if not self.committed:
            self.status = upstream.status
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
            self.app.keepalive_line,
            keepalive.interval,
            self.request_id,
        )
        first = upstream.take_buffered()
        if self.committed:
            self.response.write(first)
        else:
            self.response.start(self.status, headers, first)
        if first:
            pump.last_write = now = clock()
            pump.observe(first, now)
        self.pump = pump
        upstream.attach(pump)  # the body may already be complete: then `done` is too
        if self.response.paused:  # the client fell behind before the pump existed
            pump.pause_writing()
        if insertable and keepalive.interval > 0 and not pump.done.done():
            pump.start_keepalive()

    async def _stream(self) -> Outcome:
        pump = self.pump
        assert pump is not None
        streamed = self.observer.kind != "none"
        active = self.app.metrics.child("streams_active", self.upstream_name)
        if streamed:
            active.inc()
        try:
            ended = await pump.done
        finally:
            pump.stop_timer()
            if streamed:
                active.dec()
        return self._end_stream(pump, ended, self.can_frame_error)

    def _end_stream(self, pump: Pump, ended: Ended, can_frame_error: bool) -> Outcome:
        observer = self.observer
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
        if self.pump is not None:
            self.pump.stop(error)
            return
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
