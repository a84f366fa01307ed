"""KeepaliveTimer: SSE comments while the upstream is silent.

No task, no lock: one TimerHandle per stream, re-armed only when it fires. The hot path
only stores the time of its last write (`relay.Pump.last_write`); when the stream has
been silent for `interval` the timer calls the pump, which writes the comment if the
upstream stream stands at a line boundary. Writes are callbacks on one event loop, so a
comment can only ever land between two chunks. A busy stream costs one wake-up per
interval, an idle one too: 10,000 idle streams at 15 s are ~670 wake-ups a second, not
10,000.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

# Timers fire a little early or late (uvloop keeps milliseconds); a wait shorter than this
# counts as due rather than re-arming for a sliver.
SLACK = 0.002


class Writer(Protocol):
    last_write: float


class Cancellable(Protocol):
    def cancel(self) -> None: ...


CallLater = Callable[[float, Callable[[], None]], Cancellable]


def comment_line(comment: str) -> bytes:
    """`: <comment>\\n`: one comment line, one newline, never a blank line of its own
    (after an `id:` field a blank line dispatches an empty event: openai-python #2722)."""
    return b": " + comment.encode("utf-8") + b"\n"


class KeepaliveTimer:
    """Calls `nudge()` whenever `writer` has been silent for `interval`, then once per
    interval while the silence lasts (a comment that could not go out because the stream
    stood mid-line is retried one interval later)."""

    __slots__ = ("_call_later", "_clock", "_handle", "interval", "nudge", "writer")

    def __init__(
        self,
        writer: Writer,
        interval: float,
        nudge: Callable[[], None],
        call_later: CallLater,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.writer = writer
        self.interval = interval
        self.nudge = nudge
        self._call_later = call_later
        self._clock = clock
        self._handle: Cancellable | None = None
        self._arm(writer.last_write + interval - clock())

    def _arm(self, delay: float) -> None:
        self._handle = self._call_later(delay, self._fire)

    def _fire(self) -> None:
        wait = self.writer.last_write + self.interval - self._clock()
        if wait > SLACK:  # written meanwhile: sleep until the new silence is long enough
            self._arm(wait)
            return
        self.nudge()
        self._arm(self.interval)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
