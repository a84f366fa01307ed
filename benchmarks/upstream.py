"""A fake OpenAI-compatible SSE upstream, fast enough never to be the bottleneck.

Raw asyncio on uvloop with httptools request parsing: no framework on the send path.
Every response is `text/event-stream`, chunked, one HTTP chunk per event. Each event is an
OpenAI chat-completion chunk of exactly `size` bytes whose id carries the send time
(`time.monotonic_ns()`, taken right before the write) and a sequence number:

    data: {"id":"chatcmpl-<ts, 20 digits>-<seq, 7 digits>","object":"chat.completion.chunk",...}

followed by a blank line; the stream ends with `data: [DONE]`. CLOCK_MONOTONIC is shared by
every process on the machine, so the load generator's arrival time minus `ts` is the
delivery latency, and `event(ts, seq, size)` rebuilds the exact bytes to compare against.

Per-request parameters, as request headers (all optional):

    x-bench-events    events in the stream (default 10)
    x-bench-interval  milliseconds between events (default 20; 0 = as fast as the client
                      reads, with the transport's backpressure as the only brake)
    x-bench-size      bytes per event, `data: ` and the blank line included (default 256)
    x-bench-ttft      milliseconds before the first event (default 0)

Events follow an absolute schedule (event k is due at start + ttft + k * interval), so a
late timer never stretches the stream; events that fell due together go out in one write.
`GET /healthz` answers 200 (readiness checks through a proxy).

    python benchmarks/upstream.py [--host 127.0.0.1] [--port 0] [--procs 1]

prints `listening on HOST:PORT` once bound, then serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import signal
import socket
import sys
import time
from typing import cast

import httptools
import uvloop

from streamproxy.server import accept_fanout, bind

# -- the event format (shared with loadgen.py) -------------------------------------------

PREFIX = b'data: {"id":"chatcmpl-'
TS_DIGITS = 20
SEQ_DIGITS = 7
TS_OFFSET = len(PREFIX)
SEQ_OFFSET = TS_OFFSET + TS_DIGITS + 1
_MIDDLE = (
    b'","object":"chat.completion.chunk","created":1700000000,"model":"bench",'
    b'"system_fingerprint":null,"choices":[{"index":0,"delta":{"content":"'
)
_END = b'"},"logprobs":null,"finish_reason":null}]}\n\n'
MIN_SIZE = SEQ_OFFSET + SEQ_DIGITS + len(_MIDDLE) + len(_END)
DONE_EVENT = b"data: [DONE]\n\n"
_FILLER = b" the quick brown fox jumps over the lazy dog"


@functools.cache
def event_tail(size: int) -> bytes:
    """Everything after the sequence number, for an event of `size` bytes."""
    if size < MIN_SIZE:
        raise ValueError(f"event size must be at least {MIN_SIZE} bytes")
    filler_len = size - MIN_SIZE
    filler = (_FILLER * (filler_len // len(_FILLER) + 1))[:filler_len]
    return _MIDDLE + filler + _END


def event(ts: int, seq: int, size: int) -> bytes:
    """The exact bytes of event `seq` sent at monotonic time `ts` (ns)."""
    return b"%s%020d-%07d%s" % (PREFIX, ts, seq, event_tail(size))


# -- the server --------------------------------------------------------------------------

HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
DONE = b"%x\r\n%s\r\n0\r\n\r\n" % (len(DONE_EVENT), DONE_EVENT)
HEALTH = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\n\r\nok\n"
CATCH_UP_BATCH = 64  # events written at once when timers ran late
FLOOD_BATCH = 16  # events per loop turn when interval is 0


class UpstreamProtocol(asyncio.Protocol):
    """One client connection: parse requests (keep-alive), stream one response at a time."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.params: dict[bytes, bytes] = {}
        self.paused = False
        self.timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self.streaming = False
        self.keep_alive = True
        self.pending = b""  # the response head, sent with the first event when ttft is 0
        self.seq = self.events = self.size = 0
        self.start = self.interval = 0.0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._close()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.streaming and self.timer is None:
            self.tick()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.streaming = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.params = {}

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name.startswith(b"x-bench-"):
            self.params[name[8:]] = value

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        if self.transport is None or self.streaming:
            return  # a pipelined request during a stream: not part of the benchmark
        if self.url.startswith(b"/healthz"):
            self.transport.write(HEALTH)
            if not self.keep_alive:
                self._close()
            return
        self._start_stream()

    # the stream
    def _start_stream(self) -> None:
        assert self.transport is not None
        params = self.params
        self.events = int(params.get(b"events", b"10"))
        self.interval = float(params.get(b"interval", b"20")) / 1000
        self.size = int(params.get(b"size", b"256"))
        ttft = float(params.get(b"ttft", b"0")) / 1000
        event_tail(self.size)  # validates the size before anything is sent
        self.seq = 0
        self.streaming = True
        self.start = self.loop.time() + ttft
        if ttft > 0:
            self.transport.write(HEAD)
            self.timer = self.loop.call_at(self.start, self.tick)
        else:
            self.pending = HEAD
            self.tick()

    def tick(self) -> None:
        """Write every event that is due (at least one), then schedule the next."""
        self.timer = None
        transport = self.transport
        if transport is None or not self.streaming or self.paused:
            return  # resume_writing() calls tick() again
        if self.interval == 0:
            due = self.seq + FLOOD_BATCH
        else:
            elapsed = self.loop.time() - self.start
            due = min(int(elapsed / self.interval) + 1, self.seq + CATCH_UP_BATCH)
        due = min(max(due, self.seq + 1), self.events)
        size = self.size
        tail = event_tail(size)
        chunk_head = b"%x\r\n" % size
        parts = [self.pending]
        self.pending = b""
        now_ns = time.monotonic_ns
        for seq in range(self.seq, due):
            parts.append(b"%s%s%020d-%07d%s\r\n" % (chunk_head, PREFIX, now_ns(), seq, tail))
        self.seq = due
        finished = due >= self.events
        if finished:
            parts.append(DONE)
            self.streaming = False
        transport.write(b"".join(parts))
        if finished:
            if not self.keep_alive:
                self._close()
        elif self.interval == 0:
            self.timer = self.loop.call_soon(self.tick)
        else:
            self.timer = self.loop.call_at(self.start + self.seq * self.interval, self.tick)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def serve(sock: socket.socket) -> None:
    """Serve on a bound, listening socket until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # uvloop accepts one connection per listening socket per loop iteration; more
    # SO_REUSEPORT listeners let a burst of new streams in at once (as streamproxy does).
    servers = [
        await loop.create_server(UpstreamProtocol, sock=s, backlog=4096)
        for s in accept_fanout(sock)
    ]
    await stop.wait()
    for server in servers:
        server.close()


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket."""
    sock = bind(host, port, fanout=True)
    sock.listen(4096)
    return sock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--procs", type=int, default=1, help="processes sharing the socket")
    args = parser.parse_args()
    sock = listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    print(f"listening on {host}:{port}", flush=True)
    for _ in range(args.procs - 1):
        if os.fork() == 0:
            break  # a child serves the same socket; the kernel spreads the accepts
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(sock))
    sys.exit(0)


if __name__ == "__main__":
    main()
