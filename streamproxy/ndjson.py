"""Incremental, sans-IO scanner for newline-delimited JSON bodies (Ollama's streams).

The same shape as `streamproxy.sse.SSEScanner`: the relay forwards a chunk, then feeds
it here; nothing is held back from the client. Lines end with LF; one trailing CR is
stripped. Blank (whitespace-only) lines are skipped. Only the unterminated tail of a
chunk is kept, and never rescanned.

Limit: a line is kept up to ``max_line_bytes`` (default 1 MiB, far above Ollama's
largest line, the final stats line). A longer line is counted, not kept, and comes out
as ``b""``, which providers treat as opaque.
"""

from __future__ import annotations

__all__ = ["NDJSONScanner"]

_CR = 0x0D


class NDJSONScanner:
    """Observe an NDJSON stream incrementally and return its complete lines."""

    __slots__ = (
        "_cap",
        "_max",
        "_partial",
        "_partial_len",
    )

    def __init__(self, max_line_bytes: int = 1 << 20) -> None:
        """Create a scanner that keeps at most ``max_line_bytes`` of one line."""
        self._max = max_line_bytes
        self._cap = max_line_bytes + 1  # room for a CR that may turn out to be trailing
        self._partial = bytearray()  # the unterminated line, at most _cap bytes
        self._partial_len = 0  # its true length, counted past the cap

    @property
    def at_line_boundary(self) -> bool:
        """True at stream start and right after an LF."""
        return not self._partial_len

    def feed(self, chunk: bytes) -> list[bytes]:
        """Scan the next chunk; return the non-blank lines it completed, without their
        line ends (``b""`` for a line over the limit)."""
        lines = chunk.split(b"\n")
        tail = lines.pop()
        out: list[bytes] = []
        if lines:
            if self._partial_len:
                self._flush_partial(lines[0], out)
                del lines[0]
            for line in lines:
                self._line(line, out)
        if tail:
            room = self._cap - len(self._partial)
            if room > 0:
                self._partial += tail[:room]
            self._partial_len += len(tail)
        return out

    def finish(self) -> list[bytes]:
        """Signal EOF and return a final unterminated line, if it is not blank: a JSON
        document without a trailing newline is still a complete object."""
        out: list[bytes] = []
        if self._partial_len:
            self._flush_partial(b"", out)
        return out

    def _flush_partial(self, rest: bytes, out: list[bytes]) -> None:
        """Complete the held partial line with ``rest``."""
        if self._partial_len + len(rest) > self._cap:
            out.append(b"")  # overlong even without a trailing CR: its content was dropped
        else:
            self._partial += rest
            self._line(bytes(self._partial), out)
        self._partial.clear()
        self._partial_len = 0

    def _line(self, line: bytes, out: list[bytes]) -> None:
        if line[-1:] == b"\r":
            line = line[:-1]
        if len(line) > self._max:
            out.append(b"")
        elif line and not line.isspace():
            out.append(line)
