"""A finished stream leaves no reference cycles: reference counting frees the whole
exchange at once, so the cyclic GC (whose pauses stop every stream) rarely has to run
(server._tune_gc relies on it)."""

from __future__ import annotations

import gc
import socket
import time
import types

from tests import client

CHAT = b'{"model": "m", "stream": true}'
HEADERS = [("content-type", "application/json"), ("x-mock-tokens", "5"), ("x-mock-ttft", "0")]
# The per-request objects of the proxy: none of them may wait for the cyclic GC.
PER_REQUEST = {
    "ClientConnection",
    "Request",
    "Response",
    "Exchange",
    "Pump",
    "StreamObserver",
    "SSEScanner",
    "UpstreamResponse",
    "GapRecorder",
}


def _stream(url: str) -> client.RawResponse:
    return client.request(url, "POST", "/v1/chat/completions", HEADERS, CHAT)


def test_a_finished_stream_leaves_no_reference_cycles(start_proxy, mock_url):
    """Streams that completed leave none of the proxy's per-request objects to the GC."""
    with start_proxy(mock_url) as proxy:
        assert _stream(proxy.url).complete  # warm: pools, metric children, caches
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(3):
                response = _stream(proxy.url)
                assert response.complete
                assert response.body.endswith(b"data: [DONE]\n\n")
            time.sleep(0.2)  # the proxy's side of the last connection closes
            gc.collect()
            found = sorted({type(o).__name__ for o in gc.garbage} & PER_REQUEST)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert found == []


def _dead_url() -> str:
    """A loopback URL nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_failed_requests_leave_no_reference_cycles(start_proxy, mock_url):
    """Requests that fail (502 connect refused with a 1 MB body, a mid-stream abort, a
    client that leaves, a 400) leave none of the proxy's per-request objects, and no
    frame holding the request body, to the cyclic GC: a traceback kept with the error
    would."""
    body = b'{"model": "m", "stream": true, "pad": "' + b"p" * 1_000_000 + b'"}'
    abort = [*HEADERS, ("x-mock-abort-after", "2")]
    with start_proxy(_dead_url()) as refused, start_proxy(mock_url) as proxy:
        port = int(proxy.url.rsplit(":", 1)[1])

        def failures() -> None:
            assert (
                client.request(refused.url, "POST", "/v1/chat/completions", [], body).status == 502
            )
            assert not client.request(
                proxy.url, "POST", "/v1/chat/completions", abort, CHAT
            ).complete
            assert client.request(proxy.url, "GET", "/../x").status == 400
            with socket.create_connection(("127.0.0.1", port)) as sock:  # leaves mid-stream
                head = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-mock-interval: 0.05\r\n"
                sock.sendall(f"{head}content-length: {len(CHAT)}\r\n\r\n".encode() + CHAT)
                sock.recv(1000)

        failures()  # warm
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            failures()
            time.sleep(0.3)
            gc.collect()
            found = sorted({type(o).__name__ for o in gc.garbage} & PER_REQUEST)
            # Frames in a cycle hold their locals: the request body among them.
            frames = [o.f_code.co_name for o in gc.garbage if isinstance(o, types.FrameType)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert found == []
    assert frames == []
