"""The keepalive timer's cost: one wake-up per interval, however busy or idle the stream."""

from __future__ import annotations

import asyncio

import pytest

from streamproxy.keepalive import comment_line, run_keepalive


class FakeStream:
    """A writer whose clock is driven by the fake sleep below."""

    def __init__(self) -> None:
        self.now = 0.0
        self.last_write = 0.0
        self.comments: list[float] = []
        self.at_line_boundary = True

    async def write_keepalive(self, line: bytes, interval: float) -> bool:
        if self.now - self.last_write < interval:
            return True
        if not self.at_line_boundary:
            return False
        self.comments.append(self.now)
        self.last_write = self.now
        return True


def _run(stream: FakeStream, until: float, on_sleep=None) -> int:
    """Run the timer against a fake clock until `until`; return how often it slept."""
    sleeps = 0

    async def sleep(seconds: float) -> None:
        nonlocal sleeps
        sleeps += 1
        stream.now += seconds
        if on_sleep is not None:
            on_sleep(stream)
        if stream.now >= until:
            raise asyncio.CancelledError

    async def main() -> None:
        with pytest.raises(asyncio.CancelledError):
            await run_keepalive(
                stream, 15.0, b": keepalive\n", clock=lambda: stream.now, sleep=sleep
            )

    asyncio.run(main())
    return sleeps


def test_comment_line_is_one_line():
    """The comment is one line with one newline: never a blank line of its own."""
    assert comment_line("keepalive") == b": keepalive\n"
    assert comment_line("ping").count(b"\n") == 1


def test_idle_stream_wakes_once_per_interval():
    """A silent stream: one comment and one wake-up per interval (10,000 idle streams at
    15 s are ~670 wake-ups a second, not 10,000)."""
    stream = FakeStream()
    sleeps = _run(stream, until=150.0)
    assert stream.comments == [15.0 * i for i in range(1, 10)]
    assert sleeps == 10


def test_busy_stream_costs_no_extra_wakeups():
    """A stream writing every 10 ms: no comment, and still one wake-up per interval; the
    writes only move a float."""

    def write_often(stream: FakeStream) -> None:
        stream.last_write = stream.now - 0.01

    stream = FakeStream()
    sleeps = _run(stream, until=150.0, on_sleep=write_often)
    assert stream.comments == []
    assert sleeps <= 11


def test_mid_line_silence_retries_next_interval():
    """Silence inside a line: no comment, and the timer retries one interval later."""
    stream = FakeStream()
    stream.at_line_boundary = False
    sleeps = _run(stream, until=60.0)
    assert stream.comments == []
    assert sleeps == 4
