"""Incremental, sans-IO scanner for ``text/event-stream`` bodies (WHATWG rules).

Theory of operation
===================

The relay forwards every upstream chunk to the client first and only then hands the
same bytes to `SSEScanner.feed`. The scanner never holds bytes back from anyone: it is
an observer that answers two questions for the rest of the proxy.

1. *Which events has the stream dispatched?* `feed` returns them, so `providers` can
   spot tokens, usage and the terminal marker.
2. *Where does the stream stand?* `at_line_boundary` says whether the client has seen
   a complete line, so a keepalive comment (``: keepalive\\n``) can be written without
   splitting one. `at_event_boundary` adds that no field line is pending, so a whole
   error event can be written without merging into the upstream's half-sent event.

Line ends are LF, CRLF or a lone CR. A CR always ends a line, so the line is processed
at once, but a CR that is the *last* byte seen might be the first half of a CRLF. Until
the next byte arrives the scanner is in the ``skip_lf`` state and is **not** at a line
boundary: a keepalive injected between that CR and its LF would turn the LF into a
blank line and dispatch the upstream's event early. If the next byte is an LF it is
dropped as the rest of the CRLF; anything else starts a new line.

Cost: each byte is scanned once. A chunk without CR is split on LF in C; a chunk with
CR is first normalised (CRLF, then lone CR, to LF). Only the unterminated tail of a
chunk is kept, in a bytearray, and never rescanned: the next LF completes it.

Limits: an event's data is kept up to ``max_event_bytes`` (default 1 MiB, the size of
a large tool-call argument or a base64 image chunk; openai-python and the WHATWG spec
have no limit at all). Past it the data is dropped and the event is dispatched with
``data=b""`` and ``truncated=True``, which providers treat as opaque. A partial line is
kept up to ``max_event_bytes + 8`` bytes (room for ``"event: "``/``"data: "``), so a data
value that fits the limit always fits the line; beyond that the line is counted, not
kept, and a ``data``/``event`` line that long truncates its event.

A UTF-8 BOM at the very start of the stream is skipped, even when split over chunks;
while a BOM prefix is undecided the scanner is not at a line boundary. At EOF an event
without its closing blank line is dropped (WHATWG), so `finish` returns no events.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["SSEEvent", "SSEScanner"]

_BOM = b"\xef\xbb\xbf"
_LF = 0x0A
_CR = 0x0D
_COLON = 0x3A
_LINE_SLACK = 8  # len(b"event: ") + 1: a line may exceed the data limit by its field name


class SSEEvent(NamedTuple):
    """One dispatched server-sent event (a NamedTuple: built once per event on the hot
    path, and a tuple is several times cheaper to make than a frozen dataclass)."""

    event: bytes | None
    """The ``event:`` field's value; None when the event had no ``event:`` line."""
    data: bytes
    """The ``data:`` field values joined by ``b"\\n"``; ``b""`` when truncated."""
    truncated: bool
    """The data exceeded ``max_event_bytes`` and was dropped."""


_new_event = tuple.__new__


class SSEScanner:
    """Observe a text/event-stream incrementally. Never holds bytes back from anyone.

    Line ends: LF, CRLF, lone CR (WHATWG). A CR at the end of a chunk leaves the scanner
    in ``skip_lf`` until the next byte says whether an LF follows.
    """

    __slots__ = (
        "_bom",
        "_data",
        "_event",
        "_has_data",
        "_line_cap",
        "_max",
        "_partial",
        "_partial_len",
        "_pending",
        "_size",
        "_skip_lf",
        "_truncated",
    )

    def __init__(self, max_event_bytes: int = 1 << 20) -> None:
        """Create a scanner that keeps at most ``max_event_bytes`` of one event's data."""
        self._max = max_event_bytes
        self._line_cap = max_event_bytes + _LINE_SLACK
        self._bom = 0  # BOM bytes matched at stream start; -1 once decided
        self._skip_lf = False  # the last byte was a CR: drop an LF that follows
        self._partial = bytearray()  # the unterminated line, at most _line_cap bytes
        self._partial_len = 0  # its true length, counted past the cap
        self._pending = False  # a field line was seen since the last blank line
        self._event: bytes | None = None
        self._data: list[bytes] = []
        self._size = 0  # data bytes so far, joining LFs included
        self._has_data = False
        self._truncated = False

    @property
    def at_line_boundary(self) -> bool:
        """True at stream start and right after a line ended (LF, CRLF, or a lone CR
        followed by a byte that is not LF). False after a trailing CR, inside a line,
        and inside an undecided BOM prefix."""
        return not self._partial_len and not self._skip_lf and self._bom <= 0

    @property
    def at_event_boundary(self) -> bool:
        """`at_line_boundary`, and no field line is pending since the last blank line.

        Comment lines (``:...``) do not make an event pending. Here a whole new event may
        be written without merging into one the upstream has started.
        """
        return not self._pending and self.at_line_boundary

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Scan the next chunk of the stream; return the events it dispatched."""
        if (
            chunk[-2:] == b"\n\n"
            and chunk[:6] == b"data: "
            and self._bom < 0
            and not (self._partial_len or self._pending or self._skip_lf)
            and _CR not in chunk  # an int: `bytes in bytes` costs twice as much (3.11)
            and len(chunk) <= self._max
        ):
            # Fast paths for the common chunks: whole single-line data events. The events
            # are made with tuple.__new__: NamedTuple's own __new__ is a Python function.
            if chunk.find(b"\n") == len(chunk) - 2:  # one event (find is a memchr)
                return [_new_event(SSEEvent, (None, chunk[6:-2], False))]
            # k events: every LF is in one of the k-1 separators or the final blank line
            if chunk.count(b"\n") == 2 * chunk.count(b"\n\ndata: ") + 2:
                return [
                    _new_event(SSEEvent, (None, e[6:], False)) for e in chunk[:-2].split(b"\n\n")
                ]
        if self._bom >= 0:
            chunk = self._skip_bom(chunk)
        if self._skip_lf and chunk:
            self._skip_lf = False
            if chunk[0] == _LF:
                chunk = chunk[1:]
        if not chunk:
            return []
        if chunk.find(b"\r") >= 0:  # slow path: normalise every line end to LF
            self._skip_lf = chunk[-1] == _CR
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = chunk.split(b"\n")
        tail = lines.pop()
        events: list[SSEEvent] = []
        if lines:
            if self._partial_len:
                first = self._complete_partial(lines[0])
                if first is None:
                    del lines[0]
                else:
                    lines[0] = first
            for line in lines:
                if not line:
                    if self._has_data:
                        events.append(self._dispatch())
                    else:
                        self._reset()
                elif line[0] != _COLON:
                    self._field(line)
        if tail:
            room = self._line_cap - len(self._partial)
            if room > 0:
                self._partial += tail[:room]
            self._partial_len += len(tail)
        return events

    def finish(self) -> list[SSEEvent]:
        """Signal EOF. An event without its closing blank line is dropped (WHATWG), so
        this returns no events; the boundary properties keep describing the stream as it
        ended (e.g. `at_event_boundary` is False if it stopped inside an event)."""
        return []

    def _skip_bom(self, chunk: bytes) -> bytes:
        seen = _BOM[: self._bom] + chunk
        if len(seen) < len(_BOM) and _BOM.startswith(seen):
            self._bom = len(seen)  # still undecided: hold the prefix back from parsing
            return b""
        self._bom = -1
        return seen[len(_BOM) :] if seen.startswith(_BOM) else seen

    def _complete_partial(self, rest: bytes) -> bytes | None:
        """Join the held partial line with its rest; None if the line was overlong."""
        fits = self._partial_len + len(rest) <= self._line_cap
        self._partial += rest if fits else rest[:16]  # overlong: enough to name the field
        line = bytes(self._partial if fits else self._partial[:16])
        self._partial.clear()
        self._partial_len = 0
        if fits:
            return line
        if line[0] != _COLON:  # an overlong comment is simply skipped
            self._overlong(line)
        return None

    def _field(self, line: bytes) -> None:
        self._pending = True
        if len(line) > self._line_cap:
            self._overlong(line[:16])
            return
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._size += len(value) + self._has_data  # + the LF that joins it
            self._has_data = True
            if self._truncated:
                return
            if self._size > self._max:
                self._truncate()
            else:
                self._data.append(value)
        elif name == b"event":
            self._event = value

    def _overlong(self, head: bytes) -> None:
        """A field line longer than the line cap: count it, keep none of it."""
        self._pending = True
        name = head.partition(b":")[0]
        if name == b"data":
            self._has_data = True
            self._truncate()
        elif name == b"event":
            self._event = None
            self._truncate()

    def _truncate(self) -> None:
        self._truncated = True
        self._data = []

    def _dispatch(self) -> SSEEvent:
        data = b"" if self._truncated else b"\n".join(self._data)
        event = SSEEvent(self._event, data, self._truncated)
        self._reset()
        return event

    def _reset(self) -> None:
        self._pending = False
        self._event = None
        self._data = []
        self._size = 0
        self._has_data = False
        self._truncated = False
