"""Streams that flood (an upstream writing as fast as its client reads) do not starve a
new stream: its first byte comes in well under a second, not after seconds.

Real processes on loopback, as in production: the benchmark's fast SSE upstream, the
proxy (`streamproxy serve`) and the benchmark's load generator flooding through it.
Without the read limit in upstream.py (one 32 KiB read per connection and loop turn)
one loop turn relayed megabytes per flooding stream and a new stream waited seconds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import client
from tests.support import ProxyProcess, write_config

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
FLOODERS = 40


@pytest.fixture
def flood_upstream() -> Iterator[str]:
    """benchmarks/upstream.py on an ephemeral loopback port."""
    process = subprocess.Popen(
        [sys.executable, str(BENCH / "upstream.py"), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # "listening on HOST:PORT"
        assert line.startswith("listening on"), line
        yield "http://" + line.split()[-1]
    finally:
        process.terminate()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


def test_new_stream_is_served_while_others_flood(tmp_path, flood_upstream):
    """With 40 streams flooding, a new stream still gets its first byte within 1.5 s."""
    proxy = ProxyProcess(["serve", "--config", str(write_config(tmp_path, flood_upstream))])
    proxy.wait_ready()
    flood = subprocess.Popen(
        [
            *(sys.executable, str(BENCH / "loadgen.py"), proxy.url),
            *("--streams", str(FLOODERS), "--events", "100000000", "--interval-ms", "0"),
            *("--ramp-s", "0.1", "--time-cap-s", "8"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # it forks its worker: stop the whole group
    )
    try:
        time.sleep(2.0)  # the flood is under way
        assert flood.poll() is None, "the load generator stopped early"
        headers = [("x-bench-events", "3"), ("x-bench-interval", "0")]
        response = client.request(proxy.url, "POST", "/v1/chat/completions", headers, b"{}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(flood.pid, signal.SIGTERM)
        flood.wait(10)
        proxy.stop()
    assert response.status == 200
    assert response.complete
    first_byte = response.chunks[0][0]
    assert first_byte < 1.5, f"first byte after {first_byte:.2f} s while {FLOODERS} streams flood"
