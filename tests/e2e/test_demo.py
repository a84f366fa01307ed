"""`streamproxy demo`: the mock and the proxy wired together, with working commands."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request

from tests import client
from tests.support import bind_loopback


def _free_port() -> int:
    sock = bind_loopback()
    port = sock.getsockname()[1]
    sock.close()
    return port


def test_demo_serves_and_prints_what_to_try():
    """The demo prints the commands to try; a stream through it works, /metrics counts it,
    and Ctrl-C stops it cleanly."""
    port, admin, mock = _free_port(), _free_port(), _free_port()
    args = ["demo", "--port", str(port), "--admin-port", str(admin), "--mock-port", str(mock)]
    process = subprocess.Popen(
        [sys.executable, "-m", "streamproxy", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 20
        while not any("Press Ctrl-C" in line for line in lines):
            assert time.monotonic() < deadline, "".join(lines)
            lines.append(process.stdout.readline())
        output = "".join(lines)
        assert f"curl -N http://127.0.0.1:{port}/v1/chat/completions" in output
        assert f"http://127.0.0.1:{admin}/metrics" in output
        body = json.dumps({"model": "demo-model", "stream": True}).encode()
        headers = [("content-type", "application/json"), ("x-mock-tokens", "5")]
        response = client.request(
            f"http://127.0.0.1:{port}", "POST", "/v1/chat/completions", headers, body
        )
        assert response.complete
        assert response.body.endswith(b"data: [DONE]\n\n")
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as scrape:
            metrics = scrape.read().decode()
        assert 'streamproxy_streams_total{model="demo-model",outcome="completed"' in metrics
        process.send_signal(signal.SIGINT)
        assert process.wait(15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
