"""A slow client never makes the proxy hold more than a small, bounded part of a stream."""

from __future__ import annotations

import asyncio
import socket
import time

from tests.rawserver import SSE_HEAD, chunk, raw_server, read_request

EVENT = b"data: " + b"x" * 16378 + b"\n\n"  # 16 KiB events
TOTAL = 256 * 1024 * 1024  # the upstream would send 256 MiB as fast as it can


async def firehose(reader, writer: asyncio.StreamWriter, state) -> None:
    writer.write(SSE_HEAD)
    while state.bytes_written < TOTAL:
        writer.write(chunk(EVENT))
        state.bytes_written += len(EVENT)
        await writer.drain()


def test_slow_reader_bounds_what_the_proxy_holds(start_proxy):
    """While the client reads nothing, the upstream can push no more than socket buffers
    and a small bounded amount; once the client reads, everything flows."""
    with raw_server(firehose) as upstream, start_proxy(upstream.url) as proxy:
        host, port = proxy.url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
        time.sleep(2.0)  # the client reads nothing
        stalled_at = upstream.bytes_written
        time.sleep(1.0)
        assert upstream.bytes_written == stalled_at, "the upstream kept being read"
        # Kernel buffers on loopback (both sockets, both directions) account for a few
        # MiB; a proxy that buffered in user space would have taken all 256 MiB by now.
        assert stalled_at < 32 * 1024 * 1024, stalled_at
        received = 0
        sock.settimeout(5)
        while received < 64 * 1024 * 1024:
            data = sock.recv(1 << 20)
            assert data
            received += len(data)
        assert upstream.bytes_written > stalled_at  # reading resumed the flow
        sock.close()


SMALL = b"y" * 20000


async def small_answers_then_firehose(reader, writer: asyncio.StreamWriter, state) -> None:
    """Small JSON answers for /small, then a stream as fast as it can for anything else."""
    try:
        while True:
            head = await read_request(reader)
            if b"/small" in head.split(b"\r\n", 1)[0]:
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(SMALL), SMALL)
                )
                await writer.drain()
                continue
            writer.write(SSE_HEAD)
            while state.bytes_written < TOTAL:
                writer.write(chunk(EVENT))
                state.bytes_written += len(EVENT)
                await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass


def test_backpressure_holds_for_a_response_after_pipelined_ones(start_proxy):
    """300 pipelined small answers fill the client's buffers before a stream starts on the
    same connection: that stream starts paused, and the upstream stays unread."""
    firehose = raw_server(small_answers_then_firehose, raw=True)
    with firehose as upstream, start_proxy(upstream.url) as proxy:
        host, port = proxy.url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        smalls = b"".join(b"GET /small/%d HTTP/1.1\r\nhost: x\r\n\r\n" % i for i in range(300))
        sock.sendall(smalls + b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
        time.sleep(3.0)  # the client reads nothing
        assert upstream.bytes_written < 32 * 1024 * 1024, upstream.bytes_written
        sock.close()
