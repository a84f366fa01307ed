"""Run the proxy and admin servers; drain on SIGTERM; `--workers N` processes.

One process: the proxy (http1.py) and the admin app (uvicorn) run in one event loop. On
SIGTERM or SIGINT: `/readyz` turns 503, the proxy stops accepting connections and closes
its idle keep-alive ones, in-flight requests run on for up to `shutdown.drain_timeout`,
then the rest are ended as upstream failures (an error event and no chunked terminator
for a stream, a 503 before the response started), and the process exits 0.

N processes: the parent binds both sockets, points PROMETHEUS_MULTIPROC_DIR at a fresh
directory *before* any worker imports prometheus_client (the mode is fixed at import),
spawns the workers with the sockets, restarts a worker that dies, and forwards SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from multiprocessing.connection import wait as wait_for_sentinels
from multiprocessing.process import BaseProcess
from typing import Any
from urllib.parse import urlsplit

import structlog
import uvicorn

from streamproxy import logs
from streamproxy.config import Config
from streamproxy.http1 import ProxyServer
from streamproxy.upstream import TrustStoreError, tls_context

log = structlog.get_logger("streamproxy.server")


class _Server(uvicorn.Server):
    """uvicorn's Server (the admin app) without its signal capture: `serve()` below owns
    the signals (uvicorn would re-raise SIGTERM after shutdown: exit 143, not 0)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int, *, fanout: bool = False) -> socket.socket:
    """A bound TCP socket (IPv6 if the host says so); listening starts in the server.
    `fanout`: allow `accept_fanout()` to bind more listeners to the same port, after
    checking that no other process listens there (SO_REUSEPORT would share the port
    with it silently instead of failing)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    fanout = fanout and FANOUT_SUPPORTED
    if fanout and port != 0:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))  # EADDRINUSE if anyone listens there
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fanout:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


# libuv (uvloop) accepts one connection per listening socket per loop iteration
# (libuv#3696). On a busy loop (hundreds of streams' events per iteration) a burst of new
# connections then waits one iteration each in the kernel's accept queue: 200 streams
# opened within 0.2 s waited up to ~100 ms before the proxy read their requests. Several
# SO_REUSEPORT listeners on the port, each its own accept queue (the kernel spreads new
# connections over them), let the loop accept that many per iteration, as nginx's
# `multi_accept` does. Duplicated fds of one socket would too, but every fd wakes for
# every connection: 15 wasted accept() calls each, +0.2 ms per connection when idle.
ACCEPT_FANOUT = 16
FANOUT_SUPPORTED = sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")


def accept_fanout(sock: socket.socket) -> list[socket.socket]:
    """`sock` and, if it was bound with `fanout`, more listeners on the same address."""
    if not FANOUT_SUPPORTED or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
        return [sock]
    listeners = [sock]
    for _ in range(ACCEPT_FANOUT - 1):
        extra = socket.socket(sock.family, socket.SOCK_STREAM)
        extra.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        extra.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        extra.bind(sock.getsockname())
        listeners.append(extra)
    return listeners


BACKLOG = 4096  # connections the kernel queues per listener before the loop accepts them
# After the drain timeout has ended the streams: how long the rest of the request tasks
# get to finish (writing their error answers) before they are cancelled.
SHUTDOWN_GRACE = 1.0


def _admin_config(app: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        http="httptools",
        lifespan="off",
        access_log=False,
        log_config=None,  # logs.configure() owns logging
        server_header=False,
        date_header=False,
        timeout_graceful_shutdown=1,
    )


async def serve(
    config: Config,
    proxy_sock: socket.socket,
    admin_sock: socket.socket,
    ready: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then drain and return."""
    # Imported here so a worker process imports prometheus_client only after the parent
    # has set PROMETHEUS_MULTIPROC_DIR.
    from prometheus_client import CollectorRegistry

    from streamproxy.admin import Readiness, create_admin_app
    from streamproxy.metrics import Metrics
    from streamproxy.relay import ProxyApp

    registry = CollectorRegistry()
    app = ProxyApp(config, Metrics(registry, config.metrics))
    readiness = Readiness()
    drain = config.shutdown.drain_timeout
    proxy = ProxyServer(app.handle, max_body=config.limits.max_request_body)
    admin = _Server(_admin_config(create_admin_app(registry, readiness)))
    listeners = accept_fanout(proxy_sock)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with asyncio.TaskGroup() as group:
            await proxy.start(listeners, backlog=BACKLOG)
            group.create_task(admin.serve(sockets=[admin_sock]))
            # uvicorn offers a `started` flag, no event to await
            while not admin.started:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            readiness.started = True
            _tune_gc()
            if ready is not None:
                ready()
            await stop.wait()
            readiness.draining = True
            log.info("draining", active_requests=len(app.active), drain_timeout=drain)
            await _drain(proxy, app, drain)
            admin.should_exit = True
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await proxy.shutdown()
        await app.aclose(SHUTDOWN_GRACE)
        for listener in listeners:
            listener.close()
    log.info("stopped")


def _tune_gc() -> None:
    """Keep the cyclic GC off the stream path.

    Everything made at start-up (modules, config, the apps) lives as long as the process:
    `gc.freeze()` moves it out of every collection. A finished stream leaves no reference
    cycles behind (relay.py and http1.py break theirs; tests/e2e/test_gc.py checks), so
    reference counting frees it whole, and the count that triggers a young collection
    (tracked allocations minus deallocations) grows only with the streams that are open.
    A young collection walks every object made since the last one that is still alive,
    pausing every stream meanwhile: at CPython's default threshold of 700 a burst of new
    streams triggered several of 1-8 ms each (measured with gc.callbacks while 200 streams
    opened). At 50,000 only a thousand-odd streams opening together, or garbage from
    failed requests piling up, trigger one."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


async def _drain(proxy: ProxyServer, app: Any, seconds: float) -> None:
    """Stop accepting, let the requests in flight finish for up to `seconds`, then end
    the rest as failures."""
    proxy.stop_accepting()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await app.wait_idle()
            return
    aborted = app.abort_all("streamproxy is shutting down (drain timeout reached)")
    if aborted:
        log.warning("drain timeout reached", aborted_requests=aborted)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(SHUTDOWN_GRACE):
            await app.wait_idle()


def run_event_loop(main: Any) -> None:
    """Run a coroutine on uvloop when installed (a dependency, but for Windows)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def run(config: Config) -> int:
    """Bind, announce, serve (in this process or N workers). Returns the exit code."""
    if any(urlsplit(u.url).scheme == "https" for u in config.upstreams):
        try:
            tls_context()  # a broken SSL_CERT_FILE fails here, once, not on every request
        except TrustStoreError as exc:
            log.error("cannot load CA certificates", error=str(exc))
            return 1
    try:
        proxy_sock = bind(config.listen.host, config.listen.port, fanout=True)
        admin_sock = bind(config.admin.host, config.admin.port)
    except OSError as exc:
        log.error("cannot listen", error=str(exc))
        return 1
    _announce(config, proxy_sock, admin_sock)
    temporary_dir = _prepare_metrics_dir(config.listen.workers)
    try:
        if config.listen.workers == 1:
            run_event_loop(serve(config, proxy_sock, admin_sock))
            return 0
        return _supervise(config, proxy_sock, admin_sock)
    finally:
        if temporary_dir is not None:
            shutil.rmtree(temporary_dir, ignore_errors=True)


def _prepare_metrics_dir(workers: int) -> str | None:
    """An empty PROMETHEUS_MULTIPROC_DIR when there are several workers or the
    environment names one: stale files from an earlier run would be counted again, and
    a missing directory would fail every write. Set before any worker imports
    prometheus_client (the multiprocess mode is fixed at import).

    A directory the environment names is emptied, not replaced (it may be a mount
    point), and left in place at exit; one made here is returned, to be removed."""
    named = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if named is None and workers == 1:
        return None
    if named is None:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="streamproxy-metrics-")
        return os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(named, exist_ok=True)
    for entry in os.scandir(named):
        if entry.is_file() or entry.is_symlink():
            os.unlink(entry.path)
        else:
            shutil.rmtree(entry.path, ignore_errors=True)
    return None


def _announce(config: Config, proxy_sock: socket.socket, admin_sock: socket.socket) -> None:
    proxy_port = proxy_sock.getsockname()[1]
    admin_port = admin_sock.getsockname()[1]
    log.info(
        "listening",
        proxy=f"http://{config.listen.host}:{proxy_port}",
        admin=f"http://{config.admin.host}:{admin_port}",
        proxy_port=proxy_port,
        admin_port=admin_port,
        workers=config.listen.workers,
        upstreams=[f"{u.name}: {u.path_prefix} -> {u.url}" for u in config.upstreams],
    )


def _worker(config: Config, proxy_sock: socket.socket, admin_sock: socket.socket) -> None:
    logs.configure(config.logging.level, config.logging.format)
    run_event_loop(serve(config, proxy_sock, admin_sock))


def _supervise(config: Config, proxy_sock: socket.socket, admin_sock: socket.socket) -> int:
    from prometheus_client import multiprocess

    context = multiprocessing.get_context("spawn")
    stopping = False

    def start() -> BaseProcess:
        process = context.Process(target=_worker, args=(config, proxy_sock, admin_sock))
        process.start()
        return process

    def forward(signum: int, _: Any) -> None:
        nonlocal stopping
        stopping = True
        # The workers close their listeners as they drain; this process's copy of the
        # shared one would keep the port listening, queueing connections nobody accepts.
        proxy_sock.close()
        for process in workers:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)

    workers = [start() for _ in range(config.listen.workers)]
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    failed = False
    while workers:
        wait_for_sentinels([p.sentinel for p in workers])
        for process in [p for p in workers if not p.is_alive()]:
            workers.remove(process)
            if process.pid is not None:
                multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]  # untyped upstream
            if not stopping:
                log.error("worker died; restarting", pid=process.pid, exitcode=process.exitcode)
                workers.append(start())
            elif process.exitcode != 0:
                failed = True
    sys.stderr.flush()
    return 1 if failed else 0
