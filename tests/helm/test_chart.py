"""The chart's promises, checked on what `helm template` renders (issue #7)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from streamproxy.config import Config, load_config, parse_duration
from tests.helm.conftest import (
    CHART,
    OPERATOR_KINDS,
    POD_TMP,
    ROOT,
    Chart,
    config_of,
    one,
    plain_env,
    proxy_container,
)

# Both modes, with nothing and with every optional part switched on.
SCENARIOS: dict[str, dict[str, Any]] = {
    "deployment": {},
    "deployment-everything": {
        "autoscaling": {"enabled": True, "streamsActive": {"enabled": True}},
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True},
        "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "LLM"}},
        "existingSecret": "llm-keys",
        "existingSecretEnv": {"OPENAI_API_KEY": "openai-api-key"},
        "extraEnv": [{"name": "STREAMPROXY_LOGGING__LEVEL", "value": "debug"}],
        "podDisruptionBudget": {"maxUnavailable": None, "minAvailable": 1},
        "config": {"listen": {"workers": 2}, "shutdown": {"drain_timeout": "2m"}},
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "streamproxy"}},
            }
        ],
    },
    "sidecar": {"mode": "sidecar"},
    "sidecar-everything": {
        "mode": "sidecar",
        "sidecar": {"native": False},
        "podMonitor": {"enabled": True, "selector": {"matchLabels": {"app": "my-app"}}},
        "prometheusRule": {"enabled": True},
        "grafanaDashboard": {"enabled": True},
        "existingSecret": "llm-keys",
    },
}
# A recent Kubernetes (native sidecars are on by default from 1.29) and the newest schemas.
KUBE_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_lint(chart: Chart, scenario: str) -> None:
    """`helm lint --strict` passes for both modes, bare and with every option on."""
    assert "0 chart(s) failed" in chart.lint(SCENARIOS[scenario])


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_manifests_match_kubernetes_schemas(chart: Chart, scenario: str, kube_version: str):
    """Every rendered manifest validates (strict: no unknown fields) against Kubernetes'
    own schemas; only prometheus-operator kinds, which have none there, are left out."""
    docs = chart.template(SCENARIOS[scenario], kube_version=kube_version)
    for doc in docs:
        if doc["kind"] in OPERATOR_KINDS:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {error.message}")


def test_deployment_mode_kinds(chart: Chart) -> None:
    """mode: deployment renders the workload, its Service and the drain-safe extras."""
    kinds = sorted(d["kind"] for d in chart.template())
    assert kinds == sorted(
        ["ConfigMap", "Deployment", "PodDisruptionBudget", "Pod", "Service", "ServiceAccount"]
    )
    everything = {d["kind"] for d in chart.template(SCENARIOS["deployment-everything"])}
    assert {"HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule"} <= everything


def test_sidecar_mode_renders_no_workload(chart: Chart) -> None:
    """mode: sidecar renders only the config (and monitoring), never a Deployment or Service."""
    assert [d["kind"] for d in chart.template({"mode": "sidecar"})] == ["ConfigMap"]
    kinds = sorted(d["kind"] for d in chart.template(SCENARIOS["sidecar-everything"]))
    assert kinds == ["ConfigMap", "ConfigMap", "PodMonitor", "PrometheusRule"]


# --- probes, ports, Service ---------------------------------------------------------


def _port_numbers(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


@pytest.mark.parametrize(
    ("listen", "admin"), [(8080, 9090), (8181, 9191)], ids=["default", "custom"]
)
def test_probes_point_at_the_admin_port(chart: Chart, listen: int, admin: int) -> None:
    """Liveness on /healthz, readiness and startup on /readyz, all on the admin port,
    whose number follows config.admin.port."""
    values = {"config": {"listen": {"port": listen}, "admin": {"port": admin}}}
    container = proxy_container(chart.template(values))
    assert _port_numbers(container) == {"http": listen, "admin": admin}
    probes = {
        kind: container[kind]["httpGet"]
        for kind in ("livenessProbe", "readinessProbe", "startupProbe")
    }
    assert probes == {
        "livenessProbe": {"path": "/healthz", "port": "admin"},
        "readinessProbe": {"path": "/readyz", "port": "admin"},
        "startupProbe": {"path": "/readyz", "port": "admin"},
    }


def test_service_ports_are_named(chart: Chart) -> None:
    """The Service exposes the proxy as `http` and the admin server as `admin`, by name."""
    docs = chart.template()
    service = one(docs, "Service")
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {"http": (8080, "http"), "admin": (9090, "admin")}
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_scrape_annotations(chart: Chart) -> None:
    """Pods carry prometheus.io annotations naming the admin port (annotation discovery)."""
    values = {"config": {"admin": {"port": 9191}}}
    annotations = one(chart.template(values), "Deployment")["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "9191"
    assert annotations["prometheus.io/path"] == "/metrics"


# --- shutdown: grace period, preStop ------------------------------------------------


@pytest.mark.parametrize("drain", ["30s", "2m", 45, "500ms", "1h", 0, 2.5])
def test_grace_period_above_prestop_and_drain(chart: Chart, drain: object) -> None:
    """terminationGracePeriodSeconds exceeds the preStop sleep plus
    shutdown.drain_timeout, whatever unit the drain timeout is written in."""
    docs = chart.template({"config": {"shutdown": {"drain_timeout": drain}}})
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    sleep = int(proxy_container(docs)["lifecycle"]["preStop"]["exec"]["command"][1])
    assert sleep == 5
    drain_seconds = parse_duration(drain)
    assert pod["terminationGracePeriodSeconds"] > sleep + drain_seconds
    assert pod["terminationGracePeriodSeconds"] == sleep + math.ceil(drain_seconds) + 15


def test_grace_period_set_too_low_fails(chart: Chart) -> None:
    """A hand-set grace period that would SIGKILL draining streams fails the install."""
    message = chart.fails({"terminationGracePeriodSeconds": 30})
    assert "terminationGracePeriodSeconds (30) must be above" in message
    assert "(35 s)" in message


def test_grace_period_set_by_hand_is_kept(chart: Chart) -> None:
    """A grace period above preStop + drain is used as given."""
    docs = chart.template({"terminationGracePeriodSeconds": 120})
    assert (
        one(docs, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 120
    )


def test_rollout_keeps_capacity(chart: Chart) -> None:
    """Rolling updates start new pods before old ones stop; a PDB limits voluntary evictions."""
    docs = chart.template()
    strategy = one(docs, "Deployment")["spec"]["strategy"]
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0
    pdb = one(docs, "PodDisruptionBudget")["spec"]
    assert pdb["maxUnavailable"] == 1
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()


def test_config_change_rolls_the_pods(chart: Chart) -> None:
    """The pod template carries a checksum of the config, so a config change is a rollout."""

    def checksum(values: dict[str, Any]) -> str:
        meta = one(chart.template(values), "Deployment")["spec"]["template"]["metadata"]
        return str(meta["annotations"]["checksum/config"])

    assert checksum({}) != checksum({"config": {"keepalive": {"interval": "10s"}}})


# --- security -------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["deployment", "deployment-everything"])
def test_security_context(chart: Chart, scenario: str) -> None:
    """Non-root, read-only root filesystem, no privilege escalation, every capability
    dropped; the only writable path is the /tmp emptyDir (TMPDIR). (The sidecar's
    container: test_sidecar.py.)"""
    docs = chart.template(SCENARIOS[scenario])
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    container = proxy_container(docs)
    context = container["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts[POD_TMP]]
    assert volumes[mounts["/etc/streamproxy"]]["configMap"]["name"] == "sp-streamproxy"
    assert plain_env(container)["TMPDIR"] == POD_TMP


@pytest.mark.parametrize(("workers", "expected"), [(1, None), (3, f"{POD_TMP}/prometheus")])
def test_prometheus_multiproc_dir_only_with_workers(
    chart: Chart, workers: int, expected: str | None
) -> None:
    """PROMETHEUS_MULTIPROC_DIR is set (on the /tmp emptyDir) only for workers > 1: with
    one process the proxy keeps metrics in memory, and a set variable would switch
    /metrics to the file collector."""
    container = proxy_container(chart.template({"config": {"listen": {"workers": workers}}}))
    assert plain_env(container).get("PROMETHEUS_MULTIPROC_DIR") == expected


def test_api_keys_come_from_the_existing_secret(chart: Chart) -> None:
    """existingSecret keys become variables through secretKeyRef (picked keys) or
    envFrom (all keys); nothing secret is rendered in clear."""
    picked = proxy_container(chart.template(SCENARIOS["deployment-everything"]))
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in picked["env"] if "valueFrom" in e}
    assert refs == {"OPENAI_API_KEY": {"name": "llm-keys", "key": "openai-api-key"}}
    assert "envFrom" not in picked
    everything = proxy_container(chart.template({"existingSecret": "llm-keys"}))
    assert everything["envFrom"] == [{"secretRef": {"name": "llm-keys"}}]
    assert "envFrom" not in proxy_container(chart.template())


def test_credentials_in_clear_are_refused(chart: Chart) -> None:
    """An extraEnv variable named like a credential with a literal value fails the install;
    the same variable through valueFrom is fine."""
    message = chart.fails({"extraEnv": [{"name": "OPENAI_API_KEY", "value": "sk-abc"}]})
    assert "OPENAI_API_KEY looks like a credential" in message
    assert "sk-abc" not in message
    from_secret = {
        "name": "OPENAI_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "k", "key": "v"}},
    }
    assert proxy_container(chart.template({"extraEnv": [from_secret]}))


# --- the ConfigMap is streamproxy's config.yaml ----------------------------------------


def test_values_config_mirrors_config_yaml() -> None:
    """The chart's `config` values are the repository's config.yaml, key for key."""
    documented = yaml.safe_load((ROOT / "config.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["config"] == documented


def _check_config(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("STREAMPROXY_")}
    return subprocess.run(
        [sys.executable, "-m", "streamproxy", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**clean, **env},
        check=False,
    )


@pytest.mark.parametrize("scenario", ["deployment", "deployment-everything"])
def test_configmap_round_trips_through_check_config(
    chart: Chart, scenario: str, tmp_path: Path
) -> None:
    """The rendered config.yaml passes `streamproxy check-config` with the container's own
    STREAMPROXY_* environment, as the pod will load it."""
    docs = chart.template(SCENARIOS[scenario])
    path = tmp_path / "config.yaml"
    path.write_text(config_of(docs))
    env = {
        k: v for k, v in plain_env(proxy_container(docs)).items() if k.startswith("STREAMPROXY_")
    }
    result = _check_config(path, env)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1


def test_default_configmap_is_the_default_config(chart: Chart, tmp_path: Path) -> None:
    """With default values the ConfigMap loads to exactly the built-in defaults."""
    path = tmp_path / "config.yaml"
    path.write_text(config_of(chart.template()))
    assert load_config(path, {}) == Config()


def test_configmap_carries_custom_config(chart: Chart, tmp_path: Path) -> None:
    """Values under `config` reach the proxy unchanged (lists, durations, sizes)."""
    upstreams = [
        {"name": "openai", "url": "https://api.openai.com", "path_prefix": "/"},
        {
            "name": "anthropic",
            "url": "https://api.anthropic.com",
            "path_prefix": "/anthropic",
            "strip_prefix": True,
            "read_timeout": "10m",
        },
    ]
    values = {
        "config": {
            "upstreams": upstreams,
            "limits": {"max_request_body": 33554432},
            "keepalive": {"interval": 7.5},
        }
    }
    path = tmp_path / "config.yaml"
    path.write_text(config_of(chart.template(values)))
    config = load_config(path, {})
    assert [u.name for u in config.upstreams] == ["openai", "anthropic"]
    assert config.upstreams[1].read_timeout == 600
    assert config.limits.max_request_body == 33554432
    assert config.keepalive.interval == 7.5


# --- bad values fail at install, with the key's path -----------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"mode": "daemonset"}, "mode"),
        ({"config": {"listen": {"port": 99999}}}, "listen.port"),
        ({"config": {"keepalive": {"intervall": "5s"}}}, "intervall"),
        ({"config": {"shutdown": {"drain_timeout": "soon"}}}, "drain_timeout"),
        ({"config": {"upstreams": [{"name": "x", "url": "ftp://host"}]}}, "upstreams.0.url"),
        ({"config": {"upstreams": []}}, "upstreams"),
        ({"config": {"logging": {"format": "xml"}}}, "logging.format"),
        ({"replicaCont": 3}, "replicaCont"),
        ({"config": {"admin": {"port": 8080}}}, "must differ from config.listen.port"),
        ({"config": {"admin": {"host": "127.0.0.1"}}}, "config.admin.host"),
        ({"mode": "sidecar", "serviceMonitor": {"enabled": True}}, "podMonitor"),
        ({"mode": "sidecar", "podMonitor": {"enabled": True}}, "podMonitor.selector"),
        ({"sidecar": {"portNames": {"proxy": "a-very-long-port-name", "admin": "a"}}}, "proxy"),
    ],
)
def test_bad_values_fail_with_a_clear_message(chart: Chart, values: dict, expected: str):
    """values.schema.json and the chart's own checks refuse bad values, naming the key
    (helm 4 writes key paths as /config/listen/port, helm 3 as config.listen.port)."""
    assert expected in chart.fails(values).replace("/", ".")


def test_native_sidecar_needs_kubernetes_1_29(chart: Chart) -> None:
    """Before 1.29 a native sidecar would be a plain init container that never ends (the
    pod never starts), so the install fails and names the way out; the classic form works."""
    message = chart.fails({"mode": "sidecar"}, kube_version="1.28.3")
    assert "sidecar.native needs Kubernetes 1.29" in message
    assert "sidecar.native=false" in message
    classic = {"mode": "sidecar", "sidecar": {"native": False}}
    assert chart.template(classic, kube_version="1.28.3")


# --- autoscaling and monitoring ------------------------------------------------------


def test_hpa_on_cpu_and_streams_active(chart: Chart) -> None:
    """The HPA scales the Deployment on CPU and on streamproxy_streams_active per pod;
    the Deployment then leaves replicas to it."""
    docs = chart.template(SCENARIOS["deployment-everything"])
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "sp-streamproxy",
    }
    metrics = {m["type"]: m for m in hpa["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "streamproxy_streams_active"
    assert metrics["Pods"]["pods"]["target"] == {"type": "AverageValue", "averageValue": "50"}
    assert "replicas" not in one(docs, "Deployment")["spec"]


def test_service_monitor_scrapes_the_admin_port(chart: Chart) -> None:
    """The ServiceMonitor selects this Service and scrapes its `admin` port's /metrics."""
    docs = chart.template(SCENARIOS["deployment-everything"])
    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["endpoints"][0]["port"] == "admin"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= one(docs, "Service")["metadata"]["labels"].items()


def test_pod_monitor_scrapes_the_sidecar_admin_port(chart: Chart) -> None:
    """In sidecar mode the PodMonitor selects the user's pods and the `proxy-admin` port."""
    monitor = one(chart.template(SCENARIOS["sidecar-everything"]), "PodMonitor")["spec"]
    assert monitor["selector"] == {"matchLabels": {"app": "my-app"}}
    assert monitor["podMetricsEndpoints"][0]["port"] == "proxy-admin"


def test_prometheus_rule_is_the_alerts_file(chart: Chart) -> None:
    """The PrometheusRule's groups are alerts/streamproxy-rules.yaml's groups, unchanged."""
    rules = yaml.safe_load((CHART / "alerts" / "streamproxy-rules.yaml").read_text())
    rule = one(chart.template(SCENARIOS["deployment-everything"]), "PrometheusRule")
    assert rule["spec"]["groups"] == rules["groups"]


def test_dashboard_configmap(chart: Chart) -> None:
    """The dashboard ConfigMap carries the grafana_dashboard label and the JSON unchanged."""
    docs = chart.template(SCENARIOS["deployment-everything"])
    dashboard = one(docs, "ConfigMap", "sp-streamproxy-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    shipped = json.loads((CHART / "dashboards" / "streamproxy.json").read_text())
    assert json.loads(dashboard["data"]["streamproxy.json"]) == shipped


# --- the chart README ------------------------------------------------------------------


def _leaf_keys(values: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value and path != "config":
            keys.extend(_leaf_keys(value, path))
        else:
            keys.append(path)
    return keys


def test_readme_values_table_covers_every_value() -> None:
    """Every value (or a parent of it) has a row in the README's values table."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    rows = [line.split("|")[1] for line in readme.splitlines() if line.startswith("| `")]
    documented = {key.strip(" `") for row in rows for key in row.split(",")}
    missing = [
        key
        for key in _leaf_keys(values)
        if not any(key == d or key.startswith(d + ".") for d in documented)
    ]
    assert not missing, f"add rows for {missing} to the README's values table"
