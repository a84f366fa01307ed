"""The keepalive timer's cost: one wake-up per interval, however busy or idle the stream."""

from __future__ import annotations

import heapq
from collections.abc import Callable

from streamproxy.keepalive import KeepaliveTimer, comment_line


class FakeHandle:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """A clock and a timer queue that jump from one due callback to the next."""

    def __init__(self) -> None:
        self.now = 0.0
        self.queue: list[tuple[float, int, FakeHandle, Callable[[], None]]] = []
        self.wakeups = 0

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeHandle:
        handle = FakeHandle()
        heapq.heappush(self.queue, (self.now + delay, len(self.queue), handle, callback))
        return handle

    def run_until(self, until: float, between: Callable[[], None] | None = None) -> None:
        while self.queue and self.queue[0][0] <= until:
            due, _, handle, callback = heapq.heappop(self.queue)
            self.now = due
            if handle.cancelled:
                continue
            if between is not None:
                between()
            self.wakeups += 1
            callback()


class FakePump:
    """What the relay does with a nudge: a comment if the stream stands at a line end."""

    def __init__(self, loop: FakeLoop) -> None:
        self.loop = loop
        self.last_write = 0.0
        self.at_line_boundary = True
        self.comments: list[float] = []

    def nudge(self) -> None:
        if self.at_line_boundary:
            self.comments.append(self.loop.now)
            self.last_write = self.loop.now


def _timer(loop: FakeLoop, pump: FakePump) -> KeepaliveTimer:
    return KeepaliveTimer(pump, 15.0, pump.nudge, loop.call_later, clock=lambda: loop.now)


def test_comment_line_is_one_line():
    """The comment is one line with one newline: never a blank line of its own."""
    assert comment_line("keepalive") == b": keepalive\n"
    assert comment_line("ping").count(b"\n") == 1


def test_idle_stream_wakes_once_per_interval():
    """A silent stream: one comment and one wake-up per interval (10,000 idle streams at
    15 s are ~670 wake-ups a second, not 10,000)."""
    loop = FakeLoop()
    pump = FakePump(loop)
    _timer(loop, pump)
    loop.run_until(150.0)
    assert pump.comments == [15.0 * i for i in range(1, 11)]
    assert loop.wakeups == 10


def test_busy_stream_costs_no_extra_wakeups():
    """A stream writing every 10 ms: no comment, and still one wake-up per interval; the
    writes only move a float."""
    loop = FakeLoop()
    pump = FakePump(loop)
    _timer(loop, pump)

    def write_often() -> None:
        pump.last_write = loop.now - 0.01

    loop.run_until(150.0, between=write_often)
    assert pump.comments == []
    assert loop.wakeups <= 11


def test_writes_push_the_comment_back():
    """A write at t=10 s moves the first comment to t=25 s (silence counts from the last
    write), with one extra wake-up to re-arm."""
    loop = FakeLoop()
    pump = FakePump(loop)
    _timer(loop, pump)
    pump.last_write = 10.0
    loop.run_until(40.0)
    assert pump.comments == [25.0, 40.0]
    assert loop.wakeups == 3


def test_mid_line_silence_retries_next_interval():
    """Silence inside a line: no comment, and the timer asks again one interval later."""
    loop = FakeLoop()
    pump = FakePump(loop)
    pump.at_line_boundary = False
    _timer(loop, pump)
    loop.run_until(60.0)
    assert pump.comments == []
    assert loop.wakeups == 4


def test_cancel_stops_the_timer():
    loop = FakeLoop()
    pump = FakePump(loop)
    timer = _timer(loop, pump)
    timer.cancel()
    loop.run_until(100.0)
    assert pump.comments == []
    assert loop.wakeups == 0
