"""Load balancers in front of the proxy: nginx and HAProxy from apt, on loopback.

Each is started by the test that needs it, in the foreground as a child process, from a
config written for that test, and stopped by its PID (SIGTERM, then SIGKILL). A missing
binary skips the test on a workstation but fails it when `CI` is set: in CI these tests
must run, never silently vanish.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.support import require_tool


def free_port() -> int:
    """A loopback port that was free a moment ago (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_binary(name: str) -> str:
    """The path of `name`, also looked up in the sbin directories a user's PATH may lack."""
    hint = f"apt-get install {name}; .ci/run installs it"
    return require_tool(name, hint, extra_dirs=("/usr/sbin", "/usr/local/sbin"))


@dataclass
class LoadBalancer:
    """A running nginx or HAProxy: its base URL, its process and its log file."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Poll until the listening port accepts a connection (no guessed sleeps)."""
        parts = urlsplit(self.url)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"exited with {self.process.returncode}:\n{self.output()}")
            try:
                with socket.create_connection((parts.hostname, parts.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"never listened:\n{self.output()}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


Starter = Callable[..., LoadBalancer]


@pytest.fixture
def _load_balancers() -> Iterator[list[LoadBalancer]]:
    running: list[LoadBalancer] = []
    yield running
    for balancer in running:
        balancer.stop()


def _launch(running: list[LoadBalancer], args: list[str], port: int, log: Path) -> LoadBalancer:
    with log.open("wb") as sink:
        process = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT)
    balancer = LoadBalancer(f"http://127.0.0.1:{port}", process, log)
    running.append(balancer)
    balancer.wait_ready()
    return balancer


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log stderr warn;

events {{ worker_connections 64; }}

http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path       {dir}/proxy;
    fastcgi_temp_path     {dir}/fastcgi;
    uwsgi_temp_path       {dir}/uwsgi;
    scgi_temp_path        {dir}/scgi;

    server {{
        listen 127.0.0.1:{port};
        location / {{
            # nginx defaults on purpose: proxy_buffering on, HTTP/1.0 to the backend.
            proxy_pass {backend};
        }}
    }}
}}
"""


@pytest.fixture
def nginx(_load_balancers: list[LoadBalancer]) -> Iterator[Starter]:
    """`nginx(backend_url)`: nginx with its default proxy settings (`proxy_buffering on`,
    HTTP/1.0 to the backend) in front of `backend_url`.

    nginx started as root runs its workers as `nobody`, which cannot enter pytest's
    private (0700) tmp_path, so its prefix is a fresh 0755 directory under the system
    temp dir, removed afterwards.
    """
    binary = find_binary("nginx")
    directories: list[Path] = []

    def start(backend: str) -> LoadBalancer:
        directory = Path(tempfile.mkdtemp(prefix="streamproxy-nginx-"))
        directories.append(directory)
        directory.chmod(0o755)
        port = free_port()
        conf = directory / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=directory, port=port, backend=backend))
        args = [binary, "-p", str(directory), "-e", "stderr", "-c", str(conf)]
        return _launch(_load_balancers, args, port, directory / "nginx.log")

    yield start
    for balancer in _load_balancers:  # stop before removing their directories
        balancer.stop()
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)


HAPROXY_CFG = """\
global
    log stderr format raw local0 warning

defaults
    mode http
    log global
    # Without it HAProxy 2.6 sends small chunks with MSG_MORE and the kernel holds
    # them up to ~200 ms: events 50 ms apart would arrive in batches.
    option http-no-delay
    timeout connect 2s
    timeout client {timeout}
    timeout server {timeout}

frontend fe
    bind 127.0.0.1:{port}
    default_backend be

backend be
    server app {backend}
"""


@pytest.fixture
def haproxy(_load_balancers: list[LoadBalancer], tmp_path: Path) -> Starter:
    """`haproxy(backend_url, timeout="2s")`: HAProxy in HTTP mode in front of
    `backend_url`, cutting any connection idle for `timeout` (client and server side)."""
    binary = find_binary("haproxy")

    def start(backend: str, timeout: str = "2s") -> LoadBalancer:
        port = free_port()
        cfg = tmp_path / f"haproxy-{port}.cfg"
        address = urlsplit(backend).netloc
        cfg.write_text(HAPROXY_CFG.format(port=port, backend=address, timeout=timeout))
        args = [binary, "-db", "-f", str(cfg)]
        return _launch(_load_balancers, args, port, tmp_path / f"haproxy-{port}.log")

    return start
