"""The mock upstream against the official SDKs and raw sockets: shapes, timing and failures."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import socket
import time
import zlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import anthropic
import httpx
import httpx2
import openai
import pytest

from streamproxy.mock_upstream import create_app, expected_arguments, expected_text, serve
from tests.support import bind_loopback, serve_app

CONNECTION_ERRORS = (
    httpx.RemoteProtocolError,
    httpx2.RemoteProtocolError,
    openai.APIConnectionError,
    anthropic.APIConnectionError,
)


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    """One mock server for the whole module."""
    with serve_app(create_app()) as url:
        yield url


@pytest.fixture
def oai(base: str) -> Iterator[openai.OpenAI]:
    """An OpenAI client on the mock, without retries."""
    with openai.OpenAI(base_url=base + "/v1", api_key="test", max_retries=0) as client:
        yield client


@pytest.fixture
def claude(base: str) -> Iterator[anthropic.Anthropic]:
    """An Anthropic client on the mock, without retries."""
    with anthropic.Anthropic(base_url=base, api_key="test", max_retries=0) as client:
        yield client


class Collect(logging.Handler):
    """Keeps the records it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def server_log() -> Iterator[list[logging.LogRecord]]:
    """What the mock's uvicorn logs on `uvicorn.error` (after its filters) during the test."""
    logger = logging.getLogger("uvicorn.error")
    handler = Collect()
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


def knobs(**values: object) -> dict[str, str]:
    """`ttft=0.1, stall_after=2` -> x-mock-* headers."""
    return {f"x-mock-{k.replace('_', '-')}": str(v) for k, v in values.items()}


def timed_reads(
    base: str, path: str, headers: dict[str, str], body: Any = None
) -> tuple[list[tuple[float, bytes]], BaseException | None]:
    """POST and read the raw body with arrival times (seconds after sending the request)."""
    reads: list[tuple[float, bytes]] = []
    start = time.monotonic()
    try:
        with httpx.stream(
            "POST", base + path, json=body or {"stream": True}, headers=headers, timeout=10
        ) as response:
            for chunk in response.iter_raw():
                reads.append((time.monotonic() - start, chunk))
    except httpx.RemoteProtocolError as exc:
        return reads, exc
    return reads, None


def raw_exchange(
    base: str, path: str, headers: dict[str, str], body: bytes = b'{"stream": true}'
) -> tuple[bytes, list[bytes], bool]:
    """POST over a bare socket; return the head, the HTTP chunks, and whether 0-chunk came."""
    url = urlsplit(base)
    lines = [f"POST {path} HTTP/1.1", f"Host: {url.netloc}", f"Content-Length: {len(body)}"]
    lines += ["Content-Type: application/json", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    data = b""
    with socket.create_connection((url.hostname, url.port or 80), timeout=10) as sock:
        sock.sendall(request)
        while part := sock.recv(65536):
            data += part
    head, _, rest = data.partition(b"\r\n\r\n")
    chunks: list[bytes] = []
    while rest:
        size, sep, rest = rest.partition(b"\r\n")
        if not sep:
            break
        n = int(size, 16)
        if n == 0:
            return head, chunks, True
        chunks.append(rest[:n])
        rest = rest[n + 2 :]
    return head, chunks, False


def sse_data(body: bytes) -> list[str]:
    """The `data:` payloads of an LF-framed SSE body."""
    return [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]


def chat_text(datas: list[str]) -> str:
    """Concatenated `delta.content` of OpenAI chat chunks."""
    chunks = [json.loads(d) for d in datas if d != "[DONE]"]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


# --- SDK compatibility ---------------------------------------------------------------------------


def test_openai_chat_stream_and_usage(oai: openai.OpenAI) -> None:
    """Chat streaming yields expected_text and the usage chunk when include_usage is set."""
    stream = oai.chat.completions.create(
        model="mock-gpt",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=knobs(tokens=20, interval=0.002),
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text(20)
    assert chunks[0].model == "mock-gpt"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 20


def test_openai_chat_non_stream(oai: openai.OpenAI) -> None:
    """A non-streamed chat completion carries the full text and usage."""
    completion = oai.chat.completions.create(
        model="mock-gpt",
        messages=[{"role": "user", "content": "hi"}],
        extra_headers=knobs(tokens=7),
    )
    assert completion.choices[0].message.content == expected_text(7)
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 7


def test_openai_legacy_completions(oai: openai.OpenAI) -> None:
    """Legacy completions stream text_completion chunks with expected_text."""
    stream = oai.completions.create(
        model="mock-gpt", prompt="hi", stream=True, extra_headers=knobs(tokens=5, interval=0)
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected_text(5)


def test_openai_responses_stream_and_json(oai: openai.OpenAI) -> None:
    """Responses API: deltas concatenate to expected_text; completed reports the usage."""
    stream = oai.responses.create(
        model="mock-gpt", input="hi", stream=True, extra_headers=knobs(tokens=9, interval=0.002)
    )
    events = list(stream)
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == expected_text(9)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1]
    assert final.type == "response.completed"
    assert final.response.usage is not None
    assert final.response.usage.output_tokens == 9
    response = oai.responses.create(model="mock-gpt", input="hi", extra_headers=knobs(tokens=4))
    assert response.output_text == expected_text(4)


def test_anthropic_stream_create_and_json(claude: anthropic.Anthropic) -> None:
    """Anthropic messages: stream helper, create(stream=True) and plain create all agree."""
    headers = knobs(tokens=11, interval=0.002)
    ask: dict[str, Any] = {
        "model": "mock-claude",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "hi"}],
    }
    with claude.messages.stream(**ask, extra_headers=headers) as stream:
        assert "".join(stream.text_stream) == expected_text(11)
        final = stream.get_final_message()
    assert final.usage.output_tokens == 11
    assert final.stop_reason == "end_turn"
    events = list(claude.messages.create(**ask, stream=True, extra_headers=headers))
    assert [e.type for e in events][:2] == ["message_start", "content_block_start"]  # ping: skipped
    assert events[-1].type == "message_stop"
    message = claude.messages.create(**ask, extra_headers=knobs(tokens=3))
    assert message.content[0].type == "text"
    assert message.content[0].text == expected_text(3)


def test_kinds_reasoning_and_tool(oai: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    """x-mock-kind: reasoning and tool deltas land where each SDK expects them."""
    fast = {"tokens": 6, "interval": 0, "ttft": 0}
    chunks = list(
        oai.chat.completions.create(
            model="m", messages=[], stream=True, extra_headers=knobs(kind="reasoning", **fast)
        )
    )
    reasoning = [c.choices[0].delta.model_extra or {} for c in chunks if c.choices]
    assert "".join(d.get("reasoning_content", "") for d in reasoning) == expected_text(6)
    chunks = list(
        oai.chat.completions.create(
            model="m", messages=[], stream=True, extra_headers=knobs(kind="tool", **fast)
        )
    )
    args = "".join(
        (call.function.arguments or "") if call.function else ""
        for c in chunks
        if c.choices
        for call in c.choices[0].delta.tool_calls or []
    )
    assert args == expected_arguments(6)
    assert json.loads(args) == {"text": expected_text(6)}
    events = list(
        oai.responses.create(
            model="m", input="x", stream=True, extra_headers=knobs(kind="tool", **fast)
        )
    )
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert "".join(deltas) == expected_arguments(6)
    ask: dict[str, Any] = {"model": "m", "max_tokens": 9, "messages": []}
    with claude.messages.stream(**ask, extra_headers=knobs(kind="tool", **fast)) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "tool_use"
    assert final.content[0].input == {"text": expected_text(6)}
    assert final.stop_reason == "tool_use"
    with claude.messages.stream(**ask, extra_headers=knobs(kind="reasoning", **fast)) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "thinking"
    assert final.content[0].thinking == expected_text(6)


# --- timing --------------------------------------------------------------------------------------


def test_ttft_role_chunk_and_interval(base: str) -> None:
    """The role chunk comes at once, content after ttft, then one event per interval."""
    reads, error = timed_reads(
        base, "/v1/chat/completions", knobs(ttft=0.5, tokens=6, interval=0.1)
    )
    assert error is None
    role_at = next(t for t, c in reads if b'"role":"assistant"' in c)
    first_at = next(t for t, c in reads if b'"content":"Hello"' in c)
    last_at = next(t for t, c in reads if b'"content":" is"' in c)  # the 6th token
    assert role_at < 0.3
    assert 0.45 <= first_at < 1.0
    assert 0.95 <= last_at < 1.5  # 0.5 + 5 * 0.1 on the absolute timeline


def test_headers_delay(base: str) -> None:
    """x-mock-headers-delay holds back the status line itself."""
    start = time.monotonic()
    with httpx.stream(
        "POST", base + "/v1/messages", json={"stream": True}, headers=knobs(headers_delay=0.4)
    ) as response:
        assert time.monotonic() - start >= 0.38
        assert response.status_code == 200


@pytest.mark.parametrize("mode", ["event", "line", "first"])
def test_stall_modes(base: str, mode: str) -> None:
    """A stall pauses once: at an event boundary, inside a data line, or before content."""
    reads, error = timed_reads(
        base,
        "/v1/chat/completions",
        knobs(tokens=6, interval=0.01, ttft=0.01, stall=0.5, stall_after=2, stall_mode=mode),
    )
    assert error is None
    gaps = [(reads[i + 1][0] - reads[i][0], i) for i in range(len(reads) - 1)]
    gap, at = max(gaps)
    assert gap >= 0.45
    before = b"".join(c for _, c in reads[: at + 1])
    assert chat_text(sse_data(b"".join(c for _, c in reads))) == expected_text(6)
    if mode == "line":
        tail = before.rsplit(b"\n", 1)[1]
        assert tail.startswith(b"data: {")  # the pause fell inside a data line
    else:
        assert before.endswith(b"\n\n")
        done = chat_text(sse_data(before))
        assert done == expected_text(0 if mode == "first" else 2)


# --- failures ------------------------------------------------------------------------------------


def test_abort_after_makes_sdks_raise(
    oai: openai.OpenAI, claude: anthropic.Anthropic, server_log: list[logging.LogRecord]
) -> None:
    """abort-after cuts the connection mid-stream; both SDKs raise, and nothing is logged."""
    headers = knobs(tokens=8, abort_after=3, interval=0)
    seen: list[str] = []
    stream = oai.chat.completions.create(model="m", messages=[], stream=True, extra_headers=headers)
    with pytest.raises(CONNECTION_ERRORS):
        seen.extend(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "".join(seen) == expected_text(3)
    ask: dict[str, Any] = {"model": "m", "max_tokens": 9, "messages": []}
    with (
        pytest.raises(CONNECTION_ERRORS),
        claude.messages.stream(**ask, extra_headers=headers) as stream_,
    ):
        seen = list(stream_.text_stream)
    assert "".join(seen) == expected_text(3)
    assert server_log == []


@pytest.mark.parametrize("mode", ["event", "line"])
def test_abort_leaves_no_terminator(base: str, mode: str) -> None:
    """The body ends without the 0-chunk, at an event boundary or inside a data line."""
    head, chunks, terminated = raw_exchange(
        base, "/v1/messages", knobs(tokens=4, abort_after=2, abort_mode=mode, interval=0)
    )
    assert head.startswith(b"HTTP/1.1 200")
    assert not terminated
    body = b"".join(chunks)
    assert body.count(b"event: content_block_delta") == 2 + (mode == "line")
    if mode == "event":
        assert body.endswith(b"\n\n")
    else:
        assert chunks[-1].startswith(b"event: content_block_delta\ndata: {")
        assert not chunks[-1].endswith(b"\n")


@pytest.mark.parametrize(
    ("status", "openai_error", "anthropic_error"),
    [
        (429, openai.RateLimitError, anthropic.RateLimitError),
        (400, openai.BadRequestError, anthropic.BadRequestError),
        (401, openai.AuthenticationError, anthropic.AuthenticationError),
        (500, openai.InternalServerError, anthropic.InternalServerError),
        (529, openai.InternalServerError, anthropic.OverloadedError),
    ],
)
def test_status_knob_raises_sdk_errors(
    oai: openai.OpenAI,
    claude: anthropic.Anthropic,
    status: int,
    openai_error: type[Exception],
    anthropic_error: type[Exception],
) -> None:
    """x-mock-status answers with the provider's error body, which each SDK maps to its class."""
    with pytest.raises(openai_error) as caught:
        oai.chat.completions.create(
            model="m", messages=[], stream=True, extra_headers=knobs(status=status)
        )
    assert isinstance(caught.value, openai.APIStatusError)
    assert caught.value.status_code == status
    with pytest.raises(anthropic_error) as caught_:
        claude.messages.create(
            model="m", max_tokens=9, messages=[], extra_headers=knobs(status=status)
        )
    assert isinstance(caught_.value, anthropic.APIStatusError)
    body = caught_.value.body
    assert isinstance(body, dict)
    assert body["type"] == "error"
    expected = {429: "rate_limit_error", 529: "overloaded_error", 500: "api_error"}
    assert body["error"]["type"] == expected.get(status, body["error"]["type"])


def test_bad_knobs_are_400(base: str) -> None:
    """Bad or unknown x-mock-* headers get a 400 that names each one."""
    response = httpx.post(
        base + "/v1/chat/completions",
        json={},
        headers={"x-mock-ttft": "soon", "x-mock-tokns": "3", "x-mock-kind": "poem"},
    )
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    for name in ("x-mock-ttft", "x-mock-tokns", "x-mock-kind"):
        assert name in message
    response = httpx.post(
        base + "/v1/messages", json={"stream": True}, headers=knobs(tokens=2, abort_after=3)
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


# --- framing knobs -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "ending"), [("crlf", b"\r\n"), ("cr", b"\r")])
def test_line_endings(base: str, name: str, ending: bytes) -> None:
    """Every SSE line, the blank one included, ends with the chosen line ending."""
    reads, error = timed_reads(base, "/v1/messages", knobs(line_ending=name, tokens=3, ttft=0))
    assert error is None
    body = b"".join(c for _, c in reads)
    if name == "cr":
        assert b"\n" not in body
    assert body.endswith(b"data: {" + b'"type":"message_stop"}' + ending + ending)
    assert body.count(ending * 2) == body.count(b"event: ") == 9


def test_gzip_flushes_each_event(base: str) -> None:
    """gzip bodies decode to the same events, and every HTTP chunk decodes on its own."""
    head, chunks, terminated = raw_exchange(
        base, "/v1/chat/completions", knobs(gzip=1, tokens=5, interval=0)
    )
    assert terminated
    assert b"content-encoding: gzip" in head.lower()
    decoder = zlib.decompressobj(wbits=31)
    events = [decoder.decompress(chunk) for chunk in chunks[:-1]]
    assert all(event.startswith(b"data: ") and event.endswith(b"\n\n") for event in events)
    decoded = b"".join(events) + decoder.decompress(chunks[-1]) + decoder.flush()
    assert decoder.eof
    assert chat_text(sse_data(decoded)) == expected_text(5)


def test_one_chunk_per_event_chunk_size_and_ids(base: str) -> None:
    """Each event is one HTTP chunk; x-mock-chunk-size splits it; x-mock-id numbers events."""
    _, chunks, terminated = raw_exchange(base, "/v1/chat/completions", knobs(tokens=3, id=1))
    assert terminated
    events = chunks  # the final empty body message adds no chunk of its own
    assert len(events) == 1 + 3 + 1 + 1  # role, tokens, finish, [DONE]
    assert [e.split(b"\n", 1)[0] for e in events] == [b"id: %d" % i for i in range(1, 7)]
    assert all(e.endswith(b"\n\n") for e in events)
    _, pieces, terminated = raw_exchange(
        base, "/v1/chat/completions", knobs(tokens=3, chunk_size=7)
    )
    assert terminated
    assert all(0 < len(p) <= 7 for p in pieces)
    assert chat_text(sse_data(b"".join(pieces))) == expected_text(3)


# --- other providers -----------------------------------------------------------------------------


def test_gemini_shapes(base: str) -> None:
    """Gemini: SSE chunks and a progressive JSON array parse, ending with STOP and usage."""
    path = "/v1beta/models/mock-gemini:streamGenerateContent"
    _, chunks, _ = raw_exchange(base, path + "?alt=sse", knobs(tokens=4, interval=0))
    objs = [json.loads(d) for d in sse_data(b"".join(chunks))]
    assert len(objs) == 4
    text = "".join(o["candidates"][0]["content"]["parts"][0]["text"] for o in objs)
    assert text == expected_text(4)
    assert objs[-1]["candidates"][0]["finishReason"] == "STOP"
    assert objs[-1]["usageMetadata"]["candidatesTokenCount"] == 4
    assert objs[0]["modelVersion"] == "mock-gemini"
    head, chunks, _ = raw_exchange(base, path, knobs(tokens=3, interval=0))
    assert b"application/json" in head
    assert chunks[0].startswith(b"[{")
    assert chunks[1].startswith(b",\r\n{")
    assert chunks[-1] == b"]"
    array = json.loads(b"".join(chunks))
    assert len(array) == 3
    response = httpx.post(
        base + "/v1beta/models/g:generateContent", json={}, headers=knobs(tokens=2)
    )
    assert response.json()["candidates"][0]["content"]["parts"][0]["text"] == expected_text(2)


def test_ollama_ndjson(base: str) -> None:
    """Ollama streams by default, one JSON object per line, ending with done and counts."""
    for path, field in (("/api/chat", "message"), ("/api/generate", "response")):
        head, chunks, _ = raw_exchange(
            base, path, knobs(tokens=5, interval=0), body=b'{"model": "llama"}'
        )
        assert b"application/x-ndjson" in head
        assert all(c.endswith(b"\n") and c.count(b"\n") == 1 for c in chunks)
        lines = [json.loads(line) for line in b"".join(chunks).splitlines()]
        parts = [o[field]["content"] if field == "message" else o[field] for o in lines[:-1]]
        assert "".join(parts) == expected_text(5)
        assert lines[-1]["done"] is True
        assert lines[-1]["eval_count"] == 5
        assert lines[0]["model"] == "llama"
    response = httpx.post(base + "/api/chat", json={"stream": False}, headers=knobs(tokens=3))
    assert response.json()["message"]["content"] == expected_text(3)


# --- test helpers: echo and script ---------------------------------------------------------------


def test_echo_reports_the_request(base: str) -> None:
    """/echo returns method, paths, query, the headers in order, and the body."""
    response = httpx.request(
        "PATCH",
        base + "/echo/v1/a%2Fb?x=1&y",
        content=b"payload",
        headers=[("X-One", "1"), ("x-two", "2"), ("X-One", "again")],
    )
    echoed = response.json()
    assert echoed["method"] == "PATCH"
    assert echoed["path"] == "/echo/v1/a/b"
    assert echoed["raw_path"] == "/echo/v1/a%2Fb"
    assert echoed["query"] == "x=1&y"
    names = [h for h in echoed["headers"] if h[0].startswith("x-")]
    assert names == [["x-one", "1"], ["x-two", "2"], ["x-one", "again"]]
    assert (echoed["body"], echoed["body_len"]) == ("payload", 7)


def script(chunks: list[tuple[bytes, float]], end: str, headers: list[list[str]]) -> bytes:
    """A /mock/script request body."""
    spec = {
        "status": 200,
        "headers": headers,
        "chunks": [{"b64": base64.b64encode(b).decode(), "delay": d} for b, d in chunks],
        "end": end,
    }
    return json.dumps(spec).encode()


def test_script_exact_bytes_and_abort(base: str) -> None:
    """The script endpoint sends exactly the given chunks, then completes or aborts."""
    parts = [(b"data: 1\r", 0.0), (b"\n\r\n", 0.05), (b": x\n", 0.0)]
    sse = [["content-type", "text/event-stream"]]
    for end in ("complete", "abort"):
        head, chunks, terminated = raw_exchange(base, "/mock/script", {}, script(parts, end, sse))
        assert head.startswith(b"HTTP/1.1 200")
        assert b"content-type: text/event-stream" in head
        assert chunks[:3] == [p for p, _ in parts]
        assert terminated == (end == "complete")
    body = b'{"ok": true}'
    fixed = [["content-type", "application/json"], ["content-length", str(len(body))]]
    scripted = script([(body[:4], 0.0), (body[4:], 0.02)], "complete", fixed)
    response = httpx.post(base + "/mock/script", content=scripted)
    assert response.headers["content-length"] == str(len(body))
    assert "transfer-encoding" not in response.headers
    assert response.json() == {"ok": True}


def test_real_errors_still_log(base: str, server_log: list[logging.LogRecord]) -> None:
    """The log filter hides only deliberate aborts: a broken script is still logged."""
    too_long = [["content-length", "1"]]
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(base + "/mock/script", content=script([(b"12", 0.0)], "complete", too_long))
    assert [r.getMessage() for r in server_log] == ["Exception in ASGI application\n"]


def test_serve_until_cancelled() -> None:
    """serve() answers on its port; cancelling it mid-stream closes everything, quietly."""
    log = Collect()

    async def main() -> None:
        with bind_loopback() as sock:
            port = sock.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        async with asyncio.TaskGroup() as group, httpx.AsyncClient() as client:
            task = group.create_task(serve("127.0.0.1", port))
            for _ in range(500):
                try:
                    response = await client.get(url + "/v1/models")
                    break
                except httpx.ConnectError:
                    await asyncio.sleep(0.01)
            assert response.json()["object"] == "list"
            logging.getLogger("uvicorn.error").addHandler(log)  # after serve()'s dictConfig
            async with client.stream(
                "POST", url + "/v1/chat/completions", json={"stream": True}, headers=knobs(ttft=0)
            ) as stream:
                chunks = stream.aiter_raw()
                await anext(chunks)
                task.cancel()
                with pytest.raises(httpx.RemoteProtocolError):
                    async for _ in chunks:
                        pass
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(url + "/v1/models")

    try:
        asyncio.run(main())
    finally:
        logging.getLogger("uvicorn.error").removeHandler(log)
    gc.collect()  # an unclosed server-side socket would warn here, and warnings are errors
    assert log.records == []
