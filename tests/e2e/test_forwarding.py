"""What the proxy forwards: methods, paths, queries, bodies and headers, to the right
upstream only."""

from __future__ import annotations

import json

import pytest

from streamproxy.config import LimitsConfig, UpstreamConfig
from tests import client
from tests.rawserver import raw_server


def _echo(response: client.RawResponse) -> dict:
    assert response.status == 200, response.body
    return json.loads(response.body)


def _headers(echo: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in echo["headers"]:
        out.setdefault(name, []).append(value)
    return out


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_method_path_query_and_body_forwarded(start_proxy, mock_url, method):
    """Every method, the raw path (percent-encoding kept) and the query reach the upstream."""
    with start_proxy(mock_url) as proxy:
        body = b'{"x": 1}' if method in ("POST", "PUT", "PATCH") else b""
        target = "/echo/a%20b/c?x=1&y=%2F"
        echo = _echo(client.request(proxy.url, method, target, body=body))
    assert echo["method"] == method
    assert echo["raw_path"] == "/echo/a%20b/c"
    assert echo["query"] == "x=1&y=%2F"
    assert echo["body"] == body.decode()


def test_headers_end_to_end_and_hop_by_hop(start_proxy, mock_url):
    """End-to-end headers pass, hop-by-hop ones (and those named in Connection) do not;
    Host is the upstream's and X-Forwarded-* are set."""
    sent = [
        ("authorization", "Bearer sk-test"),
        ("x-request-id", "req-1"),
        ("openai-organization", "org-1"),
        ("anthropic-version", "2023-06-01"),
        ("connection", "keep-alive, x-private"),
        ("x-private", "secret-hop"),
        ("keep-alive", "timeout=5"),
        ("te", "trailers"),
        ("upgrade", "websocket"),
        ("proxy-connection", "keep-alive"),
        ("x-forwarded-for", "10.0.0.1"),
    ]
    with start_proxy(mock_url) as proxy:
        echo = _echo(client.request(proxy.url, "POST", "/echo/h", sent, b"{}"))
    got = _headers(echo)
    for name in ("authorization", "x-request-id", "openai-organization", "anthropic-version"):
        assert got[name] == [dict(sent)[name]]
    for name in ("connection", "x-private", "keep-alive", "te", "upgrade", "proxy-connection"):
        assert name not in got, name
    assert got["host"] == [mock_url.removeprefix("http://")]
    assert got["x-forwarded-for"] == ["10.0.0.1, 127.0.0.1"]
    assert got["x-forwarded-proto"] == ["http"]


def test_response_hop_by_hop_dropped_and_end_to_end_kept(start_proxy, mock_url):
    """Upstream response headers: rate-limit and request-id headers pass, hop-by-hop do not,
    and streams get X-Accel-Buffering: no and Cache-Control: no-cache."""
    headers = [
        ("x-ratelimit-remaining-requests", "99"),
        ("request-id", "req_abc"),
        ("connection", "x-upstream-private"),
        ("x-upstream-private", "1"),
        ("keep-alive", "timeout=5"),
    ]
    with start_proxy(mock_url) as proxy:
        response = client.request(
            proxy.url, "POST", "/mock/script", body=client.script([b"data: 1\n\n"], headers=headers)
        )
    assert response.header(b"x-ratelimit-remaining-requests") == b"99"
    assert response.header(b"request-id") == b"req_abc"
    assert response.header(b"x-upstream-private") is None
    assert response.header(b"keep-alive") is None
    assert response.header(b"x-accel-buffering") == b"no"
    assert response.header(b"cache-control") == b"no-cache"


def test_longest_prefix_wins_and_strip_prefix(start_proxy, mock_url):
    """Routing: the longest matching path_prefix wins; strip_prefix removes it; a prefix
    matches whole segments only."""
    upstreams = [
        UpstreamConfig(name="root", url=mock_url + "/echo/root"),
        UpstreamConfig(
            name="anthropic", url=mock_url + "/echo/a", path_prefix="/anthropic", strip_prefix=True
        ),
        UpstreamConfig(name="deep", url=mock_url + "/echo/deep", path_prefix="/anthropic/v2"),
    ]
    with start_proxy(upstreams) as proxy:
        assert _echo(client.request(proxy.url, "GET", "/v1/x"))["raw_path"] == "/echo/root/v1/x"
        stripped = _echo(client.request(proxy.url, "GET", "/anthropic/v1/messages?q=1"))
        assert stripped["raw_path"] == "/echo/a/v1/messages"
        assert stripped["query"] == "q=1"
        deep = _echo(client.request(proxy.url, "GET", "/anthropic/v2/z"))
        assert deep["raw_path"] == "/echo/deep/anthropic/v2/z"
        other = _echo(client.request(proxy.url, "GET", "/anthropicx/y"))
        assert other["raw_path"] == "/echo/root/anthropicx/y"
        assert (
            proxy.metric(
                "streamproxy_requests_total",
                {"upstream": "anthropic", "method": "GET", "status_code": "200"},
            )
            == 1
        )


@pytest.mark.parametrize(
    "target",
    [
        "http://{evil}/echo/x",  # absolute-form
        "//{evil}/echo/x",  # network-path reference
        "{evil}",  # authority-form, with CONNECT
        "/echo/../../etc/passwd",
        "/echo/%2e%2e/x",
    ],
)
def test_never_an_open_proxy(start_proxy, mock_url, target):
    """No request line makes the proxy contact another host: the other host sees no
    connection, and the answer is a 4xx."""
    contacted = []

    async def evil_server(reader, writer, state):
        contacted.append(True)

    with raw_server(evil_server) as evil, start_proxy(mock_url) as proxy:
        evil_host = evil.url.removeprefix("http://")
        method = "CONNECT" if target == "{evil}" else "GET"
        response = client.request(proxy.url, method, target.format(evil=evil_host))
    assert contacted == []
    assert response.status in (400, 405)


def test_no_route_is_404(start_proxy, mock_url):
    """A path no upstream serves gets a 404 in the OpenAI error shape."""
    upstream = UpstreamConfig(name="only", url=mock_url, path_prefix="/v1")
    with start_proxy([upstream]) as proxy:
        response = client.request(proxy.url, "GET", "/other")
    assert response.status == 404
    assert "error" in client.json_body(response)


def test_request_body_limit_is_413(start_proxy, mock_url):
    """Bodies past limits.max_request_body get 413, declared or chunked."""
    with start_proxy(mock_url, limits=LimitsConfig(max_request_body=1000)) as proxy:
        ok = client.request(proxy.url, "POST", "/echo/x", body=b"x" * 1000)
        assert _echo(ok)["body_len"] == 1000
        too_big = client.request(proxy.url, "POST", "/echo/x", body=b"x" * 1001)
        assert too_big.status == 413
        chunked = client.request(
            proxy.url,
            "POST",
            "/echo/x",
            [("transfer-encoding", "chunked")],
            body=b"",
            raw_body=b"3e9\r\n" + b"x" * 1001 + b"\r\n0\r\n\r\n",
        )
        assert chunked.status == 413


def test_api_key_injection_replaces_client_keys(start_proxy, mock_url):
    """With api_key_env, the upstream gets the proxy's key in the configured header and
    none of the keys the client sent."""
    upstreams = [
        UpstreamConfig(
            name="oa", url=mock_url, path_prefix="/oa", strip_prefix=True, api_key_env="OA_KEY"
        ),
        UpstreamConfig(
            name="an",
            url=mock_url,
            path_prefix="/an",
            strip_prefix=True,
            api_key_env="AN_KEY",
            api_key_header="x-api-key",
        ),
    ]
    client_keys = [("authorization", "Bearer dummy"), ("x-api-key", "dummy")]
    env = {"OA_KEY": "sk-real-openai", "AN_KEY": "sk-ant-real"}
    with start_proxy(upstreams, env=env) as proxy:
        oa = _headers(_echo(client.request(proxy.url, "GET", "/oa/echo/x", client_keys)))
        an = _headers(_echo(client.request(proxy.url, "GET", "/an/echo/x", client_keys)))
    assert oa["authorization"] == ["Bearer sk-real-openai"]
    assert "x-api-key" not in oa
    assert an["x-api-key"] == ["sk-ant-real"]
    assert "authorization" not in an
