"""A simulated LLM API for the demo, the tests and the benchmarks (`streamproxy mock-upstream`).

Routes (request JSON: `model` is echoed back, `stream` picks streaming; other fields ignored):

  POST /v1/chat/completions       OpenAI chat: `chat.completion.chunk` SSE ending in `[DONE]`
  POST /v1/completions            OpenAI legacy completions: `text_completion` SSE
  POST /v1/responses              OpenAI Responses API: typed SSE, ends with response.completed
  POST /v1/messages               Anthropic Messages: message_start ... message_stop
  POST /v1beta/models/M:streamGenerateContent
                                  Gemini: SSE with `?alt=sse`, else a progressively written array
  POST /v1beta/models/M:generateContent   Gemini, one JSON object
  POST /api/chat, /api/generate   Ollama NDJSON (streams unless `"stream": false`)
  GET  /v1/models                 a model list
  ANY  /echo/...                  JSON: method, path, raw_path, query, headers (as received), body
  POST /mock/script               byte-exact replay: {"status", "headers": [[k, v]...],
                                  "chunks": [{"b64", "delay"}...], "end": "complete" | "abort"};
                                  each chunk is one write after `delay` seconds

Knobs are request headers; all are optional and a bad or unknown one gets a 400 naming it.
Times are seconds on one absolute timeline from the start of the body: content event i is
sent at `ttft + i * interval`, later by `stall` once the stall has happened.

  x-mock-ttft           0.05   delay before the first content event
  x-mock-tokens         16     number of content events; the text is expected_text(tokens)
  x-mock-interval       0.02   gap between content events
  x-mock-role-chunk     1      OpenAI chat: send the role-only chunk at once, before ttft
                               (the Anthropic and Responses preambles are always sent at once;
                               Gemini, Ollama and legacy completions have none)
  x-mock-stall          0      pause this long once, after `stall-after` content events
  x-mock-stall-after    tokens // 2
  x-mock-stall-mode     event  event: the pause falls between events
                               line: write half of the next event (cut inside its data line),
                                     pause, then write the rest
                               first: the pause comes before the first content event (ttft + stall)
  x-mock-abort-after    -      after this many content events, close the connection without
                               the chunked terminator, when the next event would be due (or at
                               the end, if nothing follows)
  x-mock-abort-mode     event  event: at an event boundary; line: after half of the next event
                               (stall-after and abort-after past the stream's content events: 400)
  x-mock-status         -      answer at once (after headers-delay) with this status (400-599)
                               and the provider's error JSON (429 rate_limit_error,
                               529 overloaded_error, 500 api_error/server_error, ...)
  x-mock-headers-delay  0      sleep before sending the status line and headers
  x-mock-line-ending    lf     lf | crlf | cr, for every SSE line (NDJSON always uses lf)
  x-mock-gzip           0      gzip the body (Content-Encoding: gzip), flushed per event
  x-mock-chunk-size     -      split each event into writes of at most this many bytes
  x-mock-id             0      add an `id: <n>` line (n = 1, 2, ...) to every SSE event
  x-mock-usage          0      OpenAI chat/completions: send the usage chunk (also when the body
                               has stream_options.include_usage); the others always report usage
  x-mock-kind           text   text | reasoning | tool: what each content event carries
                               (tool arguments are expected_arguments(tokens); Gemini and Ollama
                               send one whole function call instead of deltas)

A non-streamed answer is sent whole after headers-delay + ttft; of the other knobs it honours
tokens, kind, status and gzip. Every streamed event is one write on the wire (one HTTP chunk)
unless x-mock-chunk-size splits it. Reported prompt/input tokens are the request body's length
divided by 4. A client that disconnects stops its stream at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import logging
import re
import secrets
import time
import zlib
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from streamproxy import mock_shapes as shapes
from streamproxy.mock_shapes import (
    Api,
    Event,
    KnobError,
    Knobs,
    RequestInfo,
    expected_arguments,
    expected_text,
)

__all__ = ["MockAbort", "create_app", "expected_arguments", "expected_text", "serve"]

MODELS = ("mock-gpt", "mock-claude", "mock-gemini", "mock-llama")


class MockAbort(Exception):
    """Ends a started response without its terminator; uvicorn then closes the connection.

    uvicorn logs the exception it catches on `uvicorn.error`; `_HideMockAbort` drops exactly
    those records, so a deliberate abort prints nothing while real errors still do.
    """


class _HideMockAbort(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], MockAbort))


_LOG_FILTER = _HideMockAbort()


class _Reject(Exception):
    """A request the mock refuses before answering: status and message for the error body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# --- the streaming machinery ---------------------------------------------------------------------


class _Writer:
    """Body writes: optional splitting into small sends and per-write gzip sync flushes."""

    def __init__(self, send: Send, chunk_size: int | None, gzip: bool) -> None:
        self._send = send
        self._size = chunk_size
        self._gzip = zlib.compressobj(wbits=31) if gzip else None  # 31: gzip container

    async def write(self, data: bytes) -> None:
        size = self._size or len(data) or 1
        for at in range(0, len(data), size):
            piece = data[at : at + size]
            if self._gzip is not None:
                piece = self._gzip.compress(piece) + self._gzip.flush(zlib.Z_SYNC_FLUSH)
            await self._send({"type": "http.response.body", "body": piece, "more_body": True})

    async def finish(self) -> None:
        tail = self._gzip.flush() if self._gzip is not None else b""
        await self._send({"type": "http.response.body", "body": tail, "more_body": False})


_DATA_LINE = re.compile(rb"data:[^\r\n]*")


def _cut(frame: bytes) -> int:
    """Where to split an event for the `line` modes: the middle of its data line."""
    match = _DATA_LINE.search(frame)
    if match is None:
        return max(1, len(frame) // 2)
    return (match.start() + match.end()) // 2


async def _play(
    writer: _Writer,
    events: Iterator[Event],
    knobs: Knobs,
    stall_at: int | None,
    abort_at: int | None,
) -> bool:
    """Send the events on their timeline; return True when the stream must abort.

    The stall and the abort both happen at the first non-preamble event that follows
    `stall_at` / `abort_at` content events (or at the end of the stream if none follows).
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    shift = 0.0  # the stall, once it has happened
    seen = 0  # content events written

    async def until(offset: float) -> None:
        # Always yields: uvicorn's send() does not while the socket keeps up, so a fast
        # stream would otherwise hold the event loop until it ended.
        await asyncio.sleep(max(0.0, start + offset + shift - loop.time()))

    for phase, frame in events:
        if phase == "pre":
            offset = 0.0
        elif phase == "content":
            offset = knobs.ttft + seen * knobs.interval
        else:  # right after the last content event
            offset = knobs.ttft + max(seen - 1, 0) * knobs.interval
        await until(offset)
        written = 0
        if phase != "pre" and seen == stall_at:
            stall_at = None
            if knobs.stall_mode == "line":
                written = _cut(frame)
                await writer.write(frame[:written])
            shift += knobs.stall
            await until(offset)
        if phase != "pre" and seen == abort_at:
            if knobs.abort_mode == "line" and not written:
                await writer.write(frame[: _cut(frame)])
            return True
        await writer.write(frame[written:])
        if phase == "content":
            seen += 1
    if seen == stall_at:
        await asyncio.sleep(knobs.stall)
    if seen == abort_at:
        return True
    await writer.finish()
    return False


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _Program(Response):
    """A response driven by `program(send) -> aborted`, raced against the client leaving.

    uvicorn's `send()` stays silent after a disconnect, so without the race a long stream
    would keep sleeping and writing into a closed socket.
    """

    def __init__(self, program: Callable[[Send], Coroutine[Any, Any, bool]]) -> None:
        # Response.__init__ would add a Content-Length for an empty body.
        self.status_code = 200
        self.background = None
        self.raw_headers = []
        self._program = program

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with asyncio.TaskGroup() as group:
            work = group.create_task(self._program(send))
            watch = group.create_task(_until_disconnect(receive))
            work.add_done_callback(lambda _: watch.cancel())
            watch.add_done_callback(lambda _: work.cancel())
        if not work.cancelled() and work.result():
            raise MockAbort


@dataclass(frozen=True, slots=True)
class _Stream:
    """A streamed answer: its media type, how many content events, and the events."""

    media_type: str
    count: int
    events: Iterator[Event]


async def _run_stream(stream: _Stream, knobs: Knobs, send: Send) -> bool:
    if knobs.headers_delay > 0:
        await asyncio.sleep(knobs.headers_delay)
    headers = [(b"content-type", stream.media_type.encode()), (b"cache-control", b"no-cache")]
    if knobs.gzip:
        headers.append((b"content-encoding", b"gzip"))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    stall_at = None
    if knobs.stall > 0:
        default = stream.count // 2
        stall_at = 0 if knobs.stall_mode == "first" else knobs.stall_after
        stall_at = default if stall_at is None else stall_at
    writer = _Writer(send, knobs.chunk_size, knobs.gzip)
    return await _play(writer, stream.events, knobs, stall_at, knobs.abort_after)


# --- the LLM routes ------------------------------------------------------------------------------

SSE = "text/event-stream; charset=utf-8"
Answer = _Stream | dict[str, Any]
Handler = Callable[[Knobs, RequestInfo, bool], Answer]


def _json(obj: Any, status: int, gzip: bool = False) -> Response:
    body = shapes.dumps(obj)
    headers = {}
    if gzip:
        body = zlib.compress(body, wbits=31)
        headers["content-encoding"] = "gzip"
    return Response(body, status, headers, media_type="application/json")


async def _handle(
    request: Request,
    api: Api,
    handler: Handler,
    *,
    model: str | None = None,
    stream_default: bool = False,
) -> Response:
    try:
        knobs = shapes.parse_knobs(request.headers)
        raw = await request.body()
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise _Reject(400, "request body: expected a JSON object")
        stream_options = body.get("stream_options")
        req = RequestInfo(
            model=model or str(body.get("model") or "mock-model"),
            prompt_tokens=max(1, len(raw) // 4),
            created=int(time.time()),
            suffix=secrets.token_hex(12),
            include_usage=isinstance(stream_options, dict)
            and stream_options.get("include_usage") is True,
        )
        if knobs.status is not None:
            if knobs.headers_delay > 0:
                await asyncio.sleep(knobs.headers_delay)
            return _json(shapes.error_body(api, knobs.status), knobs.status, knobs.gzip)
        answer = handler(knobs, req, bool(body.get("stream", stream_default)))
        if isinstance(answer, _Stream):
            shapes.check_positions(knobs, answer.count)
    except KnobError as exc:
        return _json(shapes.error_body(api, 400, str(exc)), 400)
    except _Reject as exc:
        return _json(shapes.error_body(api, exc.status, str(exc)), exc.status)
    if isinstance(answer, _Stream):
        return _Program(functools.partial(_run_stream, answer, knobs))
    if knobs.headers_delay + knobs.ttft > 0:
        await asyncio.sleep(knobs.headers_delay + knobs.ttft)
    return _json(answer, 200, knobs.gzip)


def _chat(knobs: Knobs, req: RequestInfo, stream: bool) -> Answer:
    if not stream:
        return shapes.chat_json(knobs, req)
    return _Stream(SSE, knobs.tokens, shapes.chat_stream(knobs, req))


def _completions(knobs: Knobs, req: RequestInfo, stream: bool) -> Answer:
    if knobs.kind != "text":
        raise KnobError("x-mock-kind: /v1/completions only produces text")
    if not stream:
        return shapes.completion_json(knobs, req)
    return _Stream(SSE, knobs.tokens, shapes.completion_stream(knobs, req))


def _responses(knobs: Knobs, req: RequestInfo, stream: bool) -> Answer:
    if not stream:
        return shapes.responses_json(knobs, req)
    return _Stream(SSE, knobs.tokens, shapes.responses_stream(knobs, req))


def _messages(knobs: Knobs, req: RequestInfo, stream: bool) -> Answer:
    if not stream:
        return shapes.messages_json(knobs, req)
    return _Stream(SSE, knobs.tokens, shapes.messages_stream(knobs, req))


def _ollama(chat: bool) -> Handler:
    def handler(knobs: Knobs, req: RequestInfo, stream: bool) -> Answer:
        created_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(req.created))
        if not stream:
            return shapes.ollama_json(knobs, req, chat, created_at)
        events = shapes.ollama_stream(knobs, req, chat, created_at)
        return _Stream("application/x-ndjson", shapes.ollama_count(knobs), events)

    return handler


async def chat_completions(request: Request) -> Response:
    return await _handle(request, "openai", _chat)


async def completions(request: Request) -> Response:
    return await _handle(request, "openai", _completions)


async def responses(request: Request) -> Response:
    return await _handle(request, "openai", _responses)


async def messages(request: Request) -> Response:
    return await _handle(request, "anthropic", _messages)


async def ollama_chat(request: Request) -> Response:
    return await _handle(request, "ollama", _ollama(chat=True), stream_default=True)


async def ollama_generate(request: Request) -> Response:
    return await _handle(request, "ollama", _ollama(chat=False), stream_default=True)


async def gemini(request: Request) -> Response:
    model, _, method = str(request.path_params["rest"]).rpartition(":")
    sse = request.query_params.get("alt") == "sse"

    def handler(knobs: Knobs, req: RequestInfo, stream: bool) -> Answer:
        if method == "generateContent":
            return shapes.gemini_json(knobs, req)
        if method != "streamGenerateContent" or not model:
            raise _Reject(404, f"unknown method {method!r}; try M:streamGenerateContent")
        media_type = SSE if sse else "application/json; charset=UTF-8"
        events = shapes.gemini_stream(knobs, req, sse)
        return _Stream(media_type, shapes.gemini_count(knobs), events)

    return await _handle(request, "gemini", handler, model=model or None)


async def models(request: Request) -> Response:
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "streamproxy"} for m in MODELS]
    return JSONResponse({"object": "list", "data": data})


# --- test helpers: echo and script ---------------------------------------------------------------


class _Echo:
    """Any method: an ASGI class, because Starlette limits function endpoints to GET."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _echo(scope, receive, send)


async def _echo(scope: Scope, receive: Receive, send: Send) -> None:
    body = await Request(scope, receive).body()
    response = JSONResponse(
        {
            "method": scope["method"],
            "path": scope["path"],
            "raw_path": bytes(scope.get("raw_path") or b"").decode("latin-1"),
            "query": bytes(scope["query_string"]).decode("latin-1"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
            "body": body.decode("utf-8", "replace"),
            "body_len": len(body),
        }
    )
    await response(scope, receive, send)


def _parse_script(
    raw: bytes,
) -> tuple[int, list[tuple[bytes, bytes]], list[tuple[bytes, float]], bool]:
    try:
        spec = json.loads(raw)
        status = spec.get("status", 200)
        headers = [
            (str(k).lower().encode("latin-1"), str(v).encode("latin-1"))
            for k, v in spec.get("headers", [])
        ]
        chunks = [
            (base64.b64decode(c["b64"], validate=True), float(c.get("delay", 0.0)))
            for c in spec.get("chunks", [])
        ]
        end = spec.get("end", "complete")
    except (ValueError, TypeError, KeyError, AttributeError, binascii.Error) as exc:
        raise _Reject(400, f"script: {exc}") from exc
    if not isinstance(status, int) or not 100 <= status <= 599:
        raise _Reject(400, f"script: status must be an integer in [100, 599], got {status!r}")
    if end not in ("complete", "abort"):
        raise _Reject(400, f"script: end must be 'complete' or 'abort', got {end!r}")
    if any(not 0 <= delay <= shapes.MAX_SECONDS for _, delay in chunks):
        raise _Reject(400, f"script: every delay must be in [0, {shapes.MAX_SECONDS:g}]")
    return status, headers, chunks, end == "abort"


async def script(request: Request) -> Response:
    try:
        status, headers, chunks, abort = _parse_script(await request.body())
    except _Reject as exc:
        return _json(shapes.error_body("openai", exc.status, str(exc)), exc.status)

    async def program(send: Send) -> bool:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        for data, delay in chunks:
            if delay > 0:
                await asyncio.sleep(delay)
            await send({"type": "http.response.body", "body": data, "more_body": True})
        if not abort:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        return abort

    return _Program(program)


# --- public API ----------------------------------------------------------------------------------


def create_app() -> Starlette:
    """The mock upstream as a Starlette app (routes and knobs in the module docstring)."""
    logger = logging.getLogger("uvicorn.error")
    if _LOG_FILTER not in logger.filters:
        logger.addFilter(_LOG_FILTER)
    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/responses", responses, methods=["POST"]),
            Route("/v1/messages", messages, methods=["POST"]),
            Route("/v1beta/models/{rest:path}", gemini, methods=["POST"]),
            Route("/api/chat", ollama_chat, methods=["POST"]),
            Route("/api/generate", ollama_generate, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/echo", _Echo()),
            Route("/echo/{path:path}", _Echo()),
            Route("/mock/script", script, methods=["POST"]),
        ]
    )


async def serve(host: str, port: int) -> None:
    """Run the mock under uvicorn until cancelled or told to exit (Ctrl-C, SIGTERM)."""
    config = uvicorn.Config(
        create_app(),
        host=host,
        port=port,
        http="httptools",
        log_level="warning",
        access_log=False,
        lifespan="off",
    )
    server = uvicorn.Server(config)
    try:
        await server.serve()
    except asyncio.CancelledError:
        # uvicorn skips its own shutdown when cancelled: stop listening and close every
        # connection, so no socket outlives the caller (a stream sees a disconnect and stops).
        for listener in getattr(server, "servers", []):
            listener.close()
        for connection in list(server.server_state.connections):
            connection.transport.close()
        raise
