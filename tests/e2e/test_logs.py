"""Access logs: one JSON line per request with the fields ops need, and never a secret."""

from __future__ import annotations

import json

from tests import client
from tests.support import ProxyProcess, write_config

SECRETS = {
    "authorization": "Bearer sk-proj-SECRETSECRETSECRET1",
    "x-api-key": "sk-ant-api03-SECRETSECRETSECRET2",
    "api-key": "azure-SECRETSECRETSECRET3",
    "cookie": "session=SECRETSECRETSECRET4",
    "x-goog-api-key": "AIzaSECRETSECRETSECRET5",
}


def test_access_line_fields_and_no_secrets(tmp_path, mock_url):
    """Each request logs one JSON access line with id, method, path, upstream, status,
    bytes, TTFB, TTFT, duration and outcome; no credential appears in any line."""
    config = write_config(tmp_path, mock_url, "logging: {level: debug, format: json}\n")
    proxy = ProxyProcess(["serve", "--config", str(config)]).wait_ready()
    headers = [*SECRETS.items(), ("content-type", "application/json"), ("x-request-id", "rid-1")]
    try:
        client.request(
            proxy.url, "POST", "/v1/chat/completions", headers, b'{"model": "m", "stream": true}'
        )
        client.request(
            proxy.url,
            "POST",
            "/v1beta/models/gemini-pro:streamGenerateContent?alt=sse&key=AIzaSECRETQUERY6",
            headers,
            b"{}",
        )
        client.request(proxy.url, "GET", "/echo/x", [("set-cookie", "SECRETSECRETSECRET7")])
    finally:
        assert proxy.stop() == 0
    output = proxy.output
    for secret in [*SECRETS.values(), "AIzaSECRETQUERY6", "SECRETSECRETSECRET7"]:
        assert secret not in output
        assert secret[-12:] not in output
    access = [json.loads(line) for line in proxy.lines if '"event":"request"' in line]
    assert len(access) == 3
    first = access[0]
    assert first["request_id"] == "rid-1"
    assert first["method"] == "POST"
    assert first["path"] == "/v1/chat/completions"
    assert first["upstream"] == "test"
    assert first["status"] == 200
    assert first["outcome"] == "completed"
    assert first["bytes"] > 0
    assert first["ttfb"] > 0
    assert first["ttft"] >= first["ttfb"]
    assert first["token_events"] == 16
    assert first["duration"] >= first["ttft"]
    assert "level" in first
    assert "timestamp" in first
