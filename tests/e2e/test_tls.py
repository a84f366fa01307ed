"""https upstreams (every hosted LLM API): streams over TLS, the certificate and host
name verified, a private CA trusted through SSL_CERT_FILE (as OpenSSL and httpx do).
The upstream is the mock API under uvicorn with a certificate from a throwaway CA."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from streamproxy import mock_upstream
from tests import client
from tests.support import serve_app, write_config

STREAM_REQUEST = json.dumps({"model": "m", "stream": True, "messages": []}).encode()
HEADERS = [("content-type", "application/json"), ("x-mock-tokens", "5")]


@dataclass
class TLSUpstream:
    port: int
    ca_file: Path


@pytest.fixture(scope="module")
def tls_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSUpstream]:
    """The mock API over TLS with a certificate for `localhost` only."""
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    app = mock_upstream.create_app()
    with serve_app(
        app, ssl_certfile=str(folder / "cert.pem"), ssl_keyfile=str(folder / "key.pem")
    ) as url:
        yield TLSUpstream(int(url.rsplit(":", 1)[1]), folder / "ca.pem")


def _stream(proxy_url: str) -> client.RawResponse:
    return client.request(proxy_url, "POST", "/v1/chat/completions", HEADERS, STREAM_REQUEST)


def test_streams_over_tls_with_a_private_ca(tls_upstream, start_proxy, monkeypatch):
    """With SSL_CERT_FILE naming the CA, the stream arrives whole over TLS."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_upstream.ca_file))
    with start_proxy(f"https://localhost:{tls_upstream.port}") as proxy:
        response = _stream(proxy.url)
    assert response.status == 200
    assert response.complete
    assert response.body.count(b'"content":') >= 5
    assert response.body.rstrip().endswith(b"data: [DONE]")


def test_untrusted_certificate_is_a_clear_502(tls_upstream, start_proxy, monkeypatch):
    """Without the CA (certifi's public roots only) the handshake fails: 502, and the
    error says why, instead of a hang or a plaintext fallback."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with start_proxy(f"https://localhost:{tls_upstream.port}") as proxy:
        response = _stream(proxy.url)
    assert response.status == 502
    assert b"CERTIFICATE_VERIFY_FAILED" in response.body


def test_host_name_is_verified(tls_upstream, start_proxy, monkeypatch):
    """A trusted certificate for another name (localhost, reached as 127.0.0.1) is refused."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_upstream.ca_file))
    with start_proxy(f"https://127.0.0.1:{tls_upstream.port}") as proxy:
        response = _stream(proxy.url)
    assert response.status == 502
    assert b"CERTIFICATE_VERIFY_FAILED" in response.body


def test_unreadable_ssl_cert_file_fails_at_start(tmp_path):
    """A broken SSL_CERT_FILE stops `serve` at start with one clear line, exit 1."""
    path = write_config(tmp_path, "https://localhost:9")
    result = subprocess.run(
        [sys.executable, "-m", "streamproxy", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"SSL_CERT_FILE": str(tmp_path / "missing.pem"), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode == 1
    assert "cannot load CA certificates" in result.stderr
    assert "missing.pem" in result.stderr
