"""SIGTERM drains: not ready, no new connections, streams finish or end as failures, exit 0."""

from __future__ import annotations

import socket
import threading
import time

from tests import client
from tests.support import ProxyProcess, write_config

CHAT = b'{"model": "m", "stream": true}'


def _stream(url: str, tokens: int, results: dict[str, client.RawResponse], key: str) -> None:
    headers = [
        ("content-type", "application/json"),
        ("x-mock-tokens", str(tokens)),
        ("x-mock-interval", "0.1"),
        ("x-mock-ttft", "0"),
    ]
    results[key] = client.request(url, "POST", "/v1/chat/completions", headers, CHAT)


def test_sigterm_drains_then_exits_zero(tmp_path, mock_url):
    """On SIGTERM /readyz turns 503 and new connections are refused; a stream that ends
    within drain_timeout completes; one that does not ends with the error event and no
    terminator; the process exits 0."""
    config = write_config(tmp_path, mock_url, "shutdown: {drain_timeout: 1.5s}\n")
    proxy = ProxyProcess(["serve", "--config", str(config)]).wait_ready()
    results: dict[str, client.RawResponse] = {}
    threads = [
        threading.Thread(target=_stream, args=(proxy.url, 8, results, "short")),
        threading.Thread(target=_stream, args=(proxy.url, 200, results, "long")),
    ]
    try:
        for thread in threads:
            thread.start()
        time.sleep(0.3)  # both streams are under way
        proxy.process.send_signal(15)
        deadline = time.monotonic() + 1.0
        while proxy.get_status("/readyz") != 503:
            assert time.monotonic() < deadline, "readyz never turned 503"
            time.sleep(0.02)
        time.sleep(0.2)
        refused = False
        try:
            socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
        except OSError:
            refused = True
        assert refused, "the proxy still accepted connections while draining"
        for thread in threads:
            thread.join(10)
        exit_code = proxy.process.wait(10)
    finally:
        proxy.stop()
    assert exit_code == 0, proxy.output
    short, long = results["short"], results["long"]
    assert short.complete
    assert short.body.endswith(b"data: [DONE]\n\n")
    assert not long.complete
    assert b"event: error" in long.body
    assert b"shutting down" in long.body
