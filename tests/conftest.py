"""Loopback fixtures: the real proxy and real upstreams on 127.0.0.1, real sockets only."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from streamproxy import logs
from streamproxy.config import Config, KeepaliveConfig, UpstreamConfig
from streamproxy.metrics import Metrics
from streamproxy.relay import ProxyApp
from tests.support import serve_app, serve_proxy


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> None:
    logs.configure("warning", "console", cache=False)


@pytest.fixture(scope="session")
def mock_url() -> Iterator[str]:
    """The built-in mock LLM API, shared by the whole session."""
    from streamproxy import mock_upstream

    with serve_app(mock_upstream.create_app()) as url:
        yield url


@dataclass
class RunningProxy:
    """A proxy under test: its base URL, its app and its own metrics registry."""

    url: str
    app: ProxyApp
    registry: CollectorRegistry

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's value from this proxy's registry (0 when absent)."""
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


ProxyFactory = Callable[..., contextlib.AbstractContextManager[RunningProxy]]


@pytest.fixture
def start_proxy() -> ProxyFactory:
    """Start a proxy in front of `upstream` (a URL or a list of UpstreamConfig)."""

    @contextlib.contextmanager
    def start(
        upstream: str | list[UpstreamConfig],
        *,
        keepalive: float = 15.0,
        before_headers: bool = False,
        env: dict[str, str] | None = None,
        **overrides: Any,
    ) -> Iterator[RunningProxy]:
        upstreams = (
            (UpstreamConfig(name="test", url=upstream),)
            if isinstance(upstream, str)
            else tuple(upstream)
        )
        config = dataclasses.replace(
            Config(),
            upstreams=upstreams,
            keepalive=KeepaliveConfig(interval=keepalive, before_headers=before_headers),
            **overrides,
        )
        registry = CollectorRegistry()
        app = ProxyApp(config, Metrics(registry, config.metrics), env=env or {})
        max_body = config.limits.max_request_body
        with serve_proxy(app.handle, max_body=max_body, cleanup=app.aclose) as url:
            yield RunningProxy(url, app, registry)

    return start


class SDKs:
    """Official SDK clients pointed at a base URL, closed when the test ends (an unclosed
    client leaks sockets that warn, as errors, in some later test)."""

    def __init__(self) -> None:
        self._clients: list[Any] = []

    def openai(self, base_url: str) -> Any:
        import openai

        client = openai.OpenAI(base_url=base_url + "/v1", api_key="sk-test", max_retries=0)
        self._clients.append(client)
        return client

    def anthropic(self, base_url: str) -> Any:
        import anthropic

        client = anthropic.Anthropic(base_url=base_url, api_key="sk-ant-test", max_retries=0)
        self._clients.append(client)
        return client

    def close(self) -> None:
        for client in self._clients:
            client.close()


@pytest.fixture
def sdk() -> Iterator[SDKs]:
    """Factory for openai/anthropic clients that are closed after the test."""
    clients = SDKs()
    yield clients
    clients.close()
