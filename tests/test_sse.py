"""SSEScanner: every vector whole, byte by byte and split at every offset (h11's `tr()`)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, strategies as st

from streamproxy.sse import SSEEvent, SSEScanner

BOM = b"\xef\xbb\xbf"
MiB = 1 << 20


def ev(data: bytes, event: bytes | None = None) -> SSEEvent:
    return SSEEvent(event=event, data=data, truncated=False)


def truncated(event: bytes | None = None) -> SSEEvent:
    return SSEEvent(event=event, data=b"", truncated=True)


Flags = tuple[bool, bool]


def flags(scanner: SSEScanner) -> Flags:
    return (scanner.at_line_boundary, scanner.at_event_boundary)


def bytewise(data: bytes, max_event_bytes: int) -> tuple[list[SSEEvent], list[Flags]]:
    """Feed one byte at a time; flags[p] describes the stream after its first p bytes."""
    scanner = SSEScanner(max_event_bytes)
    events: list[SSEEvent] = []
    seen = [flags(scanner)]
    for i in range(len(data)):
        events += scanner.feed(data[i : i + 1])
        seen.append(flags(scanner))
    return events + scanner.finish(), seen


def chunked(chunks: list[bytes], max_event_bytes: int) -> tuple[list[SSEEvent], list[Flags]]:
    """Feed the given chunks; return the events and the flags after each chunk."""
    scanner = SSEScanner(max_event_bytes)
    events: list[SSEEvent] = []
    seen = []
    for chunk in chunks:
        events += scanner.feed(chunk)
        seen.append(flags(scanner))
    return events + scanner.finish(), seen


def tr(
    data: bytes,
    expected: list[SSEEvent],
    *,
    max_event_bytes: int = MiB,
    offsets: range | list[int] | None = None,
) -> list[Flags]:
    """Check a vector whole, byte by byte, and split at every offset (or at `offsets`):
    the events, and the flags at each chunk end, must not depend on the chunking."""
    events, at = bytewise(data, max_event_bytes)
    assert events == expected
    assert chunked([data], max_event_bytes) == (expected, [at[-1]])
    for i in range(len(data) + 1) if offsets is None else offsets:
        assert chunked([data[:i], data[i:]], max_event_bytes) == (expected, [at[i], at[-1]]), i
    return at


def reference(data: bytes, max_event_bytes: int) -> list[SSEEvent]:
    """A whole-buffer WHATWG parser with the scanner's truncation rules, as an oracle."""
    data = data.removeprefix(BOM)
    lines = re.split(rb"\r\n|\r|\n", data)[:-1]  # the last piece is unterminated
    events: list[SSEEvent] = []
    event: bytes | None = None
    values: list[bytes] = []
    cut = False
    for line in lines:
        if not line:
            if values:
                events.append(SSEEvent(event, b"" if cut else b"\n".join(values), cut))
            event, values, cut = None, [], False
            continue
        if line.startswith(b":"):
            continue
        name, _, value = line.partition(b":")
        value = value.removeprefix(b" ")
        overlong = len(line) > max_event_bytes + 8
        if name == b"data":
            values.append(value)
            cut = cut or overlong or len(b"\n".join(values)) > max_event_bytes
        elif name == b"event":
            event = None if overlong else value
            cut = cut or overlong
    return events


def reference_flags(prefix: bytes) -> Flags:
    """The boundary flags after `prefix`, computed from the whole prefix at once."""
    if len(prefix) < 3 and BOM.startswith(prefix) and prefix:
        return (False, False)
    body = prefix.removeprefix(BOM)
    line = body == b"" or body.endswith(b"\n")
    if not line:
        return (False, False)
    pending = False
    for text in reversed(re.split(rb"\r\n|\r|\n", body)[:-1]):
        if not text:
            break
        pending = pending or not text.startswith(b":")
    return (True, not pending)


# --- vectors -------------------------------------------------------------------------


def test_lf() -> None:
    """LF-terminated lines dispatch on the blank line."""
    at = tr(b"data: hello\n\ndata: world\n\n", [ev(b"hello"), ev(b"world")])
    assert at[len(b"data: hello\n")] == (True, False)
    assert at[len(b"data: hello\n\n")] == (True, True)


def test_crlf() -> None:
    """CRLF line ends work like LF, and the LF of a CRLF is not a blank line."""
    tr(b"event: add\r\ndata: 1\r\n\r\ndata: 2\r\n\r\n", [ev(b"1", b"add"), ev(b"2")])


def test_lone_cr() -> None:
    """A lone CR ends a line; two CRs dispatch an event."""
    tr(b"data: a\r\rdata: b\r\r", [ev(b"a"), ev(b"b")])


def test_mixed_line_ends() -> None:
    """LF, CRLF and CR may be mixed in one stream."""
    tr(b"data: a\ndata: b\r\ndata: c\r\r\ndata: d\n\r", [ev(b"a\nb\nc"), ev(b"d")])


def test_trailing_cr_is_not_a_boundary() -> None:
    """A CR as the last byte is not a line boundary: the LF of a CRLF may follow."""
    at = tr(b"data: x\r\n\r\n", [ev(b"x")])
    assert at == [
        (True, True),
        *[(False, False)] * len(b"data: x\r"),
        (True, False),  # after "data: x\r\n"
        (False, False),  # after the blank line's CR: the event is dispatched, the LF unknown
        (True, True),
    ]


def test_crlf_split_across_chunks() -> None:
    """A CRLF split over two chunks is one line end, not a line end plus a blank line."""
    scanner = SSEScanner()
    assert scanner.feed(b"data: x\r") == []
    assert not scanner.at_line_boundary
    assert scanner.feed(b"\n") == []  # a blank line here would have dispatched early
    assert flags(scanner) == (True, False)
    assert scanner.feed(b"\r") == [ev(b"x")]
    assert not scanner.at_line_boundary
    assert scanner.feed(b"\ndata: y\n\n") == [ev(b"y")]
    assert flags(scanner) == (True, True)


def test_cr_then_other_byte_starts_a_line() -> None:
    """After a trailing CR, a byte other than LF starts the next line."""
    scanner = SSEScanner()
    scanner.feed(b"data: x\r")
    assert scanner.feed(b"\r") == [ev(b"x")]
    assert scanner.feed(b"data: y\r") == []
    assert scanner.feed(b"d") == []
    assert not scanner.at_line_boundary


def test_bom_at_start_is_skipped() -> None:
    """A UTF-8 BOM at the very start is ignored, even when split across chunks."""
    at = tr(BOM + b"data: x\n\n", [ev(b"x")])
    assert at[:4] == [(True, True), (False, False), (False, False), (True, True)]


def test_bom_prefix_that_is_not_a_bom() -> None:
    """Bytes that only start like a BOM are part of the first line."""
    tr(b"\xef\xbbdata: x\n\ndata: y\n\n", [ev(b"y")])
    tr(b"\xef\n\ndata: y\n\n", [ev(b"y")])


def test_bom_later_in_stream_is_data() -> None:
    """Only a BOM at the very start is skipped."""
    tr(b"data: x\n\n" + BOM + b"data: y\n\n", [ev(b"x")])
    tr(BOM + BOM + b"data: y\n\n", [])


def test_comment_lines() -> None:
    """Comment lines are ignored and do not make an event pending."""
    at = tr(b": ping\n\n:\n: keepalive\ndata: x\n: mid\n\n", [ev(b"x")])
    assert at[len(b": ping\n")] == (True, True)
    assert at[len(b": ping\n\n:\n: keepalive\n")] == (True, True)
    assert at[len(b": ping\n\n:\n: keepalive\ndata: x\n: mid\n")] == (True, False)


def test_multiline_data() -> None:
    """Several data lines join with LF; an empty data line contributes an empty line."""
    tr(b"data: a\ndata: b\ndata:\n\n", [ev(b"a\nb\n")])
    tr(b'data: {"a":\ndata: 1}\n\n', [ev(b'{"a":\n1}')])


def test_id_retry_event_fields() -> None:
    """id/retry are fields (pending) but not data; event sets the type."""
    at = tr(b"id: 7\nretry: 1000\nevent: update\ndata: {}\n\n", [ev(b"{}", b"update")])
    assert at[len(b"id: 7\n")] == (True, False)


def test_event_without_data_is_not_dispatched() -> None:
    """A blank line after fields but no data line dispatches nothing, but resets state."""
    at = tr(b"id: 8\n\nevent: a\n\ndata: x\n\n", [ev(b"x")])
    assert at[len(b"id: 8\n")] == (True, False)
    assert at[len(b"id: 8\n\n")] == (True, True)


def test_empty_data_is_dispatched() -> None:
    """`data:` with an empty value still dispatches an event with empty data."""
    tr(b"event: ping\ndata:\n\n", [ev(b"", b"ping")])


def test_event_type_resets_after_dispatch() -> None:
    """The event type applies to one event only."""
    tr(b"event: a\ndata: 1\n\ndata: 2\n\n", [ev(b"1", b"a"), ev(b"2")])


def test_unknown_field_makes_event_pending() -> None:
    """An unknown field is ignored but still means an event has started."""
    at = tr(b"foo: bar\ndata: x\n\n", [ev(b"x")])
    assert at[len(b"foo: bar\n")] == (True, False)


def test_unterminated_event_dropped_at_eof() -> None:
    """An event without its closing blank line is dropped at EOF (WHATWG)."""
    at = tr(b"data: a\n\ndata: partial\n", [ev(b"a")])
    assert at[-1] == (True, False)
    tr(b"data: a\n\ndata: partial", [ev(b"a")])


def test_utf8_character_split_across_writes() -> None:
    """A multi-byte UTF-8 character split across chunks arrives intact."""
    text = "héllo ✓ 日本 🎉".encode()
    tr(b"data: " + text + b"\n\n", [ev(text)])


def test_data_without_colon() -> None:
    """A line `data` with no colon is a data field with an empty value."""
    tr(b"data\n\n", [ev(b"")])
    tr(b"data\ndata\n\n", [ev(b"\n")])


def test_only_one_space_is_stripped() -> None:
    """Exactly one space after the colon is stripped, no more."""
    tr(b"data:x\n\n", [ev(b"x")])
    tr(b"data: x\n\n", [ev(b"x")])
    tr(b"data:  x\n\n", [ev(b" x")])
    tr(b"data:\tx\n\n", [ev(b"\tx")])
    tr(b"event:  a\ndata: x:y\n\n", [ev(b"x:y", b" a")])


def test_256_kib_event() -> None:
    """A 256 KiB event is delivered whole under the default limit."""
    payload = b"x" * (256 << 10)
    data = b"data: " + payload + b"\n\n"
    offsets = [*range(16), *range(16, len(data), 4099), *range(len(data) - 16, len(data) + 1)]
    tr(data, [ev(payload)], offsets=offsets)


def test_event_at_the_limit_is_kept() -> None:
    """Data of exactly max_event_bytes is kept, in one line or several."""
    tr(b"data: " + b"x" * 16 + b"\n\n", [ev(b"x" * 16)], max_event_bytes=16)
    tr(b"data: 1234567\ndata: 12345678\n\n", [ev(b"1234567\n12345678")], max_event_bytes=16)


def test_oversized_event_is_truncated() -> None:
    """Data over max_event_bytes is dropped; the event still dispatches, marked truncated."""
    tr(b"data: " + b"x" * 17 + b"\n\n", [truncated()], max_event_bytes=16)
    tr(b"event: big\ndata: 12345678\ndata: 12345678\n\n", [truncated(b"big")], max_event_bytes=16)
    long_line = b"event: e\ndata: " + b"y" * 100 + b"\ndata: z\n\ndata: ok\n\n"
    tr(long_line, [truncated(b"e"), ev(b"ok")], max_event_bytes=16)


def test_overlong_event_line_truncates() -> None:
    """An `event:` line too long to keep loses the type and marks the event truncated."""
    tr(b"event: " + b"t" * 40 + b"\ndata: x\n\n", [truncated()], max_event_bytes=16)


def test_overlong_comment_and_unknown_lines_are_skipped() -> None:
    """Overlong comments and unknown fields are counted and dropped without effect."""
    at = tr(b": " + b"c" * 40 + b"\ndata: x\n\n", [ev(b"x")], max_event_bytes=16)
    assert at[len(b": ") + 40 + 1] == (True, True)
    at = tr(b"x" * 40 + b"\ndata: x\n\n", [ev(b"x")], max_event_bytes=16)
    assert at[41] == (True, False)


def test_partial_line_memory_is_bounded() -> None:
    """A huge line fed in pieces keeps at most the line cap in memory."""
    scanner = SSEScanner(max_event_bytes=1024)
    scanner.feed(b"data: ")
    for _ in range(1000):
        assert scanner.feed(b"z" * 10_000) == []
        assert len(scanner._partial) <= 1024 + 8  # white-box: the bound itself
    assert scanner.feed(b"\n\ndata: after\n\n") == [truncated(), ev(b"after")]


def test_openai_shaped_stream() -> None:
    """A real-shaped OpenAI chat stream yields one event per chunk and ends on [DONE]."""
    chunk = b'{"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}'
    data = b"data: " + chunk + b"\n\ndata: " + chunk + b"\n\ndata: [DONE]\n\n"
    tr(data, [ev(chunk), ev(chunk), ev(b"[DONE]")])


def test_anthropic_shaped_stream() -> None:
    """A real-shaped Anthropic stream carries event types."""
    data = (
        b"event: message_start\n"
        b'data: {"type":"message_start","message":{"id":"msg_1"}}\n\n'
        b"event: ping\n"
        b'data: {"type": "ping"}\n\n'
        b"event: message_stop\n"
        b'data: {"type":"message_stop"}\n\n'
    )
    tr(
        data,
        [
            ev(b'{"type":"message_start","message":{"id":"msg_1"}}', b"message_start"),
            ev(b'{"type": "ping"}', b"ping"),
            ev(b'{"type":"message_stop"}', b"message_stop"),
        ],
    )


def test_empty_chunks_change_nothing() -> None:
    """Empty chunks, anywhere, are no-ops."""
    scanner = SSEScanner()
    assert scanner.feed(b"") == []
    assert flags(scanner) == (True, True)
    scanner.feed(b"\xef")
    assert scanner.feed(b"") == []
    scanner.feed(b"\xbb\xbfdata: x\r")
    assert scanner.feed(b"") == []
    assert not scanner.at_line_boundary
    assert scanner.feed(b"\n\n") == [ev(b"x")]


# --- the oracle and fuzzing ----------------------------------------------------------

FRAGMENTS = [
    b"data",
    b"data:",
    b"data: ",
    b"event: e",
    b"id: 1",
    b":",
    b" ",
    b"x",
    b"\xc3\xa9",
    b"\n",
    b"\r",
    b"\r\n",
    BOM,
    b"\xef",
    b"yyyyyyyyyy",
]


@pytest.mark.parametrize(
    "data",
    [
        b"data: x\r\n\r\n",
        BOM + b"data: a\rdata: b\r\r\n: c\n\n",
        b"data: 0123456789abcdefXYZ\n\nevent: ok\ndata: 1\n\n",
    ],
)
def test_reference_agrees_on_vectors(data: bytes) -> None:
    """The whole-buffer oracle agrees with the scanner on hand-written vectors."""
    events, at = bytewise(data, 16)
    assert events == reference(data, 16)
    assert at == [reference_flags(data[:i]) for i in range(len(data) + 1)]


@given(st.binary())
def test_fuzz_never_raises_and_matches_reference(data: bytes) -> None:
    """Arbitrary bytes never raise, and whole-feed output matches the oracle."""
    assert chunked([data], 16) == (reference(data, 16), [reference_flags(data)])


@given(st.lists(st.binary()))
def test_fuzz_chunking_never_changes_output(chunks: list[bytes]) -> None:
    """However a byte stream is chunked, the events and boundary flags are the same."""
    data = b"".join(chunks)
    ends = [sum(map(len, chunks[: i + 1])) for i in range(len(chunks))]
    events, seen = chunked(chunks, 8)
    assert events == reference(data, 8)
    assert seen == [reference_flags(data[:end]) for end in ends]


@given(
    st.lists(st.lists(st.sampled_from(FRAGMENTS)).map(b"".join)),
    st.integers(min_value=0, max_value=24),
)
def test_fuzz_sse_shaped_chunks(chunks: list[bytes], max_event_bytes: int) -> None:
    """SSE-shaped fragments in any chunking agree with the oracle, at any limit."""
    data = b"".join(chunks)
    ends = [sum(map(len, chunks[: i + 1])) for i in range(len(chunks))]
    events, seen = chunked(chunks, max_event_bytes)
    assert events == reference(data, max_event_bytes)
    assert seen == [reference_flags(data[:end]) for end in ends]


@given(st.binary().filter(lambda b: b"\n" not in b and b"\r" not in b))
def test_fast_path_agrees_with_general_path(value: bytes) -> None:
    """The one-event fast path gives the same event as the general line scanner."""
    chunk = b"data: " + value + b"\n\n"
    fast = SSEScanner()
    fast.feed(b": warm-up\n")  # decide the BOM so the fast path is eligible
    general = SSEScanner()
    general.feed(b": warm-up\n")
    general.feed(chunk[:1])  # a held partial line forces the general path
    assert fast.feed(chunk) == general.feed(chunk[1:])
    assert fast.at_event_boundary
    assert general.at_event_boundary


@given(
    st.lists(
        st.binary().filter(lambda b: b"\n" not in b and b"\r" not in b), min_size=1, max_size=5
    ),
    st.sampled_from([b"", b"\n", b"\n\n", b"data: x\n", b": c\n\n", b"\ndata: y\n\n"]),
)
def test_multi_event_fast_path_agrees_with_general_path(values: list[bytes], tail: bytes) -> None:
    """Chunks of several whole events (two reads coalesced), with or without odd tails,
    give the same events and boundaries as the general line scanner."""
    chunk = b"".join(b"data: " + value + b"\n\n" for value in values) + tail
    fast = SSEScanner()
    fast.feed(b": warm-up\n")
    general = SSEScanner()
    general.feed(b": warm-up\n")
    general.feed(chunk[:1])
    assert fast.feed(chunk) == general.feed(chunk[1:])
    assert fast.at_event_boundary == general.at_event_boundary
    assert fast.at_line_boundary == general.at_line_boundary


@pytest.mark.parametrize(
    ("before", "expected"),
    [
        (b"data: a\n", [SSEEvent(None, b"a\nb", False)]),  # a field pending: same event
        (b"event: e\n", [SSEEvent(b"e", b"b", False)]),
        (b"data", []),  # a partial line: `datadata: b` is another field, and no data
        (b"data: a\r", [SSEEvent(None, b"a\nb", False)]),  # a CR that may be half a CRLF
        (b"\xef\xbb", []),  # a BOM not yet decided: here not one, so a field of its own
    ],
)
def test_a_whole_event_chunk_after_an_unfinished_state_is_scanned_in_full(
    before: bytes, expected: list[SSEEvent]
) -> None:
    """A chunk that looks like one whole event takes the fast path only between events:
    after anything the scanner still holds, it continues what came before."""
    scanner = SSEScanner()
    scanner.feed(b": warm-up\n")
    scanner.feed(before)
    events = scanner.feed(b"data: b\n\n")
    assert events == expected
    assert events == reference(b": warm-up\n" + before + b"data: b\n\n", 1 << 20)
