"""The byte-exact battery: whatever the upstream writes, the client gets, chunk by chunk.

Each case scripts exact upstream writes through the mock's /mock/script endpoint and
reads the proxy's answer with a raw h11 client, as HTTP/1.1 (chunked) and as HTTP/1.0
(close-delimited: the proxy must not send chunked framing to a 1.0 client).
"""

from __future__ import annotations

import gzip
import json
import zlib

import pytest

from tests import client

SSE = "text/event-stream"


@pytest.fixture(params=["1.1", "1.0"])
def http_version(request: pytest.FixtureRequest) -> str:
    """Both framings the proxy writes: chunked for HTTP/1.1, close-delimited for 1.0."""
    return str(request.param)


def _relay(start_proxy, mock_url, http_version, chunks, **kwargs) -> client.RawResponse:
    with start_proxy(mock_url, keepalive=0) as proxy:
        response = client.request(
            proxy.url,
            "POST",
            "/mock/script",
            body=client.script(chunks, **kwargs),
            http_version=http_version,
        )
    chunked = response.header(b"transfer-encoding") == b"chunked"
    assert chunked == (http_version == "1.1" and response.header(b"content-length") is None)
    return response


CASES = {
    "lf": [b"data: one\n\n", b"data: two\n\n"],
    "crlf": [b"data: one\r\n\r\n", b"data: two\r\n\r\n"],
    "lone-cr": [b"data: one\r\r", b"data: two\r\r"],
    "crlf-split": [b"data: one\r", b"\n\r\n"],
    "multi-line-data": [b"data: line 1\ndata: line 2\ndata: line 3\n\n"],
    "fields": [b"id: 7\nretry: 1000\nevent: message_start\ndata: {}\n\n"],
    "comments": [b": hello\n\n", b": ping\ndata: x\n\n"],
    "utf8-split": [
        "data: caf\u00e9 \u2603\n\n".encode()[:9],
        "data: caf\u00e9 \u2603\n\n".encode()[9:],
    ],
    "bom": [b"\xef\xbb\xbfdata: bom\n\n"],
    "big-event": [b"data: " + b"x" * (256 * 1024) + b"\n\n"],
    "one-byte-writes": [bytes([b]) for b in b"event: a\ndata: 1\n\ndata: 2\n\n"],
}


@pytest.mark.parametrize("name", list(CASES))
def test_sse_bytes_are_exact(start_proxy, mock_url, http_version, name):
    """Every SSE shape arrives byte for byte, with the stream properly terminated."""
    chunks = CASES[name]
    response = _relay(start_proxy, mock_url, http_version, chunks)
    assert response.status == 200
    assert response.complete
    assert response.body == b"".join(chunks)


def test_ndjson_bytes_are_exact(start_proxy, mock_url, http_version):
    """NDJSON (Ollama) passes unchanged, without any injected byte."""
    lines = [json.dumps({"n": i, "done": i == 4}).encode() + b"\n" for i in range(5)]
    response = _relay(
        start_proxy, mock_url, http_version, lines, content_type="application/x-ndjson"
    )
    assert response.complete
    assert response.body == b"".join(lines)
    assert response.header(b"x-accel-buffering") == b"no"


def test_gzip_sse_passes_compressed(start_proxy, mock_url, http_version):
    """gzip-encoded SSE is relayed still compressed: never decoded, never re-encoded."""
    compressor = zlib.compressobj(wbits=31)
    chunks = [
        compressor.compress(b"data: %d\n\n" % i) + compressor.flush(zlib.Z_SYNC_FLUSH)
        for i in range(5)
    ]
    chunks.append(compressor.flush())
    response = _relay(
        start_proxy, mock_url, http_version, chunks, headers=[("content-encoding", "gzip")]
    )
    assert response.header(b"content-encoding") == b"gzip"
    assert response.body == b"".join(chunks)
    assert gzip.decompress(response.body) == b"".join(b"data: %d\n\n" % i for i in range(5))


def test_json_with_content_length(start_proxy, mock_url, http_version):
    """A plain JSON response keeps its Content-Length framing and its bytes."""
    body = json.dumps({"object": "chat.completion", "choices": []}).encode()
    response = _relay(
        start_proxy,
        mock_url,
        http_version,
        [body],
        content_type="application/json",
        headers=[("content-length", str(len(body)))],
    )
    assert response.complete
    assert response.body == body
    assert response.header(b"content-length") == str(len(body)).encode()
    assert response.header(b"transfer-encoding") is None


def test_binary_body_is_exact(start_proxy, mock_url, http_version):
    """Arbitrary binary content (every byte value) passes unchanged."""
    chunks = [bytes(range(256)) * 4, bytes(reversed(range(256)))]
    response = _relay(
        start_proxy, mock_url, http_version, chunks, content_type="application/octet-stream"
    )
    assert response.complete
    assert response.body == b"".join(chunks)


@pytest.mark.parametrize("content_type", [SSE, "application/x-ndjson", "application/json"])
def test_each_chunk_arrives_when_sent(start_proxy, mock_url, http_version, content_type):
    """Zero buffering, whatever the content type: the first chunk arrives long before the
    last is written (the upstream spaces five writes 0.4 s apart)."""
    chunks = [(b"data: %d\n\n" % i, 0.4 if i else 0.0) for i in range(5)]
    response = _relay(start_proxy, mock_url, http_version, chunks, content_type=content_type)
    assert response.complete
    times = [t for t, _ in response.chunks]
    assert len(response.chunks) >= 4  # not coalesced into one write
    assert times[0] < 0.8, times  # the first chunk did not wait for the 1.6 s stream
    assert times[-1] - times[0] > 1.2, times
