"""The Grafana dashboard and the Prometheus alert rules shipped in the chart.

Every PromQL expression may only name metrics the code registers (`streamproxy.metrics`),
with their labels from the contract. When `promtool` is installed (Debian: `prometheus`)
it also checks the syntax of every expression and runs the alerts on synthetic series.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from streamproxy.config import MetricsConfig
from streamproxy.metrics import Metrics
from tests.test_metrics_unit import CONTRACT

CHART = Path(__file__).resolve().parent.parent / "helm" / "streamproxy"
DASHBOARD = CHART / "dashboards" / "streamproxy.json"
RULES = CHART / "alerts" / "streamproxy-rules.yaml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None and not os.environ.get("CI"),  # in CI a missing promtool fails
    reason="promtool not installed (apt: prometheus)",
)

NAME = re.compile(r"streamproxy_[a-z_]+")
BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
MATCHERS = re.compile(r"\{([^{}]*)\}")
MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


def registered_names() -> set[str]:
    """The series names the code registers (counters with their `_total`)."""
    registry = CollectorRegistry()
    Metrics(registry, MetricsConfig())
    return {f.name + "_total" if f.type == "counter" else f.name for f in registry.collect()}


def metric_names(expr: str) -> set[str]:
    """Metric names in an expression, without the histogram sample suffixes."""
    return {re.sub(r"_(bucket|sum|count)$", "", name) for name in NAME.findall(expr)}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["query"]["query"])
    return exprs


def rules() -> list[dict[str, Any]]:
    return [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]


def all_exprs() -> list[str]:
    return dashboard_exprs() + [rule["expr"] for rule in rules()]


def as_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables filled in, as Prometheus sees it."""
    expr = expr.replace("$__rate_interval", "5m")
    expr = re.sub(r"label_values\((.*), *(\w+)\)$", r"group by (\2) (\1)", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


# --- both files ---------------------------------------------------------------------------


def test_contract_table_matches_the_code():
    """The names the checks below allow are exactly the ones the code registers."""
    assert registered_names() == set(CONTRACT)


@pytest.mark.parametrize("expr", all_exprs())
def test_expressions_name_only_contract_metrics_and_labels(expr):
    """Each expression names at least one contract metric and nothing else, and groups or
    filters only by labels those metrics have."""
    names = metric_names(expr)
    assert names, expr
    assert names <= registered_names(), names - registered_names()
    allowed = {"le"}.union(*(CONTRACT[name][1] for name in names))
    used = {label.strip() for group in BY.findall(expr) for label in group.split(",")} - {""}
    for matchers in MATCHERS.findall(expr):
        used |= set(MATCHER_LABEL.findall(matchers))
    assert used <= allowed, used - allowed


@pytest.mark.parametrize("expr", all_exprs())
def test_expressions_are_balanced(expr):
    """Brackets and quotes balance (a cheap syntax check when promtool is absent)."""
    stack = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for char in re.sub(r'"[^"]*"', '""', expr):
        if char in "([{":
            stack.append(char)
        elif char in pairs:
            assert stack, expr
            assert stack.pop() == pairs[char], expr
    assert not stack, expr
    assert expr.count('"') % 2 == 0, expr


# --- the dashboard --------------------------------------------------------------------------


def panel_exprs(title_words: str) -> list[str]:
    """The expressions of the panel whose title contains every word given."""
    words = title_words.lower().split()
    found = [
        p
        for p in dashboard()["panels"]
        if all(w in p["title"].lower() for w in words) and "targets" in p
    ]
    assert len(found) == 1, f"{len(found)} panels titled like {title_words!r}"
    return [t["expr"] for t in found[0]["targets"]]


def test_dashboard_shape():
    """The dashboard parses, has a uid, unique panel ids, a datasource variable behind every
    query, and every variable it uses is defined."""
    board = dashboard()
    assert board["uid"] == "streamproxy"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "upstream", "model"} <= variables
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel.get("description"), panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\$\{?(\w+)\}?", target["expr"])) - {"__rate_interval"}
            assert used <= variables, (panel["title"], used)


def test_dashboard_panels_do_not_overlap():
    """No two panels share a grid cell (Grafana would shuffle them)."""
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, (panel["title"], cells.get((x, y)))
                cells[x, y] = panel["title"]


@pytest.mark.parametrize(
    ("title", "metric", "by"),
    [
        (
            "time to first token",
            "streamproxy_time_to_first_token_seconds_bucket",
            "le, upstream, model",
        ),
        (
            "inter-token latency",
            "streamproxy_inter_token_latency_seconds_bucket",
            "le, upstream, model",
        ),
    ],
)
def test_dashboard_latency_quantiles(title, metric, by):
    """TTFT and ITL panels plot p50, p95 and p99 by upstream and model."""
    exprs = panel_exprs(title)
    assert [e.split(",")[0] for e in exprs] == [
        "histogram_quantile(0.5",
        "histogram_quantile(0.95",
        "histogram_quantile(0.99",
    ]
    for expr in exprs:
        assert f"sum by ({by}) (rate({metric}" in expr


@pytest.mark.parametrize(
    ("title", "needle"),
    [
        ("active streams by upstream", "sum by (upstream) (streamproxy_streams_active"),
        (
            "request rate by status",
            "sum by (upstream, status_code) (rate(streamproxy_requests_total",
        ),
        ("dropped connections", "sum by (side, phase) (rate(streamproxy_dropped_connections_total"),
        ("keepalive", "rate(streamproxy_keepalives_sent_total"),
        (
            "upstream errors by reason",
            "sum by (upstream, reason) (rate(streamproxy_upstream_errors_total",
        ),
        ("output tokens / s by", "sum by (upstream, model) (rate(streamproxy_output_tokens_total"),
    ],
)
def test_dashboard_panels(title, needle):
    """Active streams, request rate by status, drops by side and phase, keepalives, upstream
    errors and output tokens/s each have a panel."""
    assert any(needle in expr for expr in panel_exprs(title))


# --- the alert rules ------------------------------------------------------------------------


def test_rules_shape():
    """Every rule is an alert with a unique name, an expression, a `for:`, a severity, and a
    summary and a description."""
    document = yaml.safe_load(RULES.read_text())
    assert set(document) == {"groups"}
    names = []
    for group in document["groups"]:
        assert group["name"]
        assert group["rules"]
        for rule in group["rules"]:
            assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"Streamproxy[A-Z][A-Za-z0-9]+", rule["alert"])
            names.append(rule["alert"])
            assert rule["expr"].strip()
            assert re.fullmatch(r"\d+[smh]", rule["for"])
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert rule["annotations"]["summary"].strip()
            assert rule["annotations"]["description"].strip()
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    "needles",
    [
        ("streamproxy_dropped_connections_total",),
        ("histogram_quantile(0.95", "streamproxy_time_to_first_token_seconds_bucket"),
        ("streamproxy_upstream_errors_total", "streamproxy_requests_total"),
    ],
    ids=["dropped-connection rate", "TTFT p95", "upstream error rate"],
)
def test_required_alerts_exist(needles):
    """The issue's alerts are there: dropped-connection rate, TTFT p95, upstream error rate."""
    assert any(all(n in rule["expr"] for n in needles) for rule in rules())


@needs_promtool
def test_rules_pass_promtool():
    """`promtool check rules` accepts the file as it ships."""
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_dashboard_queries_parse(tmp_path):
    """Every dashboard query, variables filled in, is valid PromQL (as a recording rule)."""
    exprs = [as_promql(expr) for expr in dashboard_exprs()]
    rules_file = tmp_path / "dashboard.yaml"
    recording = [{"record": f"streamproxy:panel{i}", "expr": e} for i, e in enumerate(exprs)]
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recording}]}))
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    inner = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def _histogram(name: str, per_minute: int, bounds: list[tuple[str, int]], **labels: str):
    """Cumulative buckets growing by `per_minute` observations, spread over `bounds`."""
    series = [_series(f"{name}_bucket", f"0+{count}x40", le=le, **labels) for le, count in bounds]
    series.append(_series(f"{name}_count", f"0+{per_minute}x40", **labels))
    return series


@needs_promtool
def test_alerts_fire_on_a_failing_upstream_only(tmp_path):
    """On synthetic series (upstream `bad`: 8% upstream drops, 17% client drops before the
    first token, 17% connect errors, TTFT ~25 s, ITL ~0.9 s; upstream `good`: healthy),
    exactly the expected alerts fire, all for `bad`."""
    series = []
    for up, completed, failed, gone, errors in (("bad", 54, 6, 12, 12), ("good", 72, 0, 0, 0)):
        model = {"upstream": up, "model": "m"}
        series += [
            _series("streamproxy_streams_total", f"0+{completed}x40", **model, outcome="completed"),
            _series(
                "streamproxy_streams_total", f"0+{failed}x40", **model, outcome="upstream_error"
            ),
            _series(
                "streamproxy_streams_total", f"0+{gone}x40", **model, outcome="client_disconnect"
            ),
            _series(
                "streamproxy_dropped_connections_total",
                f"0+{failed}x40",
                upstream=up,
                side="upstream",
                phase="mid_stream",
            ),
            _series(
                "streamproxy_dropped_connections_total",
                f"0+{gone}x40",
                upstream=up,
                side="client",
                phase="before_first_token",
            ),
            _series(
                "streamproxy_requests_total",
                f"0+{72 - errors}x40",
                upstream=up,
                method="POST",
                status_code="200",
            ),
            _series(
                "streamproxy_requests_total",
                f"0+{errors}x40",
                upstream=up,
                method="POST",
                status_code="502",
            ),
            _series(
                "streamproxy_upstream_errors_total", f"0+{errors}x40", upstream=up, reason="connect"
            ),
        ]
        slow = up == "bad"
        series += _histogram(
            "streamproxy_time_to_first_token_seconds",
            60,
            [("1", 0 if slow else 60), ("15", 0 if slow else 60), ("30", 60), ("+Inf", 60)],
            **model,
        )
        series += _histogram(
            "streamproxy_inter_token_latency_seconds",
            600,
            [("0.05", 0 if slow else 600), ("0.5", 0 if slow else 600), ("1", 600), ("+Inf", 600)],
            **model,
        )
    expected = {
        "StreamproxyUpstreamDropsHigh": {"upstream": "bad", "severity": "warning"},
        "StreamproxyClientDropsBeforeFirstTokenHigh": {"upstream": "bad", "severity": "warning"},
        "StreamproxyTimeToFirstTokenHigh": {"upstream": "bad", "model": "m", "severity": "warning"},
        "StreamproxyInterTokenLatencyHigh": {
            "upstream": "bad",
            "model": "m",
            "severity": "warning",
        },
        "StreamproxyUpstreamErrorRateHigh": {"upstream": "bad", "severity": "warning"},
        "StreamproxyUpstream5xxHigh": {"upstream": "bad", "severity": "warning"},
    }
    assert set(expected) < {rule["alert"] for rule in rules()}  # the critical one stays quiet
    firing = [
        {
            "labels": "ALERTS{"
            + ", ".join(
                f'{k}="{v}"'
                for k, v in {"alertname": name, "alertstate": "firing", **labels}.items()
            )
            + "}",
            "value": 1,
        }
        for name, labels in sorted(expected.items())
    ]
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [
                    {
                        "expr": 'sort_desc(ALERTS{alertstate="firing"})',
                        "eval_time": "35m",
                        "exp_samples": firing,
                    }
                ],
            }
        ],
    }
    test_file = tmp_path / "alerts.test.yaml"
    test_file.write_text(yaml.safe_dump(test, sort_keys=False))
    result = subprocess.run(
        [PROMTOOL, "test", "rules", str(test_file)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
