"""Metrics: the contract's names, types and labels; the model-label cap; what one
`record()` adds. Each test builds its own CollectorRegistry (client_python's own tests do)."""

from __future__ import annotations

import dataclasses

import pytest
from prometheus_client import CollectorRegistry

from streamproxy.config import MetricsConfig
from streamproxy.metrics import GAP_FLUSH_SECONDS, GapRecorder, Metrics, ModelLabels, observe
from streamproxy.observer import StreamRecord

# The contract's table (shared/contract.md), copied on purpose: a rename here is a
# breaking change for every dashboard and alert, and must fail a test.
CONTRACT = {
    "streamproxy_requests_total": ("counter", ("upstream", "method", "status_code")),
    "streamproxy_streams_active": ("gauge", ("upstream",)),
    "streamproxy_streams_total": ("counter", ("upstream", "model", "outcome")),
    "streamproxy_time_to_first_byte_seconds": ("histogram", ("upstream",)),
    "streamproxy_time_to_first_token_seconds": ("histogram", ("upstream", "model")),
    "streamproxy_inter_token_latency_seconds": ("histogram", ("upstream", "model")),
    "streamproxy_stream_duration_seconds": ("histogram", ("upstream", "model", "outcome")),
    "streamproxy_output_tokens_total": ("counter", ("upstream", "model")),
    "streamproxy_dropped_connections_total": ("counter", ("upstream", "side", "phase")),
    "streamproxy_keepalives_sent_total": ("counter", ("upstream",)),
    "streamproxy_upstream_errors_total": ("counter", ("upstream", "reason")),
}

COMPLETED = StreamRecord(
    outcome="completed",
    streamed=True,
    bytes_sent=1000,
    ttfb=0.05,
    ttft=0.3,
    token_events=10,
    output_tokens=None,
    duration=0.8,
    phase="mid_stream",
)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry) -> Metrics:
    return Metrics(registry, MetricsConfig())


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def test_every_contract_metric_with_its_type_and_labels(registry, metrics):
    """The registry holds exactly the contract's metrics, with its types and label names."""
    for name, (kind, labels) in CONTRACT.items():
        child = getattr(metrics, ATTRIBUTES[name]).labels(**dict.fromkeys(labels, "x"))
        if kind == "histogram":
            child.observe(1)
        else:
            child.inc()
    found = {}
    for family in registry.collect():
        name = family.name + "_total" if family.type == "counter" else family.name
        keys = {frozenset(s.labels) - {"le"} for s in family.samples}
        found[name] = (family.type, keys)
    assert found == {name: (kind, {frozenset(labels)}) for name, (kind, labels) in CONTRACT.items()}


ATTRIBUTES = {
    "streamproxy_requests_total": "requests",
    "streamproxy_streams_active": "streams_active",
    "streamproxy_streams_total": "streams",
    "streamproxy_time_to_first_byte_seconds": "ttfb",
    "streamproxy_time_to_first_token_seconds": "ttft",
    "streamproxy_inter_token_latency_seconds": "itl",
    "streamproxy_stream_duration_seconds": "duration",
    "streamproxy_output_tokens_total": "output_tokens",
    "streamproxy_dropped_connections_total": "dropped",
    "streamproxy_keepalives_sent_total": "keepalives",
    "streamproxy_upstream_errors_total": "upstream_errors",
}


def test_model_labels_cap():
    """The first `limit` distinct models keep their names, later ones become `other`,
    a known model keeps its name after the cap, and no model is `unknown`."""
    labels = ModelLabels(2)
    assert [labels(m) for m in ("a", "b", "c", "a", "d", "b")] == [
        "a",
        "b",
        "other",
        "a",
        "other",
        "b",
    ]
    assert labels(None) == "unknown"
    assert labels("") == "unknown"
    assert labels.seen == {"a", "b"}


def test_model_labels_zero_limit():
    """A cap of 0 folds every model into `other` (and `unknown` stays `unknown`)."""
    labels = ModelLabels(0)
    assert labels("a") == "other"
    assert labels(None) == "unknown"


def test_metrics_caps_models_from_config(registry):
    """`MetricsConfig.max_models` sets the cap."""
    metrics = Metrics(registry, MetricsConfig(max_models=1))
    assert [metrics.model_label(m) for m in ("x", "y", "x")] == ["x", "other", "x"]


def test_record_completed_stream(registry, metrics):
    """A completed stream: one request, TTFB, TTFT, duration, tokens; no drop."""
    metrics.record("u", "POST", 200, "m", COMPLETED)
    assert (
        value(
            registry, "streamproxy_requests_total", upstream="u", method="POST", status_code="200"
        )
        == 1
    )
    assert (
        value(registry, "streamproxy_streams_total", upstream="u", model="m", outcome="completed")
        == 1
    )
    assert value(registry, "streamproxy_time_to_first_byte_seconds_sum", upstream="u") == 0.05
    assert (
        value(registry, "streamproxy_time_to_first_token_seconds_count", upstream="u", model="m")
        == 1
    )
    assert (
        value(registry, "streamproxy_time_to_first_token_seconds_sum", upstream="u", model="m")
        == 0.3
    )
    assert (
        value(
            registry,
            "streamproxy_time_to_first_token_seconds_bucket",
            upstream="u",
            model="m",
            le="0.25",
        )
        == 0
    )
    assert (
        value(
            registry,
            "streamproxy_time_to_first_token_seconds_bucket",
            upstream="u",
            model="m",
            le="0.5",
        )
        == 1
    )
    duration = "streamproxy_stream_duration_seconds_count"
    assert value(registry, duration, upstream="u", model="m", outcome="completed") == 1
    assert value(registry, "streamproxy_output_tokens_total", upstream="u", model="m") == 10
    assert not [
        s
        for f in registry.collect()
        if f.name == "streamproxy_dropped_connections"
        for s in f.samples
    ]


def test_record_prefers_reported_usage(registry, metrics):
    """output_tokens uses the provider's usage report over the count of token events."""
    metrics.record("u", "POST", 200, "m", dataclasses.replace(COMPLETED, output_tokens=42))
    assert value(registry, "streamproxy_output_tokens_total", upstream="u", model="m") == 42


def test_record_plain_response(registry, metrics):
    """A response that is not a stream counts as a request (and its TTFB) only."""
    plain = dataclasses.replace(COMPLETED, streamed=False, ttft=None, token_events=0)
    metrics.record("u", "GET", 200, "unknown", plain)
    assert (
        value(registry, "streamproxy_requests_total", upstream="u", method="GET", status_code="200")
        == 1
    )
    assert value(registry, "streamproxy_time_to_first_byte_seconds_count", upstream="u") == 1
    names = {s.name for f in registry.collect() for s in f.samples}
    assert "streamproxy_streams_total" not in names
    assert "streamproxy_time_to_first_token_seconds_count" not in names


@pytest.mark.parametrize(
    ("outcome", "side"),
    [
        ("client_disconnect", "client"),
        ("upstream_disconnect", "upstream"),
        ("upstream_timeout", "upstream"),
        ("upstream_error", "upstream"),
    ],
)
@pytest.mark.parametrize("phase", ["before_first_token", "mid_stream"])
def test_record_drop_side_and_phase(registry, metrics, outcome, side, phase):
    """Every non-completed outcome is one dropped connection, on its side, in its phase."""
    record = dataclasses.replace(COMPLETED, outcome=outcome, phase=phase)
    metrics.record("u", "POST", 200, "m", record)
    assert (
        value(
            registry, "streamproxy_dropped_connections_total", upstream="u", side=side, phase=phase
        )
        == 1
    )
    total = sum(
        s.value
        for f in registry.collect()
        if f.name == "streamproxy_dropped_connections"
        for s in f.samples
        if s.name.endswith("_total")
    )
    assert total == 1


def test_record_stream_that_never_started(registry, metrics):
    """A stream that failed before its response (502/504): no TTFB/TTFT, no tokens, but a
    stream with its outcome, a drop before the first token, and the 5xx request."""
    failed = StreamRecord(
        outcome="upstream_timeout",
        streamed=True,
        bytes_sent=0,
        ttfb=None,
        ttft=None,
        token_events=0,
        output_tokens=None,
        duration=0.5,
        phase="before_first_token",
    )
    metrics.record("u", "POST", 504, "m", failed)
    assert (
        value(
            registry, "streamproxy_requests_total", upstream="u", method="POST", status_code="504"
        )
        == 1
    )
    assert (
        value(
            registry,
            "streamproxy_streams_total",
            upstream="u",
            model="m",
            outcome="upstream_timeout",
        )
        == 1
    )
    dropped = "streamproxy_dropped_connections_total"
    assert value(registry, dropped, upstream="u", side="upstream", phase="before_first_token") == 1
    names = {s.name for f in registry.collect() for s in f.samples}
    assert "streamproxy_time_to_first_byte_seconds_count" not in names
    assert "streamproxy_output_tokens_total" not in names


# -- GapRecorder: batched inter-token latencies ------------------------------------------

GAPS = [0.0, 0.0004, 0.001, 0.0011, 0.02, 0.02, 0.5, 3.0, 11.0, 99.0]


def _itl_samples(registry: CollectorRegistry) -> dict[str, float]:
    return {
        f"{s.name}{sorted(s.labels.items())}": s.value
        for family in registry.collect()
        if family.name == "streamproxy_inter_token_latency_seconds"
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_gap_recorder_matches_observe_exactly():
    """Buckets (edges included: a gap equal to a bound goes in that bound's bucket), +Inf,
    count and sum come out as if every gap had been observed one by one."""
    direct_registry, batched_registry = CollectorRegistry(), CollectorRegistry()
    direct = Metrics(direct_registry, MetricsConfig())
    batched = Metrics(batched_registry, MetricsConfig())
    for gap in GAPS:
        direct.child("itl", "up", "m").observe(gap)
    recorder = GapRecorder(batched.child("itl", "up", "m"), now=0.0)
    for gap in GAPS:
        recorder(gap, 0.5)
    assert (
        _itl_samples(batched_registry)[
            "streamproxy_inter_token_latency_seconds_count[('model', 'm'), ('upstream', 'up')]"
        ]
        == 0
    )  # not flushed yet
    recorder.flush()
    recorder.flush()  # a second flush adds nothing
    assert _itl_samples(batched_registry) == _itl_samples(direct_registry)


def test_observe_matches_histogram_observe_exactly():
    """The bisect `observe` fills the same buckets (bounds included), count and sum as
    prometheus_client's own `Histogram.observe`."""
    direct_registry, fast_registry = CollectorRegistry(), CollectorRegistry()
    direct = Metrics(direct_registry, MetricsConfig())
    fast = Metrics(fast_registry, MetricsConfig())
    for gap in GAPS:
        direct.child("itl", "up", "m").observe(gap)
        observe(fast.child("itl", "up", "m"), gap)
    assert _itl_samples(fast_registry) == _itl_samples(direct_registry)


def test_gap_recorder_flushes_a_running_stream_every_second():
    """A long stream's gaps reach /metrics within GAP_FLUSH_SECONDS, not only at its end."""
    registry = CollectorRegistry()
    metrics = Metrics(registry, MetricsConfig())
    recorder = GapRecorder(metrics.child("itl", "up", "m"), now=100.0)
    key = "streamproxy_inter_token_latency_seconds_count[('model', 'm'), ('upstream', 'up')]"
    recorder(0.02, 100.5)
    assert _itl_samples(registry)[key] == 0
    recorder(0.02, 100.0 + GAP_FLUSH_SECONDS)
    assert _itl_samples(registry)[key] == 2
    recorder(0.02, 101.5)  # the next flush is due a second after the last one
    assert _itl_samples(registry)[key] == 2
    recorder(0.02, 102.0 + GAP_FLUSH_SECONDS)
    assert _itl_samples(registry)[key] == 4
