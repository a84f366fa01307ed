"""Loopback servers for tests, on 127.0.0.1:0 in a background thread: ASGI apps (the mock
upstream) under real uvicorn, and the proxy under its own server (http1.py), both on uvloop.

Modelled on httpx's `serve_in_thread` and uvicorn's `run_server`: bind the socket first so
the port is known, then wait until the server has started instead of sleeping a guessed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn

from streamproxy.http1 import Handler, ProxyServer
from streamproxy.server import run_event_loop


def bind_loopback() -> socket.socket:
    """A listening-ready TCP socket on an ephemeral loopback port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def serve_app(
    app: Any,
    *,
    http: str = "httptools",
    cleanup: Callable[[], Awaitable[None]] | None = None,
    **config: Any,
) -> Iterator[str]:
    """Run an ASGI app under real uvicorn (on uvloop, as in production) on loopback;
    yield its base URL. `cleanup` runs in the server's loop after it stops."""
    sock = bind_loopback()
    port = sock.getsockname()[1]
    options = {"lifespan": "off", "access_log": False, "log_config": None, **config}
    cfg = uvicorn.Config(app, http=http, **options)
    server = uvicorn.Server(cfg)

    async def main() -> None:
        await server.serve(sockets=[sock])
        if cleanup is not None:
            await cleanup()

    thread = threading.Thread(target=run_event_loop, args=(main(),))
    thread.daemon = True
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.005)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextlib.contextmanager
def serve_proxy(
    handler: Handler,
    *,
    max_body: int,
    cleanup: Callable[[], Awaitable[None]] | None = None,
    **options: Any,
) -> Iterator[str]:
    """Run the proxy's HTTP server with `handler` (ProxyApp.handle) on loopback, as
    `streamproxy serve` does; yield its base URL. `cleanup` runs in its loop at the end."""
    sock = bind_loopback()
    port = sock.getsockname()[1]
    started = threading.Event()
    stopping: list[Callable[[], None]] = []

    async def main() -> None:
        server = ProxyServer(handler, max_body=max_body, **options)
        await server.start([sock])
        stop = asyncio.Event()
        stopping.append(lambda: server.loop.call_soon_threadsafe(stop.set))
        started.set()
        await stop.wait()
        await server.shutdown()
        if cleanup is not None:
            await cleanup()

    thread = threading.Thread(target=run_event_loop, args=(main(),))
    thread.daemon = True
    thread.start()
    if not started.wait(10):
        raise RuntimeError("test proxy did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stopping[0]()
        thread.join(10)
        sock.close()


class ProxyProcess:
    """`python -m streamproxy serve ...` as a real subprocess, its log lines collected.

    Ports are 0 (ephemeral) unless the config says otherwise; the real ones are read
    from the start-up line, then `/readyz` is polled until it answers 200.
    """

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        full_env = {**os.environ, **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streamproxy", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = self.admin_port = 0

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self.lines.append(raw.decode("utf-8", "replace"))

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 20.0) -> ProxyProcess:
        deadline = time.monotonic() + timeout
        while not self.port:
            for line in list(self.lines):
                if "proxy_port" in line and line.startswith("{"):
                    record = json.loads(line)
                    self.port, self.admin_port = record["proxy_port"], record["admin_port"]
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"proxy did not start:\n{self.output}")
            time.sleep(0.02)
        while self.get_status("/readyz") != 200:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"proxy never became ready:\n{self.output}")
            time.sleep(0.02)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def get_status(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(self.admin_url + path, timeout=2) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return None

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._reader.join(5)
            if self.process.stdout is not None:
                self.process.stdout.close()


def write_config(directory: Path, upstream_url: str, extra: str = "") -> Path:
    """A config file on ephemeral loopback ports with one upstream, plus `extra` YAML."""
    path = directory / "config.yaml"
    path.write_text(
        "listen: {host: 127.0.0.1, port: 0}\n"
        "admin: {host: 127.0.0.1, port: 0}\n"
        f"upstreams:\n  - {{name: test, url: '{upstream_url}'}}\n" + extra
    )
    return path


def require_tool(name: str, hint: str, extra_dirs: tuple[str, ...] = ()) -> str:
    """The path of an external tool (PATH, then `extra_dirs`, /usr/local/bin and this
    Python's bin). Missing: the test is skipped locally, and fails when `CI` is set, so
    CI never passes by silently skipping what it was meant to run."""
    import pytest

    candidates = [*(Path(d) / name for d in extra_dirs), Path("/usr/local/bin") / name,
                  Path(sys.executable).parent / name]  # fmt: skip
    found = shutil.which(name) or next((str(p) for p in candidates if os.access(p, os.X_OK)), None)
    if found is None:
        message = f"{name} is not installed ({hint})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found
