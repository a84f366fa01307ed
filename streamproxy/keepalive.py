"""KeepaliveTimer: SSE comments while the upstream is silent.

One sleeping task per stream, created once. The hot path only stores the time of its
last write (`Downstream.last_write`); the timer sleeps until `last_write + interval`,
and if nothing was written meanwhile it asks the writer to send the comment. A busy
stream costs the timer one wake-up per interval, an idle one too: 10,000 idle streams
at 15 s are ~670 wake-ups a second, not 10,000.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol


class Writer(Protocol):
    last_write: float

    async def write_keepalive(self, line: bytes, interval: float) -> bool: ...


def comment_line(comment: str) -> bytes:
    """`: <comment>\\n`: one comment line, one newline, never a blank line of its own
    (after an `id:` field a blank line dispatches an empty event: openai-python #2722)."""
    return b": " + comment.encode("utf-8") + b"\n"


async def run_keepalive(
    writer: Writer,
    interval: float,
    line: bytes,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Send `line` through `writer` whenever it has been silent for `interval`. Runs
    until cancelled. A comment that cannot go out (the stream stands mid-line) is
    retried one interval later."""
    while True:
        wait = writer.last_write + interval - clock()
        if wait > 0:
            await sleep(wait)
        elif not await writer.write_keepalive(line, interval):
            await sleep(interval)
