"""Wire shapes for the mock upstream: knobs, framing, and each provider's event sequence.

Everything here is deterministic and does no I/O: a shape is a generator of `(phase, bytes)`
pairs, where `phase` tells the player in `mock_upstream` when to send the bytes:

- `pre`: the preamble, sent as soon as the body starts (role chunk, message_start, ...);
- `content`: one generated token (text, reasoning, or tool-call arguments), on the timeline
  `ttft + i * interval`;
- `post`: the closing events, sent right after the last content event.

Each yielded item is one framed event (an SSE event with its blank line, one NDJSON line, or
one element of a JSON array) and becomes one write on the wire.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Phase = Literal["pre", "content", "post"]
Event = tuple[Phase, bytes]
Kind = Literal["text", "reasoning", "tool"]
Api = Literal["openai", "anthropic", "gemini", "ollama"]

# Sixteen tokens make the default reply one sentence. None needs JSON escaping, so the tool
# arguments built from them are plain too.
WORDS = (
    "Hello",
    " world",
    "!",
    " This",
    " reply",
    " is",
    " streamed",
    " by",
    " the",
    " mock",
    " upstream",
    ",",
    " one",
    " token",
    " at a",
    " time.",
)
TOOL_NAME = "get_weather"
FINGERPRINT = "fp_mock"
MAX_TOKENS = 1_000_000
MAX_SECONDS = 3600.0


def expected_text(tokens: int) -> str:
    """The exact text a stream of `tokens` content events produces (the words cycle)."""
    return "".join(WORDS[i % len(WORDS)] for i in range(tokens))


def expected_arguments(tokens: int) -> str:
    """The tool-call arguments (`x-mock-kind: tool`): `{"text": "<expected_text>"}`."""
    return "".join(tool_pieces(tokens))


def tool_pieces(tokens: int) -> list[str]:
    """Argument deltas whose concatenation is `expected_arguments(tokens)`."""
    pieces = [WORDS[i % len(WORDS)] for i in range(tokens)]
    if pieces:
        pieces[0] = '{"text": "' + pieces[0]
        pieces[-1] += '"}'
    return pieces


# --- knobs ---------------------------------------------------------------------------------------


class KnobError(ValueError):
    """One or more `x-mock-*` headers are invalid; the message lists each problem."""


@dataclass(frozen=True, slots=True)
class Knobs:
    """The per-request settings read from `x-mock-*` headers (see `mock_upstream`)."""

    ttft: float = 0.05
    tokens: int = 16
    interval: float = 0.02
    role_chunk: bool = True
    stall: float = 0.0
    stall_after: int | None = None  # None: tokens // 2
    stall_mode: Literal["event", "line", "first"] = "event"
    abort_after: int | None = None
    abort_mode: Literal["event", "line"] = "event"
    status: int | None = None
    headers_delay: float = 0.0
    line_ending: bytes = b"\n"
    gzip: bool = False
    chunk_size: int | None = None
    sse_id: bool = False
    usage: bool = False
    kind: Kind = "text"


LINE_ENDINGS = {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r"}
KNOB_NAMES = (
    "ttft",
    "tokens",
    "interval",
    "role-chunk",
    "stall",
    "stall-after",
    "stall-mode",
    "abort-after",
    "abort-mode",
    "status",
    "headers-delay",
    "line-ending",
    "gzip",
    "chunk-size",
    "id",
    "usage",
    "kind",
)


def parse_knobs(headers: Mapping[str, str]) -> Knobs:
    """Read every `x-mock-*` header; raise KnobError naming each bad or unknown one."""
    problems: list[str] = []
    values: dict[str, str] = {}
    for name, value in headers.items():
        name = name.lower()
        if name.startswith("x-mock-"):
            if name[7:] in KNOB_NAMES:
                values[name[7:]] = value.strip()
            else:
                problems.append(f"{name}: unknown knob (known: {', '.join(KNOB_NAMES)})")

    def seconds(name: str, default: float) -> float:
        raw = values.get(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not 0 <= value <= MAX_SECONDS:  # also rejects nan and inf
            problems.append(f"x-mock-{name}: expected seconds in [0, {MAX_SECONDS:g}], got {raw!r}")
            return default
        return value

    def integer(name: str, low: int, high: int) -> int | None:
        raw = values.get(name)
        if raw is None:
            return None
        try:
            value = int(raw)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            problems.append(f"x-mock-{name}: expected an integer in [{low}, {high}], got {raw!r}")
            return None
        return value

    def choice(name: str, options: tuple[str, ...]) -> str | None:
        raw = values.get(name)
        if raw is None:
            return None
        if raw.lower() not in options:
            problems.append(f"x-mock-{name}: expected one of {'|'.join(options)}, got {raw!r}")
            return None
        return raw.lower()

    def flag(name: str, default: bool) -> bool:
        raw = choice(name, ("0", "1"))
        return default if raw is None else raw == "1"

    tokens = integer("tokens", 0, MAX_TOKENS)
    knobs = Knobs(
        ttft=seconds("ttft", 0.05),
        tokens=16 if tokens is None else tokens,
        interval=seconds("interval", 0.02),
        role_chunk=flag("role-chunk", True),
        stall=seconds("stall", 0.0),
        stall_after=integer("stall-after", 0, MAX_TOKENS),
        stall_mode=choice("stall-mode", ("event", "line", "first")) or "event",  # type: ignore[arg-type]  # checked by choice()
        abort_after=integer("abort-after", 0, MAX_TOKENS),
        abort_mode=choice("abort-mode", ("event", "line")) or "event",  # type: ignore[arg-type]  # checked by choice()
        status=integer("status", 400, 599),
        headers_delay=seconds("headers-delay", 0.0),
        line_ending=LINE_ENDINGS[choice("line-ending", tuple(LINE_ENDINGS)) or "lf"],
        gzip=flag("gzip", False),
        chunk_size=integer("chunk-size", 1, 1 << 24),
        sse_id=flag("id", False),
        usage=flag("usage", False),
        kind=choice("kind", ("text", "reasoning", "tool")) or "text",  # type: ignore[arg-type]  # checked by choice()
    )
    if problems:
        raise KnobError("; ".join(problems))
    return knobs


def check_positions(knobs: Knobs, count: int) -> None:
    """Reject stall/abort positions past the `count` content events this stream will have."""
    problems = [
        f"x-mock-{name}: {value} is past the {count} content events of this stream"
        for name, value in (("stall-after", knobs.stall_after), ("abort-after", knobs.abort_after))
        if value is not None and value > count
    ]
    if problems:
        raise KnobError("; ".join(problems))


# --- request facts and framing -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What a shape needs from the request, with the clock and randomness read by the caller."""

    model: str
    prompt_tokens: int
    created: int  # unix seconds
    suffix: str  # random hex used in response ids
    include_usage: bool = False  # OpenAI `stream_options.include_usage`


def dumps(obj: Any) -> bytes:
    """Compact JSON, as the providers send it."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(slots=True)
class SSEFramer:
    """Frames one SSE event per call: optional `id:`, optional `event:`, `data:`, blank line."""

    line_ending: bytes = b"\n"
    ids: bool = False
    _count: int = field(default=0, init=False)

    def event(self, data: Any, event: str | None = None) -> bytes:
        lines: list[bytes] = []
        if self.ids:
            self._count += 1
            lines.append(b"id: %d" % self._count)
        if event is not None:
            lines.append(b"event: " + event.encode())
        lines.append(b"data: " + (data.encode() if isinstance(data, str) else dumps(data)))
        return self.line_ending.join(lines) + self.line_ending * 2


def pieces(knobs: Knobs) -> list[str]:
    """The content deltas of a stream: words, or tool-call argument pieces."""
    if knobs.kind == "tool":
        return tool_pieces(knobs.tokens)
    return [WORDS[i % len(WORDS)] for i in range(knobs.tokens)]


# --- errors --------------------------------------------------------------------------------------

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}
_ANTHROPIC_TYPES = {**_OPENAI_TYPES, 413: "request_too_large", 529: "overloaded_error"}
_GEMINI_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def error_body(api: Api, status: int, message: str | None = None) -> dict[str, Any]:
    """The provider's error JSON for `status` (`x-mock-status`, or a bad request)."""
    message = message or f"mock upstream: simulated HTTP {status} (x-mock-status)"
    if api == "anthropic":
        kind = _ANTHROPIC_TYPES.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        return {"type": "error", "error": {"type": kind, "message": message}}
    if api == "gemini":
        code = _GEMINI_STATUS.get(status, "INTERNAL" if status >= 500 else "FAILED_PRECONDITION")
        return {"error": {"code": status, "message": message, "status": code}}
    if api == "ollama":
        return {"error": message}
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


# --- OpenAI chat and legacy completions ----------------------------------------------------------


def _openai_usage(knobs: Knobs, req: RequestInfo) -> dict[str, Any]:
    reasoning = knobs.tokens if knobs.kind == "reasoning" else 0
    return {
        "prompt_tokens": req.prompt_tokens,
        "completion_tokens": knobs.tokens,
        "total_tokens": req.prompt_tokens + knobs.tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0},
    }


def _tool_call(req: RequestInfo, arguments: str) -> dict[str, Any]:
    return {
        "id": f"call_{req.suffix}",
        "type": "function",
        "function": {"name": TOOL_NAME, "arguments": arguments},
    }


def chat_stream(knobs: Knobs, req: RequestInfo) -> Iterator[Event]:
    """`POST /v1/chat/completions` with `stream: true`."""
    sse = SSEFramer(knobs.line_ending, knobs.sse_id)
    with_usage = knobs.usage or req.include_usage
    head = {
        "id": f"chatcmpl-{req.suffix}",
        "object": "chat.completion.chunk",
        "created": req.created,
        "model": req.model,
        "service_tier": "default",
        "system_fingerprint": FINGERPRINT,
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse.event({**head, "choices": [choice], **({"usage": None} if with_usage else {})})

    tool_head = {"index": 0, **_tool_call(req, "")}
    if knobs.role_chunk:
        if knobs.kind == "tool":
            yield "pre", chunk({"role": "assistant", "content": None, "tool_calls": [tool_head]})
        else:
            yield "pre", chunk({"role": "assistant", "content": "", "refusal": None})
    for i, piece in enumerate(pieces(knobs)):
        if knobs.kind == "text":
            yield "content", chunk({"content": piece})
        elif knobs.kind == "reasoning":
            yield "content", chunk({"reasoning_content": piece})
        elif i == 0 and not knobs.role_chunk:
            call = {**tool_head, "function": {"name": TOOL_NAME, "arguments": piece}}
            yield "content", chunk({"role": "assistant", "tool_calls": [call]})
        else:
            yield "content", chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
    yield "post", chunk({}, "tool_calls" if knobs.kind == "tool" else "stop")
    if with_usage:
        yield "post", sse.event({**head, "choices": [], "usage": _openai_usage(knobs, req)})
    yield "post", sse.event("[DONE]")


def chat_json(knobs: Knobs, req: RequestInfo) -> dict[str, Any]:
    """`POST /v1/chat/completions` without streaming."""
    text = "".join(pieces(knobs))
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if knobs.kind == "reasoning":
        message.update(content="", reasoning_content=text)
    elif knobs.kind == "tool":
        message.update(content=None, tool_calls=[_tool_call(req, text)])
    finish = "tool_calls" if knobs.kind == "tool" else "stop"
    return {
        "id": f"chatcmpl-{req.suffix}",
        "object": "chat.completion",
        "created": req.created,
        "model": req.model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": _openai_usage(knobs, req),
        "service_tier": "default",
        "system_fingerprint": FINGERPRINT,
    }


def completion_stream(knobs: Knobs, req: RequestInfo) -> Iterator[Event]:
    """`POST /v1/completions` (legacy) with `stream: true`."""
    sse = SSEFramer(knobs.line_ending, knobs.sse_id)
    head = {
        "id": f"cmpl-{req.suffix}",
        "object": "text_completion",
        "created": req.created,
        "model": req.model,
    }

    def chunk(text: str, finish: str | None = None) -> bytes:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        return sse.event({**head, "choices": [choice]})

    for piece in pieces(knobs):
        yield "content", chunk(piece)
    yield "post", chunk("", "stop")
    if knobs.usage or req.include_usage:
        usage = _openai_usage(knobs, req)
        del usage["prompt_tokens_details"], usage["completion_tokens_details"]
        yield "post", sse.event({**head, "choices": [], "usage": usage})
    yield "post", sse.event("[DONE]")


def completion_json(knobs: Knobs, req: RequestInfo) -> dict[str, Any]:
    """`POST /v1/completions` (legacy) without streaming."""
    usage = _openai_usage(knobs, req)
    del usage["prompt_tokens_details"], usage["completion_tokens_details"]
    choice = {"text": "".join(pieces(knobs)), "index": 0, "logprobs": None, "finish_reason": "stop"}
    return {
        "id": f"cmpl-{req.suffix}",
        "object": "text_completion",
        "created": req.created,
        "model": req.model,
        "choices": [choice],
        "usage": usage,
    }


# --- OpenAI Responses API ------------------------------------------------------------------------


def _response(
    knobs: Knobs, req: RequestInfo, status: str, output: list[Any], done: bool
) -> dict[str, Any]:
    reasoning = knobs.tokens if knobs.kind == "reasoning" else 0
    usage = {
        "input_tokens": req.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": knobs.tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": req.prompt_tokens + knobs.tokens,
    }
    return {
        "id": f"resp_{req.suffix}",
        "object": "response",
        "created_at": req.created,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": req.model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage if done else None,
        "user": None,
        "metadata": {},
    }


def _response_item(knobs: Knobs, req: RequestInfo, text: str, done: bool) -> dict[str, Any]:
    status = "completed" if done else "in_progress"
    if knobs.kind == "tool":
        return {
            "id": f"fc_{req.suffix}",
            "type": "function_call",
            "status": status,
            "arguments": text,
            "call_id": f"call_{req.suffix}",
            "name": TOOL_NAME,
        }
    if knobs.kind == "reasoning":
        summary = [{"type": "summary_text", "text": text}] if done else []
        return {"id": f"rs_{req.suffix}", "type": "reasoning", "summary": summary}
    content = [_response_part(text)] if done else []
    return {
        "id": f"msg_{req.suffix}",
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def _response_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def responses_stream(knobs: Knobs, req: RequestInfo) -> Iterator[Event]:
    """`POST /v1/responses` with `stream: true`: typed events with `sequence_number`."""
    sse = SSEFramer(knobs.line_ending, knobs.sse_id)
    seq = 0

    def event(kind: str, **fields: Any) -> bytes:
        nonlocal seq
        data = {"type": kind, "sequence_number": seq, **fields}
        seq += 1
        return sse.event(data, event=kind)

    text = "".join(pieces(knobs))
    item_id = _response_item(knobs, req, "", False)["id"]
    at = {"item_id": item_id, "output_index": 0}
    empty = _response(knobs, req, "in_progress", [], False)
    yield "pre", event("response.created", response=empty)
    yield "pre", event("response.in_progress", response=empty)
    item = _response_item(knobs, req, "", False)
    yield "pre", event("response.output_item.added", output_index=0, item=item)
    if knobs.kind == "text":
        part = _response_part("")
        yield "pre", event("response.content_part.added", **at, content_index=0, part=part)
        for piece in pieces(knobs):
            yield (
                "content",
                event(
                    "response.output_text.delta", **at, content_index=0, delta=piece, logprobs=[]
                ),
            )
        yield (
            "post",
            event("response.output_text.done", **at, content_index=0, text=text, logprobs=[]),
        )
        part = _response_part(text)
        yield "post", event("response.content_part.done", **at, content_index=0, part=part)
    elif knobs.kind == "reasoning":
        part = {"type": "summary_text", "text": ""}
        yield (
            "pre",
            event("response.reasoning_summary_part.added", **at, summary_index=0, part=part),
        )
        for piece in pieces(knobs):
            name = "response.reasoning_summary_text.delta"
            yield "content", event(name, **at, summary_index=0, delta=piece)
        yield (
            "post",
            event("response.reasoning_summary_text.done", **at, summary_index=0, text=text),
        )
        part = {"type": "summary_text", "text": text}
        yield (
            "post",
            event("response.reasoning_summary_part.done", **at, summary_index=0, part=part),
        )
    else:
        for piece in pieces(knobs):
            yield "content", event("response.function_call_arguments.delta", **at, delta=piece)
        name = "response.function_call_arguments.done"
        yield "post", event(name, **at, name=TOOL_NAME, arguments=text)
    item = _response_item(knobs, req, text, True)
    yield "post", event("response.output_item.done", output_index=0, item=item)
    done = _response(knobs, req, "completed", [item], True)
    yield "post", event("response.completed", response=done)


def responses_json(knobs: Knobs, req: RequestInfo) -> dict[str, Any]:
    """`POST /v1/responses` without streaming."""
    item = _response_item(knobs, req, "".join(pieces(knobs)), True)
    return _response(knobs, req, "completed", [item], True)


# --- Anthropic Messages --------------------------------------------------------------------------


def _anthropic_block(knobs: Knobs, req: RequestInfo, text: str, done: bool) -> dict[str, Any]:
    if knobs.kind == "tool":
        args = json.loads(text) if done and text else {}
        return {"type": "tool_use", "id": f"toolu_{req.suffix}", "name": TOOL_NAME, "input": args}
    if knobs.kind == "reasoning":
        return {"type": "thinking", "thinking": text, "signature": "mock-signature" if done else ""}
    return {"type": "text", "text": text}


def _anthropic_message(
    knobs: Knobs, req: RequestInfo, content: list[Any], output_tokens: int, stop: str | None
) -> dict[str, Any]:
    return {
        "id": f"msg_{req.suffix}",
        "type": "message",
        "role": "assistant",
        "content": content,
        "model": req.model,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {
            "input_tokens": req.prompt_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": output_tokens,
        },
    }


def messages_stream(knobs: Knobs, req: RequestInfo) -> Iterator[Event]:
    """`POST /v1/messages` with `stream: true`."""
    sse = SSEFramer(knobs.line_ending, knobs.sse_id)

    def event(kind: str, **fields: Any) -> bytes:
        return sse.event({"type": kind, **fields}, event=kind)

    stop = "tool_use" if knobs.kind == "tool" else "end_turn"
    yield "pre", event("message_start", message=_anthropic_message(knobs, req, [], 1, None))
    block = _anthropic_block(knobs, req, "", False)
    yield "pre", event("content_block_start", index=0, content_block=block)
    yield "pre", event("ping")
    delta: dict[str, Any]
    for piece in pieces(knobs):
        if knobs.kind == "text":
            delta = {"type": "text_delta", "text": piece}
        elif knobs.kind == "reasoning":
            delta = {"type": "thinking_delta", "thinking": piece}
        else:
            delta = {"type": "input_json_delta", "partial_json": piece}
        yield "content", event("content_block_delta", index=0, delta=delta)
    if knobs.kind == "reasoning":
        delta = {"type": "signature_delta", "signature": "mock-signature"}
        yield "post", event("content_block_delta", index=0, delta=delta)
    yield "post", event("content_block_stop", index=0)
    delta = {"stop_reason": stop, "stop_sequence": None}
    yield "post", event("message_delta", delta=delta, usage={"output_tokens": knobs.tokens})
    yield "post", event("message_stop")


def messages_json(knobs: Knobs, req: RequestInfo) -> dict[str, Any]:
    """`POST /v1/messages` without streaming."""
    block = _anthropic_block(knobs, req, "".join(pieces(knobs)), True)
    stop = "tool_use" if knobs.kind == "tool" else "end_turn"
    return _anthropic_message(knobs, req, [block], knobs.tokens, stop)


# --- Gemini --------------------------------------------------------------------------------------


def gemini_count(knobs: Knobs) -> int:
    """Content events in a Gemini stream: one per token, or one functionCall part."""
    return 1 if knobs.kind == "tool" else knobs.tokens


def _gemini_chunk(
    knobs: Knobs, req: RequestInfo, parts: list[Any], last: bool, tokens: int
) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
    chunk: dict[str, Any] = {"candidates": [candidate]}
    if last:
        candidate["finishReason"] = "STOP"
        chunk["usageMetadata"] = {
            "promptTokenCount": req.prompt_tokens,
            "candidatesTokenCount": tokens,
            "totalTokenCount": req.prompt_tokens + tokens,
        }
    chunk["modelVersion"] = req.model
    chunk["responseId"] = req.suffix
    return chunk


def _gemini_parts(knobs: Knobs) -> list[list[Any]]:
    if knobs.kind == "tool":
        call = {"name": TOOL_NAME, "args": {"text": expected_text(knobs.tokens)}}
        return [[{"functionCall": call}]]
    thought = {"thought": True} if knobs.kind == "reasoning" else {}
    return [[{"text": piece, **thought}] for piece in pieces(knobs)]


def gemini_stream(knobs: Knobs, req: RequestInfo, sse: bool) -> Iterator[Event]:
    """`:streamGenerateContent`: SSE with `alt=sse`, else a JSON array written progressively."""
    framer = SSEFramer(knobs.line_ending, knobs.sse_id)
    opened = False

    def frame(obj: dict[str, Any]) -> bytes:
        nonlocal opened
        if sse:
            return framer.event(obj)
        prefix = b",\r\n" if opened else b"["
        opened = True
        return prefix + dumps(obj)

    all_parts = _gemini_parts(knobs)
    for i, parts in enumerate(all_parts):
        last = i == len(all_parts) - 1
        yield "content", frame(_gemini_chunk(knobs, req, parts, last, knobs.tokens))
    if not all_parts:
        yield "post", frame(_gemini_chunk(knobs, req, [{"text": ""}], True, 0))
    if not sse:
        yield "post", b"]"


def gemini_json(knobs: Knobs, req: RequestInfo) -> dict[str, Any]:
    """`:generateContent`: one JSON object."""
    if knobs.kind == "tool":
        parts = _gemini_parts(knobs)[0]
    else:
        parts = [{"text": "".join(pieces(knobs))}]
        if knobs.kind == "reasoning":
            parts[0]["thought"] = True
    return _gemini_chunk(knobs, req, parts, True, knobs.tokens)


# --- Ollama --------------------------------------------------------------------------------------


def ollama_count(knobs: Knobs) -> int:
    """Content lines in an Ollama stream: one per token, or one tool_calls message."""
    return 1 if knobs.kind == "tool" else knobs.tokens


def _ollama_fields(knobs: Knobs, chat: bool, text: str) -> dict[str, Any]:
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": ""}
        if knobs.kind == "text":
            message["content"] = text
        elif knobs.kind == "reasoning":
            message["thinking"] = text
        elif text:
            call = {"function": {"name": TOOL_NAME, "arguments": {"text": text}}}
            message["tool_calls"] = [call]
        return {"message": message}
    if knobs.kind == "reasoning":
        return {"response": "", "thinking": text}
    return {"response": text}


def _ollama_final(
    knobs: Knobs, req: RequestInfo, fields: dict[str, Any], created_at: str
) -> dict[str, Any]:
    nanos = int((knobs.ttft + knobs.tokens * knobs.interval) * 1e9)
    return {
        "model": req.model,
        "created_at": created_at,
        **fields,
        "done": True,
        "done_reason": "stop",
        "total_duration": nanos,
        "load_duration": 0,
        "prompt_eval_count": req.prompt_tokens,
        "prompt_eval_duration": int(knobs.ttft * 1e9),
        "eval_count": knobs.tokens,
        "eval_duration": int(knobs.tokens * knobs.interval * 1e9),
    }


def ollama_stream(knobs: Knobs, req: RequestInfo, chat: bool, created_at: str) -> Iterator[Event]:
    """`POST /api/chat` or `/api/generate`: NDJSON, one object per line."""
    head = {"model": req.model, "created_at": created_at}
    texts = [expected_text(knobs.tokens)] if knobs.kind == "tool" else pieces(knobs)
    for text in texts:
        yield "content", dumps({**head, **_ollama_fields(knobs, chat, text), "done": False}) + b"\n"
    final = _ollama_final(knobs, req, _ollama_fields(knobs, chat, ""), created_at)
    yield "post", dumps(final) + b"\n"


def ollama_json(knobs: Knobs, req: RequestInfo, chat: bool, created_at: str) -> dict[str, Any]:
    """`POST /api/chat` or `/api/generate` with `stream: false`."""
    fields = _ollama_fields(knobs, chat, expected_text(knobs.tokens))
    return _ollama_final(knobs, req, fields, created_at)
