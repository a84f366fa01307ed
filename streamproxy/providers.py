"""Which streamed events are tokens, for each LLM API (pure; feeds the stream metrics).

`detect_api` names the API from the request path and `request_model` finds the model,
once per request. On the hot path `classify_sse` / `classify_ndjson` turn one event
into `EventFacts`: does it carry generated content (a *token event*: text, reasoning,
or tool-call arguments), is it the provider's end-of-stream marker, does it report
usage, does it signal an error.

Cost: most events are decided by a byte check. Providers send compact JSON, so
``"content":"X`` (X not a quote) can only be a non-empty ``content`` string: inside a
JSON string every quote is escaped, so the unescaped pattern is always a key and its
value. Gemini's spaced JSON (``"text": "X``) gets the same check by regular expression.
Only events whose bytes might matter (usage, errors, empty or unusual values,
non-compact JSON) go through `orjson.loads`; `benchmarks/bench_parsing.py` measures it.
Nothing here raises on garbage: a value of the wrong shape counts as absent.

Usage counts are reported as the provider sends them: cumulative for the stream so far
(Anthropic ``message_delta``, Gemini ``usageMetadata``, vLLM's per-chunk usage). A
consumer keeps the last value it saw; it never sums them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from streamproxy.sse import SSEEvent

__all__ = [
    "NOTHING",
    "Api",
    "EventFacts",
    "classify_ndjson",
    "classify_sse",
    "detect_api",
    "request_model",
]

Api = Literal[
    "openai_chat",
    "openai_completions",
    "openai_responses",
    "anthropic",
    "gemini",
    "ollama",
    "unknown",
]
"""The streaming API a request speaks, as named by `detect_api`."""


@dataclass(frozen=True, slots=True)
class EventFacts:
    """What one streamed event means for the metrics."""

    token: bool
    """The event carries generated content: text, reasoning/thinking, or tool-call arguments."""
    terminal: bool
    """The event is the provider's end-of-stream marker."""
    output_tokens: int | None
    """Output tokens so far, as reported by the provider in this event (cumulative)."""
    error: bool
    """The provider signalled an error in-stream."""


# Usage-free facts are shared instances: the hot path allocates nothing for them.
_SHARED = {
    (tok, term, err): EventFacts(tok, term, None, err)
    for tok in (False, True)
    for term in (False, True)
    for err in (False, True)
}
NOTHING = _SHARED[False, False, False]
"""The shared all-false facts, returned for the common uninteresting event."""
_TOKEN = _SHARED[True, False, False]
_TERMINAL = _SHARED[False, True, False]
_ERROR = _SHARED[False, False, True]
_DONE = b"[DONE]"  # OpenAI's terminal marker; not JSON
_EMPTY_STRING = (b'"', b"")  # what follows `"key":"` when the string is empty, or nothing


def _facts(
    token: bool = False, terminal: bool = False, usage: int | None = None, error: bool = False
) -> EventFacts:
    if usage is None:
        return _SHARED[token, terminal, error]
    return EventFacts(token, terminal, usage, error)


# --- request side ----------------------------------------------------------------------


def detect_api(path: str) -> Api:
    """Name the API from the request path as the client sent it (prefixes allowed)."""
    path = path.partition("?")[0].rstrip("/")
    last = path.rpartition("/")[2]
    if ":" in last:  # Google's custom methods: /v1beta/models/<model>:streamGenerateContent
        method = last.rpartition(":")[2]
        return "gemini" if method in ("streamGenerateContent", "generateContent") else "unknown"
    if path.endswith("/chat/completions"):
        return "openai_chat"
    if path.endswith(("/api/chat", "/api/generate")):
        return "ollama"
    return _BY_LAST_SEGMENT.get(last, "unknown")


_BY_LAST_SEGMENT: dict[str, Api] = {
    "completions": "openai_completions",
    "responses": "openai_responses",
    "messages": "anthropic",
}

# Bodies up to this size are parsed whole (orjson: about 0.3 ms for 256 KiB). Larger
# ones are mostly base64 images, and parsing 8 MB costs ~12 ms of event loop.
_FULL_PARSE_BYTES = 256 << 10
_TAIL_WINDOW = 256 << 10
_TAIL_TRIES = 4
_HEAD_MODEL = re.compile(rb'\A\s*\{\s*"model"\s*:\s*("(?:[^"\\]|\\.){0,256}")')


def request_model(api: Api, path: str, body: bytes) -> str | None:
    """The requested model: the JSON body's top-level ``"model"`` string, or for Gemini
    the ``<model>`` in ``models/<model>:method``. None when absent; never raises.

    Large bodies are not parsed whole. The top-level ``"model"`` is found either as the
    first key (curl, JS SDKs) or after the big ``messages`` (the Python SDKs): for the
    latter, ``{`` + the body from a ``"model"`` key parses as JSON only if that key sits
    at the top level (a nested one leaves unbalanced closing brackets behind it).
    """
    if api == "gemini":
        last = path.partition("?")[0].rstrip("/").rpartition("/")[2]
        model = last.partition(":")[0] if ":" in last else ""
        return model or None
    if len(body) <= _FULL_PARSE_BYTES:
        return _str(_obj(body).get("model"))
    head = _HEAD_MODEL.match(body)
    if head is not None:
        return _str(_loads(head.group(1)))
    start, end = len(body) - _TAIL_WINDOW, len(body)
    for _ in range(_TAIL_TRIES):
        i = body.rfind(b'"model"', start, end)
        if i < 0:
            break
        tail = _loads(b"{" + body[i:])
        if isinstance(tail, dict):
            return _str(tail.get("model"))
        end = i
    return None


# --- response side ---------------------------------------------------------------------


def classify_sse(api: Api, event: SSEEvent) -> EventFacts:
    """Facts about one SSE event of a stream speaking ``api``. Truncated events are
    opaque (`NOTHING`); an ``event: error`` is an error for every API."""
    if event.truncated:
        return NOTHING
    if event.event == b"error":
        return _ERROR
    return _SSE_CLASSIFIERS.get(api, _unknown)(event)


def classify_ndjson(api: Api, line: bytes) -> EventFacts:
    """Facts about one NDJSON line (Ollama); other APIs do not stream NDJSON."""
    if api != "ollama" or not line:
        return NOTHING
    if line.find(b'"done":false') >= 0 and (
        _compact_nonempty(line, b'"content":"') or _compact_nonempty(line, b'"response":"')
    ):
        return _TOKEN
    obj = _obj(line)
    message = _dict(obj.get("message"))
    token = (
        _nonempty(message.get("content"))
        or _nonempty(message.get("thinking"))
        or bool(_list(message.get("tool_calls")))
        or _nonempty(obj.get("response"))
        or _nonempty(obj.get("thinking"))
    )
    done = obj.get("done") is True
    usage = _int(obj.get("eval_count")) if done else None
    return _facts(token, done, usage, "error" in obj)


_CHAT_KEYS = (b'"content"', b'"reasoning', b'"refusal"', b'"arguments"', b'"usage"', b'"error"')
# Every delta field that makes a token, as a compact key with a non-empty string value:
# reasoning (vLLM/DeepSeek `reasoning_content`, OpenRouter `reasoning`) and tool-call
# arguments stream as many events as text does, so they get the byte check too.
_CHAT_TOKEN = re.compile(rb'"(?:content|reasoning_content|reasoning|refusal|arguments)":"[^"]')


def _openai_chat(event: SSEEvent) -> EventFacts:
    data = event.data
    if data == _DONE:
        return _TERMINAL
    if not data.partition(b'"usage":{')[1] and (  # absent (see _compact_nonempty)
        _compact_nonempty(data, b'"content":"') or _CHAT_TOKEN.search(data)
    ):
        return _TOKEN
    if not _mentions(data, _CHAT_KEYS):
        return NOTHING
    obj = _obj(data)
    token = any(_chat_delta_token(_dict(_dict(c).get("delta"))) for c in _list(obj.get("choices")))
    usage = _int(_dict(obj.get("usage")).get("completion_tokens"))
    return _facts(token, False, usage, obj.get("error") is not None)


def _chat_delta_token(delta: dict[str, Any]) -> bool:
    for key in ("content", "reasoning_content", "reasoning", "refusal"):
        if _nonempty(delta.get(key)):
            return True
    for call in _list(delta.get("tool_calls")):
        if _nonempty(_dict(_dict(call).get("function")).get("arguments")):
            return True
    return _nonempty(_dict(delta.get("function_call")).get("arguments"))  # legacy functions


def _openai_completions(event: SSEEvent) -> EventFacts:
    data = event.data
    if data == _DONE:
        return _TERMINAL
    if _compact_nonempty(data, b'"text":"') and data.find(b'"usage":{') < 0:
        return _TOKEN
    if not _mentions(data, (b'"text"', b'"usage"', b'"error"')):
        return NOTHING
    obj = _obj(data)
    token = any(_nonempty(_dict(c).get("text")) for c in _list(obj.get("choices")))
    usage = _int(_dict(obj.get("usage")).get("completion_tokens"))
    return _facts(token, False, usage, obj.get("error") is not None)


def _openai_responses(event: SSEEvent) -> EventFacts:
    kind = _kind(event)
    data = event.data
    if kind.endswith(b".delta"):  # output_text, refusal, reasoning*, *arguments, audio...
        empty = data.find(b'"delta":""') >= 0 or data.find(b'"delta": ""') >= 0
        return NOTHING if empty else _TOKEN
    if kind in (b"response.completed", b"response.incomplete"):
        # incomplete (max_output_tokens, content filter) ends the stream as surely as
        # completed, like Chat's finish_reason "length" followed by [DONE].
        usage = _dict(_dict(_obj(data).get("response")).get("usage"))
        return _facts(False, True, _int(usage.get("output_tokens")))
    if kind in (b"response.failed", b"error"):
        return _ERROR
    return NOTHING


def _anthropic(event: SSEEvent) -> EventFacts:
    kind = _kind(event)
    data = event.data
    if kind == b"content_block_delta":
        if data.find(b'""') < 0 and data.find(b"signature_delta") < 0:
            return _TOKEN  # no empty string anywhere, so the delta's payload is non-empty
        delta = _dict(_obj(data).get("delta"))
        if delta.get("type") == "signature_delta":  # a signature, not generated content
            return NOTHING
        token = any((_nonempty(v) or _dict(v)) for k, v in delta.items() if k != "type")
        return _TOKEN if token else NOTHING
    if kind == b"message_stop":
        return _TERMINAL
    if kind == b"message_delta":
        return _facts(usage=_int(_dict(_obj(data).get("usage")).get("output_tokens")))
    return _ERROR if kind == b"error" else NOTHING


_GEMINI_PART_KEYS = ("functionCall", "inlineData", "executableCode")
_GEMINI_KEYS = (b'"candidates"', b'"usageMetadata"', b'"promptFeedback"', b'"error"')
# The common Gemini chunk is one text part plus usageMetadata, in Google's spaced JSON
# (`"text": "..."`). Without these keys it is neither an end (finishReason, blockReason),
# an error, nor a chunk whose "text" may belong to something else (grounding segments):
_GEMINI_NOT_PLAIN = (b'Reason"', b'"error"', b'"groundingMetadata"')
_GEMINI_TEXT = re.compile(rb'"text"\s*:\s*"[^"]')  # a non-empty text value
# Usage counters have unique key names, so a match is a key of usageMetadata.
_GEMINI_ANSWER = re.compile(rb'"candidatesTokenCount"\s*:\s*(\d+)\s*[,}]')
_GEMINI_THOUGHTS = re.compile(rb'"thoughtsTokenCount"\s*:\s*(\d+)\s*[,}]')


def _gemini(event: SSEEvent) -> EventFacts:
    data = event.data
    if not _mentions(data, _GEMINI_NOT_PLAIN) and _GEMINI_TEXT.search(data):
        said, thought = _GEMINI_ANSWER.search(data), _GEMINI_THOUGHTS.search(data)
        if said is None and thought is None:
            return _TOKEN
        count = (int(said[1]) if said else 0) + (int(thought[1]) if thought else 0)
        return EventFacts(True, False, count, False)
    if not _mentions(data, _GEMINI_KEYS):
        return NOTHING
    obj = _obj(data)
    token = terminal = False
    for candidate in map(_dict, _list(obj.get("candidates"))):
        for part in map(_dict, _list(_dict(candidate.get("content")).get("parts"))):
            if _nonempty(part.get("text")) or any(k in part for k in _GEMINI_PART_KEYS):
                token = True
        if candidate.get("finishReason"):
            terminal = True
    if _dict(obj.get("promptFeedback")).get("blockReason"):
        terminal = True  # a blocked prompt: no candidates, and the stream ends here
    meta = _dict(obj.get("usageMetadata"))
    answer, thoughts = _int(meta.get("candidatesTokenCount")), _int(meta.get("thoughtsTokenCount"))
    usage = None if answer is None and thoughts is None else (answer or 0) + (thoughts or 0)
    return _facts(token, terminal, usage, "error" in obj)


def _unknown(event: SSEEvent) -> EventFacts:
    return _TERMINAL if event.data == _DONE else NOTHING


_SSE_CLASSIFIERS: dict[str, Callable[[SSEEvent], EventFacts]] = {
    "openai_chat": _openai_chat,
    "openai_completions": _openai_completions,
    "openai_responses": _openai_responses,
    "anthropic": _anthropic,
    "gemini": _gemini,
}


# --- helpers: a value of the wrong shape counts as absent --------------------------------


def _loads(data: bytes) -> object:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def _obj(data: bytes) -> dict[str, Any]:
    return _dict(_loads(data))


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _nonempty(value: object) -> bool:
    return isinstance(value, str) and value != ""


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _kind(event: SSEEvent) -> bytes:
    """The event's type: the ``event:`` field, else the data's ``"type"``."""
    if event.event is not None:
        return event.event
    kind = _obj(event.data).get("type")
    return kind.encode() if isinstance(kind, str) else b""


def _mentions(data: bytes, needles: tuple[bytes, ...]) -> bool:
    # A loop: any() over a generator costs ~2x more. find(), not `in`: CPython 3.11's
    # bytes.__contains__ first tries the needle as an int, and pays for the TypeError.
    for needle in needles:  # noqa: SIM110
        if data.find(needle) >= 0:
            return True
    return False


def _compact_nonempty(data: bytes, needle: bytes) -> bool:
    """``needle`` (``"key":"``) occurs and the string after it is not empty."""
    # partition, not find: CPython 3.11 parses find()'s optional arguments the slow way,
    # about a third of what the search costs; partition takes one argument. Absent, it
    # returns the bytes itself; present, it copies the two parts (an event's size).
    return data.partition(needle)[2][:1] not in _EMPTY_STRING


_STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true')
_STREAM_FALSE = re.compile(rb'"stream"\s*:\s*false')


def wants_stream(api: Api, path: str, accept: bytes | None, body: bytes) -> bool:
    """Whether a request asks for a streamed answer: Gemini by its path, Ollama unless
    `"stream": false`, others by `"stream": true` or `Accept: text/event-stream`. A byte
    search, no JSON parse and no copy of the body (which may be megabytes of images)."""
    if api == "gemini":
        return ":streamGenerateContent" in path
    if api == "ollama":  # Ollama streams unless told not to
        return _STREAM_FALSE.search(body) is None
    if accept is not None and b"text/event-stream" in accept:
        return True
    return _STREAM_TRUE.search(body) is not None
