"""The contract's Prometheus metrics, owned by one object with an injected registry.

Names and labels are copied literally from `shared/contract.md`; dashboards depend on
them. Each test builds its own `CollectorRegistry` (client_python's own tests do).

Multiprocess (`serve --workers N`): `server.py` points `PROMETHEUS_MULTIPROC_DIR` at a
fresh directory before the workers import prometheus_client, so every value here lands
in mmap files and `admin.py` aggregates them per scrape. The active-streams gauge sums
live processes (`livesum`).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from streamproxy.config import MetricsConfig
from streamproxy.observer import StreamRecord

UNKNOWN_MODEL = "unknown"
OTHER_MODEL = "other"


class ModelLabels:
    """Caps the `model` label: the first `limit` distinct models keep their name, later
    ones become `other`, so no client can explode the label cardinality."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, model: str | None) -> str:
        if not model:
            return UNKNOWN_MODEL
        if model in self.seen:
            return model
        if len(self.seen) >= self.limit:
            return OTHER_MODEL
        self.seen.add(model)
        return model


class Metrics:
    """Every metric of the contract, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry, config: MetricsConfig) -> None:
        self.model_label = ModelLabels(config.max_models)
        self._children: dict[tuple[str, ...], Any] = {}
        self.requests = Counter(
            "streamproxy_requests_total",
            "Requests answered, by upstream, method and status code.",
            ["upstream", "method", "status_code"],
            registry=registry,
        )
        self.streams_active = Gauge(
            "streamproxy_streams_active",
            "Streamed responses (SSE or NDJSON) being relayed now.",
            ["upstream"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.streams = Counter(
            "streamproxy_streams_total",
            "Streamed responses finished, by outcome.",
            ["upstream", "model", "outcome"],
            registry=registry,
        )
        self.ttfb = Histogram(
            "streamproxy_time_to_first_byte_seconds",
            "Request arrival to the first response body byte written to the client.",
            ["upstream"],
            registry=registry,
            buckets=config.ttft_buckets,
        )
        self.ttft = Histogram(
            "streamproxy_time_to_first_token_seconds",
            "Request arrival to the first event carrying generated content.",
            ["upstream", "model"],
            registry=registry,
            buckets=config.ttft_buckets,
        )
        self.itl = Histogram(
            "streamproxy_inter_token_latency_seconds",
            "Gap between consecutive events carrying generated content.",
            ["upstream", "model"],
            registry=registry,
            buckets=config.itl_buckets,
        )
        self.duration = Histogram(
            "streamproxy_stream_duration_seconds",
            "Request arrival to the end of a streamed response, by outcome.",
            ["upstream", "model", "outcome"],
            registry=registry,
            buckets=config.duration_buckets,
        )
        self.output_tokens = Counter(
            "streamproxy_output_tokens_total",
            "Output tokens: the provider's usage report, else the count of token events.",
            ["upstream", "model"],
            registry=registry,
        )
        self.dropped = Counter(
            "streamproxy_dropped_connections_total",
            "Streams cut before completion, by the side that dropped and the phase.",
            ["upstream", "side", "phase"],
            registry=registry,
        )
        self.keepalives = Counter(
            "streamproxy_keepalives_sent_total",
            "SSE keepalive comments sent during upstream silence.",
            ["upstream"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            "streamproxy_upstream_errors_total",
            "Upstream failures: connect, timeout (no answer or silence), protocol.",
            ["upstream", "reason"],
            registry=registry,
        )

    def child(self, metric: str, *labels: str) -> Any:
        """The labelled child of one of the metrics above (by attribute name), memoised:
        `labels()` takes a lock and builds a key each call, ~2 µs, several times per
        request. The label sets are bounded (upstreams x capped models x enums)."""
        key = (metric, *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = getattr(self, metric).labels(*labels)
        return found

    def record(
        self, upstream: str, method: str, status: int, model: str, rec: StreamRecord
    ) -> None:
        """Account one finished request. `model` is already capped by `model_label`."""
        child = self.child
        count(child("requests", upstream, method, str(status)))
        if rec.ttfb is not None:
            observe(child("ttfb", upstream), rec.ttfb)
        if not rec.streamed:
            return
        count(child("streams", upstream, model, rec.outcome))
        observe(child("duration", upstream, model, rec.outcome), rec.duration)
        if rec.ttft is not None:
            observe(child("ttft", upstream, model), rec.ttft)
        tokens = rec.output_tokens if rec.output_tokens is not None else rec.token_events
        if tokens:
            count(child("output_tokens", upstream, model), tokens)
        side = _DROP_SIDE.get(rec.outcome)
        if side is not None:
            count(child("dropped", upstream, side, rec.phase))


def count(child: Any, amount: float = 1) -> None:
    """`Counter.inc`, without its per-call checks (amount >= 0, an observable child):
    the same value incremented, in-process or mmap-backed with --workers."""
    child._value.inc(amount)


def observe(child: Any, value: float) -> None:
    """`Histogram.observe`, without its scan of every bucket bound in Python: a bisect
    picks the same bucket (the first bound >= value). Same values as `observe`, checked
    against it in tests/test_metrics_unit.py."""
    child._buckets[bisect_left(child._upper_bounds, value)].inc(1)
    child._sum.inc(value)


# How stale a running stream's inter-token latencies may be on /metrics.
GAP_FLUSH_SECONDS = 1.0


class GapRecorder:
    """One stream's inter-token gaps, counted here and added to its ITL histogram child
    at most once per GAP_FLUSH_SECONDS, and at the end of the stream (`flush`).

    `Histogram.observe` takes two locks and scans the buckets on every call, once per
    token event: ~6 % of the relay's CPU at 10k events/s. A bisect into a local list
    costs a tenth of that. The flush adds to the same bucket and sum values `observe`
    increments (in-process or mmap-backed with --workers); tests/test_metrics.py checks
    the exposition against per-gap `observe` calls, so a client_python change that
    breaks this fails there."""

    __slots__ = ("_bounds", "_child", "_counts", "_flush_at", "_sum")

    def __init__(self, child: Any, now: float | None = None) -> None:
        self._child = child
        self._bounds: list[float] = child._upper_bounds  # ends with +Inf
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._flush_at = (time.monotonic() if now is None else now) + GAP_FLUSH_SECONDS

    def add(self, gap: float, now: float) -> None:
        # bisect_left: the first bucket whose upper bound is >= gap, as `observe` picks
        self._counts[bisect_left(self._bounds, gap)] += 1
        self._sum += gap
        if now >= self._flush_at:
            self.flush()
            self._flush_at = now + GAP_FLUSH_SECONDS

    __call__ = add  # the observer calls `add` (a plain method call is cheaper than __call__)

    def flush(self) -> None:
        if not self._sum and not any(self._counts):
            return
        buckets = self._child._buckets
        for i, count in enumerate(self._counts):
            if count:
                buckets[i].inc(count)
                self._counts[i] = 0
        self._child._sum.inc(self._sum)
        self._sum = 0.0


GapCallback = Callable[[float, float], None]


_DROP_SIDE = {
    "client_disconnect": "client",
    "upstream_disconnect": "upstream",
    "upstream_timeout": "upstream",
    "upstream_error": "upstream",
}
