"""StreamObserver: what one relayed response looked like, decided from the bytes sent.

Pure: the relay passes each chunk *after* writing it, with the time it read once, and
the observer feeds the right scanner (SSE, NDJSON, or none), asks `providers` which
events carry tokens, and keeps the timings. Nothing here delays a byte.

The outcome is decided exactly once (`finish`), whichever of the pump, the disconnect
watcher or the drain gets there first; later callers get the same record. A stream in
which the provider signalled an error (an ``event: error``, a ``{"error": ...}`` chunk,
``response.failed``) is accounted as ``upstream_error`` even if its body then ended
cleanly: vLLM, for one, sends its error chunk and then ``[DONE]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from streamproxy.ndjson import NDJSONScanner
from streamproxy.providers import Api, EventFacts, classify_ndjson, classify_sse
from streamproxy.sse import SSEScanner

Outcome = Literal[
    "completed", "client_disconnect", "upstream_disconnect", "upstream_timeout", "upstream_error"
]
Phase = Literal["before_first_token", "mid_stream"]
BodyKind = Literal["sse", "ndjson", "none"]

NDJSON_TYPES = frozenset({b"application/x-ndjson", b"application/ndjson", b"application/jsonl"})


def body_kind(content_type: bytes | None) -> BodyKind:
    """Which scanner a response body needs, from its Content-Type."""
    if content_type is None:
        return "none"
    media = content_type.split(b";", 1)[0].strip().lower()
    if media == b"text/event-stream":
        return "sse"
    return "ndjson" if media in NDJSON_TYPES else "none"


@dataclass(frozen=True, slots=True)
class StreamRecord:
    """The facts of one finished response, consumed by metrics and the access log."""

    outcome: Outcome
    streamed: bool  # an SSE or NDJSON body: counts in the stream metrics
    bytes_sent: int
    ttfb: float | None  # arrival -> first body byte written to the client
    ttft: float | None  # arrival -> first token event written to the client
    token_events: int
    output_tokens: int | None  # the provider's usage report, when it sent one
    duration: float
    phase: Phase


class StreamObserver:
    """Per-response timings and counts. `on_gap` receives each inter-token gap as it happens."""

    __slots__ = (
        "_record",
        "api",
        "arrived",
        "bytes_sent",
        "error_seen",
        "first_byte_at",
        "first_token_at",
        "kind",
        "last_token_at",
        "ndjson",
        "on_gap",
        "output_tokens",
        "sse",
        "terminal_seen",
        "token_events",
    )

    def __init__(
        self,
        api: Api,
        kind: BodyKind,
        arrived: float,
        on_gap: Callable[[float, float], None] | None = None,
    ) -> None:
        self.api = api
        self.kind = kind
        self.arrived = arrived
        self.on_gap = on_gap
        self.sse = SSEScanner() if kind == "sse" else None
        self.ndjson = NDJSONScanner() if kind == "ndjson" else None
        self.bytes_sent = 0
        self.first_byte_at: float | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.token_events = 0
        self.output_tokens: int | None = None
        self.terminal_seen = False
        self.error_seen = False
        self._record: StreamRecord | None = None

    @property
    def at_line_boundary(self) -> bool:
        """Whether bytes may be inserted now without splitting an upstream line."""
        return self.sse.at_line_boundary if self.sse is not None else False

    @property
    def at_event_boundary(self) -> bool:
        """Whether a whole SSE event may be inserted now (the error frame)."""
        return self.sse.at_event_boundary if self.sse is not None else False

    @property
    def phase(self) -> Phase:
        return "before_first_token" if self.first_token_at is None else "mid_stream"

    def on_chunk(self, chunk: bytes, now: float) -> None:
        """Observe one chunk already written to the client."""
        self.bytes_sent += len(chunk)
        if self.first_byte_at is None:
            self.first_byte_at = now
        if self.sse is not None:
            for event in self.sse.feed(chunk):
                self._on_facts(classify_sse(self.api, event), now)
        elif self.ndjson is not None:
            for line in self.ndjson.feed(chunk):
                self._on_facts(classify_ndjson(self.api, line), now)

    def on_eof(self, now: float) -> None:
        """The upstream body ended cleanly: flush what the scanners held."""
        if self.sse is not None:
            for event in self.sse.finish():
                self._on_facts(classify_sse(self.api, event), now)
        elif self.ndjson is not None:
            for line in self.ndjson.finish():
                self._on_facts(classify_ndjson(self.api, line), now)

    def _on_facts(self, facts: EventFacts, now: float) -> None:
        if facts.token:
            self.token_events += 1
            if self.first_token_at is None:
                self.first_token_at = now
            elif self.on_gap is not None and self.last_token_at is not None:
                self.on_gap(now - self.last_token_at, now)
            self.last_token_at = now
        if facts.output_tokens is not None:
            self.output_tokens = facts.output_tokens
        if facts.terminal:
            self.terminal_seen = True
        if facts.error:
            self.error_seen = True

    def clean_end_outcome(self) -> Outcome:
        """The outcome of a body that ended without a transport error.

        A token stream of a known API is complete only if the provider's terminal marker
        was seen; a plain body, or a stream whose API has no known marker, that ended
        cleanly is complete.
        """
        if self.kind == "none" or self.terminal_seen or self.api == "unknown":
            return "completed"
        return "upstream_disconnect"

    def finish(self, outcome: Outcome, now: float, *, streamed: bool | None = None) -> StreamRecord:
        """Decide the outcome, once. A second caller gets the first caller's record.
        `streamed` overrides the body kind (a stream request that failed before its
        response started is still a stream). A clean end after an in-stream error is
        recorded as ``upstream_error``; the relay still ends that body cleanly, since
        the client has the provider's own error event."""
        if self._record is not None:
            return self._record
        if self.error_seen and outcome in ("completed", "upstream_disconnect"):
            outcome = "upstream_error"
        self._record = StreamRecord(
            outcome=outcome,
            streamed=self.kind != "none" if streamed is None else streamed,
            bytes_sent=self.bytes_sent,
            ttfb=None if self.first_byte_at is None else self.first_byte_at - self.arrived,
            ttft=None if self.first_token_at is None else self.first_token_at - self.arrived,
            token_events=self.token_events,
            output_tokens=self.output_tokens,
            duration=now - self.arrived,
            phase=self.phase,
        )
        return self._record
