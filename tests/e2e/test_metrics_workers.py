"""`serve --workers N`: one scrape of /metrics adds up every worker's streams, and values
left in PROMETHEUS_MULTIPROC_DIR by an earlier run are not counted.

Which worker served a stream is read from the kernel (psutil: the worker process that
holds the accepted connection), so the test knows both workers took part.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from tests import client
from tests.scrape import scrape, wait_for
from tests.support import ProxyProcess, write_config

STREAMS = "streamproxy_streams_total"
REQUESTS = "streamproxy_requests_total"
ACTIVE = "streamproxy_streams_active"
TTFT = "streamproxy_time_to_first_token_seconds"
ITL = "streamproxy_inter_token_latency_seconds"
TOKENS = "streamproxy_output_tokens_total"

BODY = json.dumps({"model": "gpt-x", "stream": True, "messages": []}).encode()
KNOBS = [
    ("content-type", "application/json"),
    ("x-mock-ttft", "0.2"),
    ("x-mock-tokens", "10"),
    ("x-mock-interval", "0.1"),
]
WAVE = 8


def leave_stale_values(directory: Path) -> None:
    """Write the multiprocess files a crashed earlier run would leave behind."""
    code = (
        "from prometheus_client import Counter\n"
        "c = Counter('streamproxy_streams_total', 'x', ['upstream', 'model', 'outcome'])\n"
        "c.labels('test', 'gpt-x', 'completed').inc(1000)\n"
        "r = Counter('streamproxy_requests_total', 'x', ['upstream', 'method', 'status_code'])\n"
        "r.labels('test', 'POST', '200').inc(1000)\n"
    )
    env = {"PROMETHEUS_MULTIPROC_DIR": str(directory), "PATH": ""}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=30)
    assert list(directory.glob("counter_*.db"))


class ConnectionOwners:
    """Samples, every few ms, which worker holds which client connection to the proxy."""

    def __init__(self, workers: list[psutil.Process], port: int) -> None:
        self.workers = workers
        self.port = port
        self.seen: dict[int, set[int]] = {w.pid: set() for w in workers}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for worker in self.workers:
                for conn in worker.net_connections(kind="tcp"):
                    if conn.status == psutil.CONN_ESTABLISHED and conn.laddr.port == self.port:
                        self.seen[worker.pid].add(conn.raddr.port)
            time.sleep(0.005)

    def stop(self) -> dict[int, int]:
        """Stop sampling; return how many client connections each worker held."""
        self._stop.set()
        self._thread.join(5)
        return {pid: len(ports) for pid, ports in self.seen.items()}


def workers_of(proxy: ProxyProcess, count: int) -> list[psutil.Process]:
    """The worker processes (spawned children, not the resource tracker)."""
    deadline = time.monotonic() + 20
    while True:
        children = psutil.Process(proxy.process.pid).children()
        workers = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
        if len(workers) == count or time.monotonic() > deadline:
            return workers
        time.sleep(0.05)


def test_workers_add_up_in_one_scrape(tmp_path, mock_url):
    """With --workers 2 both workers serve streams, one scrape counts every stream exactly
    once, the active gauge sums the live workers, and stale multiprocess files are wiped."""
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    leave_stale_values(metrics_dir)
    config = write_config(tmp_path, mock_url, "keepalive: {interval: 0}\n")
    proxy = ProxyProcess(
        ["serve", "--config", str(config), "--workers", "2"],
        env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
    )
    try:
        proxy.wait_ready()
        workers = workers_of(proxy, 2)
        assert len(workers) == 2, proxy.output
        owners = ConnectionOwners(workers, proxy.port)
        sent = 0
        results: list[client.RawResponse] = []
        for _ in range(5):  # waves until the kernel has handed streams to both workers
            threads = [
                threading.Thread(
                    target=lambda: results.append(
                        client.request(proxy.url, "POST", "/v1/chat/completions", KNOBS, BODY)
                    )
                )
                for _ in range(WAVE)
            ]
            for thread in threads:
                thread.start()
                time.sleep(0.02)
            wait_for(proxy.admin_url, lambda m: m.value(ACTIVE, upstream="test") == WAVE)
            for thread in threads:
                thread.join(15)
            sent += WAVE
            if all(owners.seen.values()):
                break
        served = owners.stop()
        assert all(served.values()), f"one worker served nothing: {served}"
        assert sum(served.values()) == sent
        assert len(results) == sent
        assert all(r.status == 200 and r.complete for r in results)

        m = wait_for(proxy.admin_url, lambda m: m.total(STREAMS) >= sent, timeout=10)
        model = {"upstream": "test", "model": "gpt-x"}
        assert m.total(STREAMS) == sent  # not + 1000 from the stale files
        assert m.value(STREAMS, **model, outcome="completed") == sent
        assert m.total(REQUESTS) == sent
        assert m.value(REQUESTS, upstream="test", method="POST", status_code="200") == sent
        assert m.value(TTFT + "_count", **model) == sent
        assert m.value(ITL + "_count", **model) == sent * 9
        assert m.value(TOKENS, **model) == sent * 10
        assert m.value(ACTIVE, upstream="test") == 0
        assert scrape(proxy.admin_url).total(STREAMS) == sent  # and it stays so
    finally:
        assert proxy.stop() == 0


def test_single_process_ignores_stale_multiprocess_files(tmp_path, mock_url):
    """With PROMETHEUS_MULTIPROC_DIR set (as for gunicorn-style deployments) a single
    process also starts from zero, not from the files a previous run left there."""
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    leave_stale_values(metrics_dir)
    config = write_config(tmp_path, mock_url)
    proxy = ProxyProcess(
        ["serve", "--config", str(config)], env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    )
    try:
        proxy.wait_ready()
        assert scrape(proxy.admin_url).total(STREAMS) == 0
    finally:
        assert proxy.stop() == 0
