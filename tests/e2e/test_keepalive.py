"""SSE keepalive: `: keepalive\\n` comments fill the silences of an identity-encoded
`text/event-stream`, only where a line of the upstream stream has ended.

The upstream is the mock (its stall knobs), its byte-exact /mock/script endpoint, or a raw
TCP server replaying a captured stream. Every test reads the real proxy over real sockets,
and checks the two halves of the contract: comments do come while the upstream is silent,
and removing them gives back the upstream's bytes exactly (nothing else added, no comment
inside a line, no blank line of their own).
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import anthropic
import openai
import pytest

from streamproxy.mock_upstream import expected_text
from tests import client
from tests.rawserver import RawServer, chunk, raw_server

COMMENT = b": keepalive\n"
KEEPALIVES = "streamproxy_keepalives_sent_total"
UPSTREAM = {"upstream": "test"}
CHAT = json.dumps({"model": "m", "stream": True}).encode()
JSON_HEADERS = [("content-type", "application/json")]


# --- helpers -------------------------------------------------------------------------------------


def strip_keepalives(body: bytes) -> tuple[bytes, int]:
    """The body without its keepalive comment lines, and how many there were. Fails when a
    comment does not start a line: it would then sit inside one of the upstream's lines."""
    kept: list[bytes] = []
    pos = count = 0
    while (at := body.find(COMMENT, pos)) != -1:
        assert at == 0 or body[at - 1 : at] == b"\n", (
            f"comment not at a line start: {body[max(0, at - 40) : at + 12]!r}"
        )
        kept.append(body[pos:at])
        pos = at + len(COMMENT)
        count += 1
    kept.append(body[pos:])
    return b"".join(kept), count


def comment_times(response: client.RawResponse) -> list[float]:
    """Arrival times of the chunks that carry a keepalive comment."""
    return [t for t, data in response.chunks if COMMENT in data]


def data_times(response: client.RawResponse) -> list[float]:
    """Arrival times of the chunks that carry upstream bytes (anything but a comment)."""
    return [t for t, data in response.chunks if data != COMMENT]


def normalize(body: bytes) -> bytes:
    """Blank out what differs between two runs of the same mock stream (ids, timestamps)."""
    return re.sub(rb'"(id|created|created_at)":("[^"]*"|\d+)', rb'"\1":0', body)


def chat(url: str, knobs: dict[str, str], path: str = "/v1/chat/completions") -> client.RawResponse:
    """One streamed chat request with `x-mock-*` knobs (6 tokens unless they say otherwise),
    read whole by the raw client."""
    headers = [*JSON_HEADERS, *{"x-mock-tokens": "6", **knobs}.items()]
    return client.request(url, "POST", path, headers=headers, body=CHAT, timeout=15)


def scripted(url: str, chunks: list[bytes | tuple[bytes, float]], **kwargs) -> client.RawResponse:
    """Replay exact upstream writes through the mock's /mock/script endpoint."""
    body = client.script(chunks, **kwargs)
    return client.request(url, "POST", "/mock/script", body=body, timeout=15)


def stall_gap(response: client.RawResponse) -> tuple[float, float]:
    """(last upstream chunk before the first comment, first upstream chunk after it)."""
    first_comment = comment_times(response)[0]
    before = max(t for t in data_times(response) if t <= first_comment)
    after = min(t for t in data_times(response) if t > first_comment)
    return before, after


# --- stalls at a line boundary -------------------------------------------------------------------


def test_comments_fill_a_stall_at_an_event_boundary(start_proxy, mock_url):
    """During a 2 s stall between events, comments arrive every interval; without them the
    body is the upstream's, and the counter matches the comment lines."""
    with start_proxy(mock_url, keepalive=0.5) as proxy:
        response = chat(proxy.url, {"x-mock-stall": "2"})
        sent = proxy.metric(KEEPALIVES, UPSTREAM)
    baseline = chat(mock_url, {})  # the same stream straight from the mock, without the stall
    assert response.complete
    body, count = strip_keepalives(response.body)
    assert normalize(body) == normalize(baseline.body)
    assert count >= 2, response.chunks
    assert sent == count
    before, after = stall_gap(response)
    assert after - before > 1.5  # the comments really fell inside the stall
    assert comment_times(response)[0] - before < 1.0  # the first came after ~0.5 s, not at 2 s


def test_comments_fill_the_silence_before_the_first_event(start_proxy, mock_url):
    """A stall before any body byte (right after the headers) is filled with comments too."""
    knobs = {"x-mock-stall": "1.5", "x-mock-stall-mode": "first", "x-mock-role-chunk": "0"}
    with start_proxy(mock_url, keepalive=0.5) as proxy:
        response = chat(proxy.url, knobs)
        sent = proxy.metric(KEEPALIVES, UPSTREAM)
    baseline = chat(mock_url, {"x-mock-role-chunk": "0"})
    assert response.complete
    body, count = strip_keepalives(response.body)
    assert normalize(body) == normalize(baseline.body)
    first_time, first_data = response.chunks[0]
    assert first_data == COMMENT  # the first body bytes are a comment...
    assert first_time < 1.0  # ...sent after one interval, not after the 1.5 s stall
    assert count >= 2
    assert sent == count


# --- never inside a line -------------------------------------------------------------------------


def test_no_comment_inside_a_stalled_line(start_proxy, mock_url):
    """A 3 s stall in the middle of a data line gets no comment: the bytes are exactly the
    upstream's, and nothing is counted."""
    knobs = {"x-mock-stall": "3", "x-mock-stall-mode": "line"}
    with start_proxy(mock_url, keepalive=0.5) as proxy:
        response = chat(proxy.url, knobs)
        sent = proxy.metric(KEEPALIVES, UPSTREAM)
    baseline = chat(mock_url, {})
    assert response.complete
    assert COMMENT not in response.body
    assert normalize(response.body) == normalize(baseline.body)
    assert sent == 0
    times = data_times(response)
    assert max(b - a for a, b in itertools.pairwise(times)) > 2.5  # it did stall


def test_comments_wait_for_the_line_to_end(start_proxy, mock_url):
    """Scripted: no comment while the upstream stands mid-line for 1.5 s, then comments
    during the next stall, which falls at a line boundary."""
    chunks: list[bytes | tuple[bytes, float]] = [
        b'data: {"partial',
        (b'": "rest"}\n\n', 1.5),
        (b"data: next\n\n", 1.0),
    ]
    with start_proxy(mock_url, keepalive=0.3) as proxy:
        response = scripted(proxy.url, chunks)
        sent = proxy.metric(KEEPALIVES, UPSTREAM)
    assert response.complete
    body, count = strip_keepalives(response.body)
    assert body == b'data: {"partial": "rest"}\n\ndata: next\n\n'
    assert response.body.startswith(b'data: {"partial": "rest"}\n\n')  # nothing mid-line
    assert count >= 2
    assert sent == count
    rest_arrived = next(t for t, data in response.chunks if data.startswith(b'": "rest"'))
    assert all(t > rest_arrived for t in comment_times(response))


def test_no_comment_between_cr_and_lf(start_proxy, mock_url):
    """A CRLF split across writes is not a line end until the LF comes: no comment goes
    between the CR and the LF (it would turn the LF into a blank line and dispatch early)."""
    chunks: list[bytes | tuple[bytes, float]] = [
        b"data: x\r",
        (b"\n\r\n", 1.5),
        (b"data: y\r\n\r\n", 0.8),
    ]
    with start_proxy(mock_url, keepalive=0.3) as proxy:
        response = scripted(proxy.url, chunks)
        sent = proxy.metric(KEEPALIVES, UPSTREAM)
    assert response.complete
    assert response.body.startswith(b"data: x\r\n\r\n")  # nothing while the CR was pending
    body, count = strip_keepalives(response.body)
    assert body == b"data: x\r\n\r\ndata: y\r\n\r\n"
    assert count >= 1  # the later stall, after a complete CRLF, does get comments
    assert sent == count


# --- the SDKs (openai-python #2722: a blank line after `id:` dispatches an empty event) ----------


def _captured_events(mock_url: str, path: str) -> list[bytes]:
    """A real mock stream with `id:` lines, split into its events (each with its blank line)."""
    response = chat(mock_url, {"x-mock-id": "1"}, path=path)
    assert response.complete
    return [event + b"\n\n" for event in response.body.split(b"\n\n") if event]


def _pauses_inside_events(events: list[bytes], pause: float) -> list[tuple[bytes, float]]:
    """Write every line of every event on its own; pause before the second line of event 2
    and before the closing blank line of event 3, so comments land inside events."""
    writes: list[tuple[bytes, float]] = []
    for index, event in enumerate(events):
        lines = event.splitlines(keepends=True)
        for number, line in enumerate(lines):
            inside = (index == 2 and number == 1) or (index == 3 and number == len(lines) - 1)
            writes.append((line, pause if inside else 0.0))
    return writes


@pytest.fixture
def replay() -> Iterator[tuple[list[tuple[bytes, float]], RawServer]]:
    """A raw upstream that answers any request with the writes put in the list."""
    writes: list[tuple[bytes, float]] = []

    async def handler(reader, writer, state) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        )
        for data, delay in writes:
            await asyncio.sleep(delay)
            writer.write(chunk(data))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    with raw_server(handler) as server:
        yield writes, server


def _openai_text(base_url: str, headers: dict[str, str]) -> str:
    with openai.OpenAI(base_url=base_url + "/v1", api_key="k", max_retries=0) as sdk:
        stream = sdk.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers=headers,
        )
        return "".join(event.choices[0].delta.content or "" for event in stream if event.choices)


def _anthropic_text(base_url: str, headers: dict[str, str]) -> str:
    with (
        anthropic.Anthropic(base_url=base_url, api_key="k", max_retries=0) as sdk,
        sdk.messages.stream(
            model="m",
            max_tokens=64,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers=headers,
        ) as stream,
    ):
        return "".join(stream.text_stream)


SDKS = {
    "openai": (_openai_text, "/v1/chat/completions"),
    "anthropic": (_anthropic_text, "/v1/messages"),
}


@pytest.mark.parametrize("sdk", list(SDKS))
def test_sdk_reads_events_with_ids_and_comments(start_proxy, mock_url, replay, sdk):
    """The official SDK reads a stream whose events carry `id:` lines, with comments between
    events and inside them, and gets exactly the text it gets without keepalive."""
    read_text, path = SDKS[sdk]
    knobs = {"x-mock-id": "1", "x-mock-tokens": "8", "x-mock-stall": "0.8"}
    with start_proxy(mock_url, keepalive=0.25) as proxy:
        assert read_text(proxy.url, knobs) == expected_text(8)
        between = proxy.metric(KEEPALIVES, UPSTREAM)
    assert between >= 2  # the comments did come, between events

    writes, upstream = replay
    writes.extend(_pauses_inside_events(_captured_events(mock_url, path), pause=0.6))
    with start_proxy(upstream.url, keepalive=0.25) as proxy:
        assert read_text(proxy.url, {}) == expected_text(6)
        inside = proxy.metric(KEEPALIVES, UPSTREAM)
    assert inside >= 2  # at least one comment in each of the two pauses inside events


# --- off, and not for other bodies ---------------------------------------------------------------


def test_interval_zero_sends_nothing(start_proxy, mock_url):
    """keepalive.interval 0 turns keepalive off: a 2 s stall stays silent."""
    with start_proxy(mock_url, keepalive=0) as proxy:
        response = chat(proxy.url, {"x-mock-stall": "2"})
        sent = proxy.metric(KEEPALIVES, UPSTREAM)
    assert response.complete
    assert COMMENT not in response.body
    assert sent == 0
    times = data_times(response)
    assert max(b - a for a, b in itertools.pairwise(times)) > 1.5


def _gzip_cut_after_newline() -> tuple[bytes, bytes, bytes]:
    """A gzip SSE body cut right after a 0x0A byte of its *compressed* bytes: a scanner fed
    the raw bytes would think a line ended there. Returns (plain, head, tail)."""
    for n in range(1, 1000):
        plain = b"".join(b'data: {"token": %d}\n\n' % (i * i) for i in range(n))
        packed = gzip.compress(plain, mtime=0)
        cut = packed.find(b"\n", 10) + 1  # after the 10-byte gzip header
        if cut:
            return plain, packed[:cut], packed[cut:]
    raise AssertionError("no compressed stream with a newline byte")


GZIP_PLAIN, GZIP_HEAD, GZIP_TAIL = _gzip_cut_after_newline()
NOT_SSE: dict[str, tuple[list[bytes | tuple[bytes, float]], dict[str, object]]] = {
    # Every stall falls right after a newline: only the content type can keep comments out.
    "ndjson": (
        [b'{"n": 1}\n', (b'{"n": 2, "done": true}\n', 1.0)],
        {"content_type": "application/x-ndjson"},
    ),
    "json": ([b'{\n  "a": 1,\n', (b'  "b": 2\n}\n', 1.0)], {"content_type": "application/json"}),
    "gzip-sse": ([GZIP_HEAD, (GZIP_TAIL, 1.0)], {"headers": [("content-encoding", "gzip")]}),
}


@pytest.mark.parametrize("kind", list(NOT_SSE))
def test_no_comment_in_other_bodies(start_proxy, mock_url, kind):
    """NDJSON, JSON and gzip-encoded SSE get no injected byte during a stall, even at a
    line boundary: the body is the upstream's, byte for byte."""
    chunks, options = NOT_SSE[kind]
    with start_proxy(mock_url, keepalive=0.2) as proxy:
        response = scripted(proxy.url, chunks, **options)
        sent = proxy.metric(KEEPALIVES, UPSTREAM)
    assert response.complete
    assert response.body == b"".join(c if isinstance(c, bytes) else c[0] for c in chunks)
    assert sent == 0
    if kind == "gzip-sse":
        assert gzip.decompress(response.body) == GZIP_PLAIN


def test_no_comment_in_sse_with_content_length(start_proxy, mock_url):
    """An SSE body framed by Content-Length gets no comment during a stall (one would
    overflow the declared length): it arrives exact and complete."""
    chunks: list[bytes | tuple[bytes, float]] = [b"data: a\n\n", (b"data: b\n\n", 1.0)]
    with start_proxy(mock_url, keepalive=0.2) as proxy:
        response = scripted(proxy.url, chunks, headers=[("content-length", "18")])
    assert response.complete
    assert response.body == b"data: a\n\ndata: b\n\n"


def test_no_comment_in_mock_ndjson_or_gzip(start_proxy, mock_url):
    """The mock's own Ollama NDJSON stream and its gzip SSE stream pass a 0.8 s stall
    without a single comment (NDJSON lines all parse; gzip decodes to the plain stream)."""
    gzip_knobs = {"x-mock-stall": "0.8", "x-mock-gzip": "1", "x-mock-id": "1"}
    with start_proxy(mock_url, keepalive=0.2) as proxy, ThreadPoolExecutor(2) as pool:
        ndjson_run = pool.submit(chat, proxy.url, {"x-mock-stall": "0.8"}, path="/api/chat")
        gzipped = chat(proxy.url, gzip_knobs)
        ndjson = ndjson_run.result()
        sent = proxy.metric(KEEPALIVES, UPSTREAM)
    assert sent == 0
    assert ndjson.complete
    assert gzipped.complete
    lines = [json.loads(line) for line in ndjson.body.splitlines()]
    assert "".join(line["message"]["content"] for line in lines) == expected_text(6)
    plain = chat(mock_url, {"x-mock-id": "1"})  # the same stream, uncompressed, direct
    assert normalize(gzip.decompress(gzipped.body)) == normalize(plain.body)


# --- repeats -------------------------------------------------------------------------------------


def test_comments_repeat_while_silence_lasts(start_proxy, mock_url):
    """A 2 s stall with a 0.4 s interval gives several comments, spaced out, each alone on
    its own line (no blank line, nothing joined to them)."""
    with start_proxy(mock_url, keepalive=0.4) as proxy:
        response = scripted(proxy.url, [b"data: a\n\n", (b"data: b\n\n", 2.0)])
        sent = proxy.metric(KEEPALIVES, UPSTREAM)
    assert response.complete
    assert response.body == b"data: a\n\n" + COMMENT * int(sent) + b"data: b\n\n"
    assert sent >= 3
    times = comment_times(response)
    assert len(times) == sent
    assert min(b - a for a, b in itertools.pairwise(times)) > 0.2  # not a burst
