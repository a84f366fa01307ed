"""Load generator: C concurrent SSE streams, one TCP connection each, every event timed.

Each stream is a raw asyncio socket (uvloop) that writes one
`POST /v1/chat/completions` with the stream's parameters as `x-bench-*` headers (see
upstream.py) and parses the response with httptools (status line, headers, chunked
transfer coding), then splits the body into SSE events itself. For every event it records:

- delivery latency: `time.monotonic_ns()` taken when the read that completed the event
  returned, minus the `ts` the upstream wrote into the event right before sending it;
- byte-exactness: the event must equal, byte for byte, `upstream.event(ts, seq, size)`
  (so its size, its content and its framing are what the upstream sent), and its `seq`
  must be the previous one plus one (in order, none lost).

Per stream: TTFB (first response byte, i.e. the status line, minus the moment the request
was written) and TTFT (first event minus the same moment). SSE comment lines (a proxy's
keepalive, `: ...`) are counted and otherwise ignored, as every SSE client does.

A stream is `ok` when it got 200, every event, `data: [DONE]` and the chunked terminator.
Streams open over a ramp (stream i at i * ramp / C) so their events do not all fall due in
the same millisecond. Everything is bounded: past `time_cap_s` the remaining streams are
cut (`cut`; an error unless the phase expects it, as the max phase does).

`hold` mode (the memory phase): once every stream has its first event, the generator calls
`on_all_first()` (the runner samples RSS there) and closes every stream after it returns.

The load may be split over several processes (`procs`) so the generator is not the
bottleneck; their raw samples are merged before percentiles are taken.

    python benchmarks/loadgen.py http://127.0.0.1:8080 --streams 200 --events 200 --interval-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import signal
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any, cast
from urllib.parse import urlsplit

import httptools
import uvloop
from upstream import DONE_EVENT, SEQ_DIGITS, SEQ_OFFSET, TS_DIGITS, TS_OFFSET, event

BODY = b'{"model":"bench","stream":true,"messages":[{"role":"user","content":"hi"}]}'
# Quantiles kept for the CDF plot: every 0.1 % plus the far tail.
CDF_QUANTILES = [i / 1000 for i in range(1000)] + [0.9995, 0.9999, 1.0]


@dataclass
class LoadSpec:
    """One measurement's load."""

    url: str
    streams: int = 20
    events: int = 100
    interval_ms: float = 20.0
    size: int = 256
    ttft_ms: float = 0.0
    ramp_s: float = 0.1
    time_cap_s: float = 60.0
    cut_expected: bool = False  # the max phase: streams still open at the cap are not errors
    hold: bool = False  # the memory phase
    procs: int = 1


@dataclass
class Samples:
    """Raw results of one process (nanoseconds)."""

    latencies: array[int] = field(default_factory=lambda: array("q"))
    ttfb: array[int] = field(default_factory=lambda: array("q"))
    ttft: array[int] = field(default_factory=lambda: array("q"))
    errors: dict[str, int] = field(default_factory=dict)
    ok: int = 0
    cut: int = 0
    not_exact: int = 0
    out_of_order: int = 0
    keepalives: int = 0
    first_sent: int = 0
    last_event: int = 0
    cpu_s: float = 0.0  # this process's CPU time (user + sys)

    def error(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1


class StreamClient(asyncio.Protocol):
    """One stream on one connection."""

    def __init__(self, spec: LoadSpec, request: bytes, samples: Samples, gen: Generator):
        self.spec = spec
        self.request = request
        self.samples = samples
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.buffer = b""
        self.sent = 0
        self.now = 0
        self.next_seq = 0
        self.status = 0
        self.got_first_byte = False
        self.done_event = False
        self.finished = False  # outcome recorded
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.sent = time.monotonic_ns()
        if not self.samples.first_sent or self.sent < self.samples.first_sent:
            self.samples.first_sent = self.sent
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.now = time.monotonic_ns()
        if self.now > self.gen.deadline_ns:  # a busy loop runs the cap's timer late
            self.finish("cut")
            return
        if not self.got_first_byte:
            self.got_first_byte = True
            self.samples.ttfb.append(self.now - self.sent)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.finish("protocol")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.finish("closed before the end" if self.got_first_byte else "no response")
        if not self.closed.done():
            self.closed.set_result(None)

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.status != 200:
            self.finish(f"status {self.status}")

    def on_body(self, body: bytes) -> None:
        buffer = self.buffer + body if self.buffer else body
        start = 0
        while (end := buffer.find(b"\n\n", start)) >= 0:
            self.on_event(buffer[start : end + 2])
            start = end + 2
        self.buffer = buffer[start:]

    def on_message_complete(self) -> None:
        if self.done_event and self.next_seq == self.spec.events and not self.buffer:
            self.finish(None)
        else:
            self.finish("incomplete stream")

    def on_event(self, block: bytes) -> None:
        samples = self.samples
        while block.startswith(b":"):  # comment lines (keepalives)
            samples.keepalives += 1
            block = block[block.find(b"\n") + 1 :]
        if block == DONE_EVENT:
            self.done_event = True
            return
        try:
            ts = int(block[TS_OFFSET : TS_OFFSET + TS_DIGITS])
            seq = int(block[SEQ_OFFSET : SEQ_OFFSET + SEQ_DIGITS])
        except ValueError:
            samples.not_exact += 1
            return
        if block != event(ts, seq, self.spec.size):
            samples.not_exact += 1
        if seq != self.next_seq:
            samples.out_of_order += 1
        self.next_seq = seq + 1
        samples.latencies.append(self.now - ts)
        samples.last_event = max(samples.last_event, self.now)
        if seq == 0:
            samples.ttft.append(self.now - self.sent)
            self.gen.first_event()

    def finish(self, error: str | None) -> None:
        """Record the outcome once; close the connection."""
        if not self.finished:
            self.finished = True
            if error is None:
                self.samples.ok += 1
            elif error == "cut" and self.spec.cut_expected:
                self.samples.cut += 1
            else:
                self.samples.error(error)
            if self.next_seq == 0:  # never got an event: the hold phase must not wait on it
                self.gen.first_event()
        if self.transport is not None:
            self.transport.close()


class Generator:
    """Runs `streams` StreamClients in this process's event loop."""

    def __init__(self, spec: LoadSpec, streams: int, on_all_first: Callable[[], None]):
        self.spec = spec
        self.streams = streams
        self.samples = Samples()
        self.waiting_first = streams
        self.all_first = asyncio.Event()
        self.on_all_first = on_all_first
        self.deadline_ns = time.monotonic_ns() + int(spec.time_cap_s * 1e9)

    def first_event(self) -> None:
        self.waiting_first -= 1
        if self.waiting_first == 0:
            self.all_first.set()

    async def run(self) -> Samples:
        spec = self.spec
        parts = urlsplit(spec.url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        request = build_request(spec, f"{host}:{port}")
        loop = asyncio.get_running_loop()
        clients: list[StreamClient] = []

        async def one(i: int) -> None:
            await asyncio.sleep(i * spec.ramp_s / self.streams)
            client = StreamClient(spec, request, self.samples, self)
            clients.append(client)
            try:
                await loop.create_connection(lambda: client, host, port)
            except OSError as exc:
                client.finish(f"connect: {exc.strerror or exc}")
                return
            await client.closed

        try:
            async with asyncio.timeout(spec.time_cap_s), asyncio.TaskGroup() as group:
                for i in range(self.streams):
                    group.create_task(one(i))
                if spec.hold:
                    await self.all_first.wait()
                    # blocking (it waits for the runner), so off the loop: streams stay served
                    await loop.run_in_executor(None, self.on_all_first)
                    for client in clients:
                        client.finish(None)
        except TimeoutError:
            pass
        for client in clients:
            client.finish("cut")
        self.samples.cpu_s = sum(os.times()[:2])
        return self.samples


def build_request(spec: LoadSpec, host: str) -> bytes:
    """The raw HTTP/1.1 request every stream of `spec` writes."""
    path = urlsplit(spec.url).path.rstrip("/") + "/v1/chat/completions"
    return (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"accept: text/event-stream\r\ncontent-length: {len(BODY)}\r\n"
        f"x-bench-events: {spec.events}\r\nx-bench-interval: {spec.interval_ms}\r\n"
        f"x-bench-size: {spec.size}\r\nx-bench-ttft: {spec.ttft_ms}\r\n\r\n"
    ).encode() + BODY


# -- processes and the summary -----------------------------------------------------------


def _child(spec: LoadSpec, streams: int, conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle

    def all_first() -> None:
        conn.send("first")
        conn.recv()  # "release"

    samples = uvloop.run(Generator(spec, streams, all_first).run())
    conn.send(samples)
    conn.close()


def run(
    spec: LoadSpec,
    on_all_first: Callable[[], None] | None = None,
    on_start: Callable[[], None] | None = None,
    on_end: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run the load in `spec.procs` forked processes and return the merged summary.

    `on_start` runs right before the first process starts, `on_end` right after the last
    one reported (the runner samples the target's CPU time there). In hold mode
    `on_all_first` runs once every stream of every process has its first event (or has
    failed); the streams are closed when it returns."""
    context = multiprocessing.get_context("fork")
    procs = max(1, min(spec.procs, spec.streams))
    shares = [spec.streams // procs + (i < spec.streams % procs) for i in range(procs)]
    children: list[tuple[Any, Connection]] = []
    wait_s = spec.time_cap_s + 30
    if on_start is not None:
        on_start()
    try:
        for share in shares:
            ours, theirs = context.Pipe()
            process = context.Process(target=_child, args=(spec, share, theirs), daemon=True)
            process.start()
            theirs.close()
            children.append((process, ours))
        if spec.hold:
            for _, conn in children:
                _recv(conn, wait_s)
            if on_all_first is not None:
                on_all_first()
            for _, conn in children:
                conn.send("release")
        parts: list[Samples] = [_recv(conn, wait_s) for _, conn in children]
        if on_end is not None:
            on_end()
        for process, _ in children:
            process.join(10)
    finally:
        for process, _ in children:
            if process.is_alive():
                process.kill()
                process.join()
    return summarize(spec, parts)


def _recv(conn: Connection, timeout: float) -> Any:
    if not conn.poll(timeout):
        raise TimeoutError("a load generator process did not answer")
    return conn.recv()


def quantile(ordered: list[int], q: float) -> int:
    """Nearest-rank quantile of a sorted list: the smallest value with at least q of the
    samples at or below it (0 when empty)."""
    if not ordered:
        return 0
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def percentiles_ms(values: list[int]) -> dict[str, float]:
    """p50 / p90 / p99 / p99.9 / max / mean of nanosecond samples, in milliseconds."""
    ordered = sorted(values)
    out = {f"p{q * 100:g}": quantile(ordered, q) / 1e6 for q in (0.5, 0.9, 0.99, 0.999)}
    out["max"] = (ordered[-1] if ordered else 0) / 1e6
    out["mean"] = (sum(ordered) / len(ordered) if ordered else 0) / 1e6
    out["n"] = len(ordered)
    return out


def summarize(spec: LoadSpec, parts: list[Samples]) -> dict[str, Any]:
    """Merge the processes' samples into the figures the runner reports."""
    latencies = sorted(v for part in parts for v in part.latencies)
    errors: dict[str, int] = {}
    for part in parts:
        for reason, count in part.errors.items():
            errors[reason] = errors.get(reason, 0) + count
    first = min((p.first_sent for p in parts if p.first_sent), default=0)
    last = max((p.last_event for p in parts), default=0)
    duration = (last - first) / 1e9 if last > first else 0.0
    not_exact = sum(p.not_exact for p in parts)
    out_of_order = sum(p.out_of_order for p in parts)
    events = len(latencies)
    return {
        "spec": asdict(spec),
        "streams": spec.streams,
        "ok": sum(p.ok for p in parts),
        "cut": sum(p.cut for p in parts),
        "errors": errors,
        "events": events,
        "not_exact": not_exact,
        "out_of_order": out_of_order,
        "byte_exact": events > 0 and not_exact == 0 and out_of_order == 0,
        "keepalives": sum(p.keepalives for p in parts),
        "duration_s": duration,
        "events_per_s": events / duration if duration else 0.0,
        "latency_ms": percentiles_ms(latencies),
        "ttfb_ms": percentiles_ms([v for p in parts for v in p.ttfb]),
        "ttft_ms": percentiles_ms([v for p in parts for v in p.ttft]),
        "latency_cdf_ms": [round(quantile(latencies, q) / 1e6, 4) for q in CDF_QUANTILES],
        "loadgen_cpu_s": sum(p.cpu_s for p in parts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("url", help="base URL of the target, e.g. http://127.0.0.1:8080")
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--events", type=int, default=100, help="events per stream")
    parser.add_argument("--interval-ms", type=float, default=20.0, help="0 = flood")
    parser.add_argument("--size", type=int, default=256, help="bytes per event")
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--ramp-s", type=float, default=0.1)
    parser.add_argument("--time-cap-s", type=float, default=60.0)
    parser.add_argument("--procs", type=int, default=1)
    args = parser.parse_args()
    spec = LoadSpec(
        url=args.url,
        streams=args.streams,
        events=args.events,
        interval_ms=args.interval_ms,
        size=args.size,
        ttft_ms=args.ttft_ms,
        ramp_s=args.ramp_s,
        time_cap_s=args.time_cap_s,
        procs=args.procs,
    )
    summary = run(spec)
    del summary["latency_cdf_ms"]
    json.dump(summary, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
