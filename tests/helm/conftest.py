"""The Helm chart, rendered by a real `helm` (installed by `.ci/install-helm.sh`).

`helm template` runs offline, so every test renders the chart with the values it needs
and checks the manifests as data. A missing helm (or hadolint) skips these tests on a
workstation but fails them when `CI` is set: in CI they must run, never silently vanish.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import require_tool

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "streamproxy"
EXAMPLE = CHART / "examples" / "sidecar-app"
# Kinds of prometheus-operator: no schema in kubernetes-validate, checked field by field.
OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
# The container's writable scratch directory (a path in the pod, not on this machine).
POD_TMP = "/tmp"  # noqa: S108


def find_tool(name: str, hint: str) -> str:
    """The path of `name`; skipped locally, failed in CI when missing."""
    return require_tool(name, hint)


@pytest.fixture(scope="session")
def helm() -> str:
    """The helm binary."""
    return find_tool("helm", "bash .ci/install-helm.sh")


class HelmError(Exception):
    """`helm` exited non-zero; the message is its stderr."""


def run_helm(helm: str, *args: str, cwd: Path | None = None) -> str:
    """Run helm offline with its own config/cache dirs; stdout, or HelmError(stderr)."""
    home = Path(tempfile.gettempdir()) / "streamproxy-helm-home"
    env = {
        **os.environ,
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    result = subprocess.run(
        [helm, *args], capture_output=True, text=True, timeout=60, env=env, cwd=cwd, check=False
    )
    if result.returncode != 0:
        raise HelmError(result.stderr.strip() or result.stdout.strip())
    return result.stdout


def values_file(values: dict[str, Any], directory: Path) -> Path:
    """`values` written as a YAML file for `helm -f`."""
    path = directory / f"values-{abs(hash(yaml.safe_dump(values)))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def documents(text: str) -> list[dict[str, Any]]:
    """The non-empty YAML documents of helm's output."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


class Chart:
    """Renders the chart with given values; `helm template` results are cached per values."""

    def __init__(self, helm: str, workdir: Path) -> None:
        self.helm = helm
        self.workdir = workdir
        self._cache: dict[tuple[str, str, str], list[dict[str, Any]]] = {}

    def template(
        self,
        values: dict[str, Any] | None = None,
        *,
        release: str = "sp",
        kube_version: str = "1.30.0",
    ) -> list[dict[str, Any]]:
        """Every manifest `helm template` renders (hooks included), as dicts."""
        key = (yaml.safe_dump(values or {}), release, kube_version)
        if key not in self._cache:
            out = run_helm(
                self.helm,
                "template",
                release,
                str(CHART),
                "--namespace",
                "llm",
                "--kube-version",
                kube_version,
                "-f",
                str(values_file(values or {}, self.workdir)),
            )
            self._cache[key] = documents(out)
        return self._cache[key]

    def fails(self, values: dict[str, Any], *, kube_version: str = "1.30.0") -> str:
        """helm's error message for values that must be refused."""
        with pytest.raises(HelmError) as error:
            run_helm(
                self.helm,
                "template",
                "sp",
                str(CHART),
                "--kube-version",
                kube_version,
                "-f",
                str(values_file(values, self.workdir)),
            )
        return str(error.value)

    def lint(self, values: dict[str, Any]) -> str:
        return run_helm(
            self.helm, "lint", "--strict", str(CHART), "-f", str(values_file(values, self.workdir))
        )


@pytest.fixture(scope="session")
def chart(helm: str, tmp_path_factory: pytest.TempPathFactory) -> Chart:
    """The chart, rendered by helm."""
    return Chart(helm, tmp_path_factory.mktemp("values"))


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one manifest of `kind` (and `name`)."""
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, (kind, name, [(d["kind"], d["metadata"]["name"]) for d in docs])
    return found[0]


def proxy_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The streamproxy container of the Deployment."""
    deployment = one(docs, "Deployment")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "streamproxy")


def config_of(docs: list[dict[str, Any]]) -> str:
    """The rendered config.yaml (the ConfigMap without the dashboard one)."""
    maps = [d for d in docs if d["kind"] == "ConfigMap" and "config.yaml" in d.get("data", {})]
    assert len(maps) == 1
    return str(maps[0]["data"]["config.yaml"])


def plain_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment variables that have a literal value."""
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


@pytest.fixture
def user_chart(tmp_path: Path) -> Path:
    """A copy of examples/sidecar-app with this chart vendored as its dependency."""
    app = tmp_path / "my-app"
    shutil.copytree(EXAMPLE, app, ignore=shutil.ignore_patterns("charts", "Chart.lock"))
    shutil.copytree(
        CHART, app / "charts" / "streamproxy", ignore=shutil.ignore_patterns("examples")
    )
    return app
