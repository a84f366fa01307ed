"""A finished stream leaves no reference cycles: reference counting frees the whole
exchange at once, so the cyclic GC (whose pauses stop every stream) rarely has to run
(server._tune_gc relies on it)."""

from __future__ import annotations

import gc
import time

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
