"""A raw TCP upstream for failure tests: it writes exactly what a test says and
records when the proxy closes the connection (mitmproxy's `tcp_server` idea). It runs
its own event loop in a thread, on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "RawServer"], Awaitable[None]]


@dataclass
class RawServer:
    url: str = ""
    closed_at: list[float] = field(default_factory=list)  # when the proxy hung up, per connection
    bytes_written: int = 0
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)  # request heads, for handlers that keep them

    def wait_closed(self, count: int = 1, timeout: float = 5.0) -> float | None:
        """The time the `count`th connection was closed by the proxy, or None on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.closed_at) >= count:
                return self.closed_at[count - 1]
            time.sleep(0.002)
        return None


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """Read one request head and its Content-Length body; return the head."""
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":", 1)[1]))
    return head


async def _watch_eof(reader: asyncio.StreamReader, state: RawServer) -> None:
    try:
        while await reader.read(65536):
            pass
    except ConnectionResetError:
        pass  # closed with bytes unread on its side: a reset, not a FIN, but closed all the same
    state.closed_at.append(time.monotonic())


@contextlib.contextmanager
def raw_server(handler: Handler, *, raw: bool = False) -> Iterator[RawServer]:
    """Serve `handler(reader, writer, state)` for every connection. The first request is
    read for the handler, and EOF from the proxy is recorded in `state.closed_at`;
    with `raw=True` the handler gets the connection untouched (to serve several requests)."""
    state = RawServer()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    started = threading.Event()

    handlers: set[asyncio.Task[None]] = set()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            if raw:
                await handler(reader, writer, state)
                return
            await read_request(reader)
            async with asyncio.TaskGroup() as group:
                group.create_task(_watch_eof(reader, state))
                await handler(reader, writer, state)
        except (ConnectionError, asyncio.IncompleteReadError, ExceptionGroup):
            pass
        except asyncio.CancelledError:
            return  # the server is stopping: end quietly (asyncio logs cancelled handlers)
        finally:
            handlers.discard(task)
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        state.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        started.set()
        await stop.wait()
        server.close()
        for task in list(handlers):
            task.cancel()
        await asyncio.sleep(0.01)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(5)
    try:
        yield state
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(5)
        loop.close()


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)
