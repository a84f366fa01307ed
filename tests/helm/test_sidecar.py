"""The sidecar: `{{ include "streamproxy.sidecar" . }}` inside a user's own Deployment."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from streamproxy.config import load_config
from tests.helm.conftest import (
    CHART,
    EXAMPLE,
    config_of,
    documents,
    one,
    plain_env,
    run_helm,
    values_file,
)

NATIVE_BLOCK = """\
      initContainers:
        {{- include "streamproxy.sidecar" . | nindent 8 }}
      containers:
"""
CLASSIC_BLOCK = """\
      containers:
        {{- include "streamproxy.sidecar" . | nindent 8 }}
"""


def render_app(helm: str, app: Path, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """`helm template my-app` of the user's chart, with extra values."""
    args = ["template", "my-app", str(app), "--kube-version", "1.30.0"]
    if values:
        args += ["-f", str(values_file(values, app.parent))]
    return documents(run_helm(helm, *args))


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(one(docs, "Deployment", "my-app")["spec"]["template"]["spec"])


def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in items}


def test_native_sidecar_in_a_user_deployment(helm: str, user_chart: Path) -> None:
    """The template renders a native sidecar (an init container with restartPolicy Always)
    into the user's pod, beside the app container, with its ConfigMap and /tmp volumes."""
    docs = render_app(helm, user_chart)
    pod = pod_spec(docs)
    assert [c["name"] for c in pod["initContainers"]] == ["streamproxy"]
    assert [c["name"] for c in pod["containers"]] == ["app"]
    sidecar = pod["initContainers"][0]
    assert sidecar["restartPolicy"] == "Always"
    assert "lifecycle" not in sidecar  # stopped after the app: no preStop delay needed
    assert {p["name"]: p["containerPort"] for p in sidecar["ports"]} == {
        "proxy": 8080,
        "proxy-admin": 9090,
    }
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert sidecar[probe]["httpGet"]["port"] == "proxy-admin"
    context = sidecar["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"]["drop"] == ["ALL"]
    assert plain_env(sidecar)["STREAMPROXY_LISTEN__HOST"] == "127.0.0.1"
    volumes = by_name(pod["volumes"])
    assert "emptyDir" in volumes["streamproxy-tmp"]
    config_map = volumes["streamproxy-config"]["configMap"]["name"]
    one(docs, "ConfigMap", config_map)  # the dependency (mode: sidecar) renders it
    assert plain_env(pod["containers"][0])["OPENAI_BASE_URL"] == "http://localhost:8080/v1"
    for kube_version in ("1.30.0", kubernetes_validate.latest_version()):
        for doc in docs:
            kubernetes_validate.validate(doc, kube_version, strict=True)


def test_classic_sidecar_in_a_user_deployment(helm: str, user_chart: Path) -> None:
    """With sidecar.native false the same include, under `containers`, renders a plain
    container that keeps serving for the preStop sleep while the app shuts down."""
    template = user_chart / "templates" / "deployment.yaml"
    text = template.read_text()
    assert NATIVE_BLOCK in text
    template.write_text(text.replace(NATIVE_BLOCK, CLASSIC_BLOCK))
    docs = render_app(helm, user_chart, {"streamproxy": {"sidecar": {"native": False}}})
    pod = pod_spec(docs)
    assert "initContainers" not in pod
    containers = by_name(pod["containers"])
    assert set(containers) == {"streamproxy", "app"}
    assert "restartPolicy" not in containers["streamproxy"]
    assert containers["streamproxy"]["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_sidecar_follows_the_dependency_values(helm: str, user_chart: Path) -> None:
    """Ports, the base URL and the image come from the streamproxy dependency's values and
    appVersion, not from the user's chart."""
    values = {"streamproxy": {"config": {"listen": {"port": 8181}, "admin": {"port": 9191}}}}
    pod = pod_spec(render_app(helm, user_chart, values))
    sidecar = pod["initContainers"][0]
    assert {p["containerPort"] for p in sidecar["ports"]} == {8181, 9191}
    assert plain_env(pod["containers"][0])["OPENAI_BASE_URL"] == "http://localhost:8181/v1"
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert sidecar["image"] == f"streamproxy:{app_version}"


def test_sidecar_config_round_trips_through_check_config(
    helm: str, user_chart: Path, tmp_path: Path
) -> None:
    """The sidecar's ConfigMap plus its environment pass `streamproxy check-config`, and
    the proxy port then listens on 127.0.0.1 only."""
    docs = render_app(helm, user_chart)
    path = tmp_path / "config.yaml"
    path.write_text(config_of(docs))
    env = {
        k: v
        for k, v in plain_env(pod_spec(docs)["initContainers"][0]).items()
        if k.startswith("STREAMPROXY_")
    }
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("STREAMPROXY_")}
    result = subprocess.run(
        [sys.executable, "-m", "streamproxy", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**clean, **env},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    config = load_config(path, env)
    assert config.listen.host == "127.0.0.1"
    assert config.admin.host == "0.0.0.0"
    assert config.shutdown.drain_timeout == 20  # from the example's values


def _readme_example() -> str:
    readme = (CHART / "README.md").read_text()
    match = re.search(
        r"<!-- sidecar-example:start -->\n```yaml\n(.*?)```\n<!-- sidecar-example:end -->",
        readme,
        re.DOTALL,
    )
    assert match, "the README lost its sidecar-example markers"
    return match[1]


def test_example_chart_builds_and_matches_the_readme(helm: str, tmp_path: Path) -> None:
    """examples/sidecar-app works as documented (`helm dependency build`, then
    `helm template`), and the README shows exactly what it renders."""
    tree = tmp_path / "streamproxy"
    shutil.copytree(CHART, tree, ignore=shutil.ignore_patterns("charts", "Chart.lock"))
    app = tree / EXAMPLE.relative_to(CHART)
    run_helm(helm, "dependency", "build", str(app))
    rendered = run_helm(
        helm, "template", "my-app", str(app), "--show-only", "templates/deployment.yaml"
    )
    body = rendered.split("# Source: my-app/templates/deployment.yaml\n", 1)[1].rstrip() + "\n"
    assert body == _readme_example(), (
        "the README's rendered example is stale; replace the block between the "
        f"sidecar-example markers in {CHART / 'README.md'} with:\n{body}"
    )


def test_install_notes_print_a_pasteable_sidecar(helm: str) -> None:
    """`helm install --set mode=sidecar` prints the container and volumes to paste into a
    pod spec, for users without a chart of their own."""
    out = run_helm(helm, "install", "sp", str(CHART), "--dry-run=client", "--set", "mode=sidecar")
    notes = out.split("NOTES:", 1)[1]
    snippet = notes.split("or paste this", 1)[1].split("\n", 1)[1].split("and point your app")[0]
    spec = yaml.safe_load(snippet)
    (sidecar,) = spec["initContainers"]
    assert sidecar["name"] == "streamproxy"
    assert sidecar["restartPolicy"] == "Always"
    assert by_name(spec["volumes"])["streamproxy-config"]["configMap"]["name"] == "sp-streamproxy"
    assert "OPENAI_BASE_URL" in notes
