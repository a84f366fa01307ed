"""NDJSONScanner: every vector whole, byte by byte and split at every offset (h11's `tr()`)."""

from __future__ import annotations

from hypothesis import given, strategies as st

from streamproxy.ndjson import NDJSONScanner

MiB = 1 << 20


def chunked(chunks: list[bytes], max_line_bytes: int) -> tuple[list[bytes], list[bool]]:
    """Feed the given chunks; return the lines (finish included) and the flag after each."""
    scanner = NDJSONScanner(max_line_bytes)
    lines: list[bytes] = []
    seen = []
    for chunk in chunks:
        lines += scanner.feed(chunk)
        seen.append(scanner.at_line_boundary)
    return lines + scanner.finish(), seen


def tr(data: bytes, expected: list[bytes], *, max_line_bytes: int = MiB) -> list[bool]:
    """Check a vector whole, byte by byte, and split at every offset: the lines, and the
    flag at each chunk end, must not depend on the chunking."""
    lines, at = chunked([data[i : i + 1] for i in range(len(data))], max_line_bytes)
    at = [True, *at]
    assert lines == expected
    assert at == [reference_flag(data[:i]) for i in range(len(data) + 1)]
    assert chunked([data], max_line_bytes) == (expected, [at[-1]])
    for i in range(len(data) + 1):
        assert chunked([data[:i], data[i:]], max_line_bytes) == (expected, [at[i], at[-1]]), i
    return at


def reference(data: bytes, max_line_bytes: int) -> list[bytes]:
    """A whole-buffer oracle: split on LF, strip one CR, drop blank lines, stub long ones."""
    out = []
    for line in data.split(b"\n"):
        line = line.removesuffix(b"\r")
        if len(line) > max_line_bytes:
            out.append(b"")
        elif line.strip(b" \t\n\r\x0b\x0c"):
            out.append(line)
    return out


def reference_flag(prefix: bytes) -> bool:
    """The line-boundary flag after `prefix`."""
    return prefix == b"" or prefix.endswith(b"\n")


OLLAMA = [
    b'{"model":"llama3.2","created_at":"2023-08-04T08:52:19.385406455-07:00",'
    b'"message":{"role":"assistant","content":"The"},"done":false}',
    b'{"model":"llama3.2","created_at":"2023-08-04T19:22:45.499127Z","message":'
    b'{"role":"assistant","content":""},"done":true,"done_reason":"stop",'
    b'"total_duration":4883583458,"prompt_eval_count":26,"eval_count":282}',
]


def test_ollama_lines() -> None:
    """LF-terminated Ollama lines come out whole, without their LF."""
    at = tr(b"\n".join(OLLAMA) + b"\n", OLLAMA)
    assert at[len(OLLAMA[0])] is False
    assert at[len(OLLAMA[0]) + 1] is True


def test_crlf_strips_one_cr() -> None:
    """A trailing CR is stripped; only one."""
    tr(b'{"a":1}\r\n{"b":2}\r\r\n', [b'{"a":1}', b'{"b":2}\r'])


def test_lone_cr_is_not_a_line_end() -> None:
    """Only LF ends an NDJSON line."""
    tr(b'{"a":"x\ry"}\n', [b'{"a":"x\ry"}'])


def test_blank_and_whitespace_lines_are_skipped() -> None:
    """Empty and whitespace-only lines are not returned."""
    tr(b'\n\n  \n\t\r\n{"a":1}\n\n', [b'{"a":1}'])


def test_final_unterminated_line_returned_by_finish() -> None:
    """A final line without LF is a complete document, returned at EOF."""
    tr(b'{"a":1}\n{"done":true}', [b'{"a":1}', b'{"done":true}'])
    tr(b'{"a":1}\n{"done":true}\r', [b'{"a":1}', b'{"done":true}'])
    tr(b'{"a":1}\n   ', [b'{"a":1}'])


def test_finish_is_idempotent() -> None:
    """A second finish returns nothing more."""
    scanner = NDJSONScanner()
    assert scanner.feed(b'{"a":1}') == []
    assert scanner.finish() == [b'{"a":1}']
    assert scanner.finish() == []
    assert scanner.at_line_boundary


def test_utf8_character_split_across_writes() -> None:
    """A multi-byte UTF-8 character split across chunks arrives intact."""
    line = '{"response":"héllo ✓ 日本 🎉"}'.encode()
    tr(line + b"\n", [line])


def test_line_at_the_limit_is_kept() -> None:
    """A line of exactly max_line_bytes is kept, with or without a CR."""
    tr(b"x" * 16 + b"\n" + b"y" * 16 + b"\r\n", [b"x" * 16, b"y" * 16], max_line_bytes=16)
    tr(b"z" * 16 + b"\r", [b"z" * 16], max_line_bytes=16)


def test_overlong_line_is_stubbed() -> None:
    """A line over max_line_bytes comes out as b"" and the next line is unaffected."""
    tr(b"x" * 17 + b"\n" + b'{"ok":1}\n', [b"", b'{"ok":1}'], max_line_bytes=16)
    tr(b"y" * 17 + b"\r\n", [b""], max_line_bytes=16)
    tr(b" " * 40 + b"\n", [b""], max_line_bytes=16)
    tr(b"z" * 40, [b""], max_line_bytes=16)


def test_partial_line_memory_is_bounded() -> None:
    """A huge line fed in pieces keeps at most max_line_bytes + 1 in memory."""
    scanner = NDJSONScanner(max_line_bytes=1024)
    for _ in range(1000):
        assert scanner.feed(b"z" * 10_000) == []
        assert len(scanner._partial) <= 1025  # white-box: the bound itself
    assert scanner.feed(b'\n{"after":1}\n') == [b"", b'{"after":1}']


@given(st.binary())
def test_fuzz_never_raises_and_matches_reference(data: bytes) -> None:
    """Arbitrary bytes never raise, and the output matches the oracle."""
    assert chunked([data], 8) == (reference(data, 8), [reference_flag(data)])


@given(st.lists(st.binary()), st.integers(min_value=0, max_value=12))
def test_fuzz_chunking_never_changes_output(chunks: list[bytes], max_line_bytes: int) -> None:
    """However a byte stream is chunked, the lines and boundary flags are the same."""
    data = b"".join(chunks)
    ends = [sum(map(len, chunks[: i + 1])) for i in range(len(chunks))]
    lines, seen = chunked(chunks, max_line_bytes)
    assert lines == reference(data, max_line_bytes)
    assert seen == [reference_flag(data[:end]) for end in ends]


FRAGMENTS = [b"{}", b" ", b"\r", b"\n", b"\t", b"xyz"]


@given(st.lists(st.lists(st.sampled_from(FRAGMENTS)).map(b"".join)))
def test_fuzz_ndjson_shaped_chunks(chunks: list[bytes]) -> None:
    """NDJSON-shaped fragments in any chunking agree with the oracle."""
    lines, _ = chunked(chunks, 6)
    assert lines == reference(b"".join(chunks), 6)
