"""The proxy's listener fan-out: a burst of new connections is accepted in a few loop
iterations, not one per iteration (uvloop/libuv accepts one per listener per iteration)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import pytest
import uvloop

from streamproxy.server import ACCEPT_FANOUT, FANOUT_SUPPORTED, accept_fanout, bind

pytestmark = pytest.mark.skipif(not FANOUT_SUPPORTED, reason="SO_REUSEPORT fan-out is Linux-only")


def _iterations_to_accept(listeners: list[socket.socket], connections: int) -> list[int]:
    """Queue `connections` in the kernel while the loop is blocked, then count the loop
    iteration in which each one reaches `connection_made`."""
    made: list[int] = []
    iteration = 0

    class Protocol(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            made.append(iteration)

    def tick(loop: asyncio.AbstractEventLoop) -> None:
        nonlocal iteration
        iteration += 1
        if len(made) < connections and iteration < 10_000:
            loop.call_soon(tick, loop)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        servers = [await loop.create_server(Protocol, sock=s, backlog=1024) for s in listeners]
        port = listeners[0].getsockname()[1]
        clients = []
        for _ in range(connections):
            client = socket.socket()
            client.setblocking(False)
            with contextlib.suppress(BlockingIOError):  # connecting in the background
                client.connect(("127.0.0.1", port))
            clients.append(client)
        time.sleep(0.2)  # every connection now waits in an accept queue
        loop.call_soon(tick, loop)
        for _ in range(200):
            if len(made) == connections:
                break
            await asyncio.sleep(0.01)
        for server in servers:
            server.close()
        for client in clients:
            client.close()

    uvloop.run(main())
    return made


def test_fanout_listeners_share_one_port():
    sock = bind("127.0.0.1", 0, fanout=True)
    listeners = accept_fanout(sock)
    try:
        assert len(listeners) == ACCEPT_FANOUT
        assert {s.getsockname() for s in listeners} == {sock.getsockname()}
    finally:
        for s in listeners:
            s.close()


def test_port_in_use_still_fails_clearly():
    """SO_REUSEPORT must not let a second proxy share a port someone listens on."""
    first = bind("127.0.0.1", 0, fanout=True)
    first.listen()
    try:
        with pytest.raises(OSError, match="in use"):
            bind("127.0.0.1", first.getsockname()[1], fanout=True)
    finally:
        first.close()


def test_a_burst_is_accepted_in_a_few_iterations():
    """64 queued connections: one listener needs 64 loop iterations, the fan-out a few."""
    single = bind("127.0.0.1", 0)
    assert len(accept_fanout(single)) == 1  # bound without fanout: nothing added
    made = _iterations_to_accept([single], 64)
    assert len(made) == 64
    assert max(made) - min(made) >= 60

    sock = bind("127.0.0.1", 0, fanout=True)
    made = _iterations_to_accept(accept_fanout(sock), 64)
    assert len(made) == 64
    assert max(made) - min(made) <= 32
