"""The command line, as users run it: real subprocesses."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ProxyProcess, write_config


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamproxy", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )


def test_check_config_valid(tmp_path):
    """check-config on a valid file: exit 0 and one summary line."""
    path = write_config(tmp_path, "http://127.0.0.1:9")
    result = _run("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1
    assert "test" in result.stdout


def test_check_config_reports_every_problem(tmp_path):
    """check-config on a bad file: exit 2, one line per problem, each naming its key path."""
    path = tmp_path / "bad.yaml"
    path.write_text(
        "listen: {port: 99999}\n"
        "upstreams:\n  - {name: a, url: 'ftp://x'}\n"
        "keepalive: {interval: soon}\n"
    )
    result = _run("check-config", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3, result.stderr
    for key in ("listen.port", "upstreams[0].url", "keepalive.interval"):
        assert any(key in line for line in lines), (key, lines)


def test_check_config_missing_file(tmp_path):
    """check-config on a missing file exits 2 with a message naming it."""
    result = _run("check-config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "nope.yaml" in result.stderr


def test_serve_refuses_bad_config(tmp_path):
    """serve with a bad config exits 2 before listening, naming the problem."""
    path = tmp_path / "bad.yaml"
    path.write_text("upstreams: []\n")
    result = _run("serve", "--config", str(path))
    assert result.returncode == 2
    assert "upstreams" in result.stderr


def test_serve_refuses_bad_environment(tmp_path):
    """An environment override with a bad value is refused like a bad file."""
    path = write_config(tmp_path, "http://127.0.0.1:9")
    import os

    env = {**os.environ, "STREAMPROXY_KEEPALIVE__INTERVAL": "often"}
    result = _run("serve", "--config", str(path), env=env)
    assert result.returncode == 2
    assert "keepalive.interval" in result.stderr


def test_serve_announces_and_becomes_ready(tmp_path, mock_url):
    """serve prints one line with where it listens and its upstreams, answers /healthz and
    /readyz, relays, and exits 0 on SIGTERM."""
    proxy = ProxyProcess(["serve", "--config", str(write_config(tmp_path, mock_url))])
    try:
        proxy.wait_ready()
        announce = [line for line in proxy.lines if '"event":"listening"' in line]
        assert len(announce) == 1
        assert mock_url in announce[0]
        assert proxy.get_status("/healthz") == 200
        assert proxy.get_status("/metrics") == 200
        import urllib.request

        with urllib.request.urlopen(proxy.url + "/v1/models", timeout=5) as response:
            assert response.status == 200
    finally:
        assert proxy.stop() == 0


@pytest.mark.parametrize("flag", ["--upstream", "env"])
def test_upstream_override(tmp_path, mock_url, flag):
    """--upstream (or STREAMPROXY_UPSTREAMS__0__URL) replaces the configured upstream."""
    path = write_config(tmp_path, "http://127.0.0.1:9")
    args, env = ["serve", "--config", str(path)], {}
    if flag == "--upstream":
        args += ["--upstream", mock_url]
    else:
        env["STREAMPROXY_UPSTREAMS__0__URL"] = mock_url
    proxy = ProxyProcess(args, env)
    try:
        proxy.wait_ready()
        import urllib.request

        with urllib.request.urlopen(proxy.url + "/v1/models", timeout=5) as response:
            assert response.status == 200
    finally:
        assert proxy.stop() == 0
