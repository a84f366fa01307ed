"""Read /metrics the way Prometheus does: a real HTTP GET, parsed by prometheus_client's
own text parser. Used by the metrics tests in-process (the admin app served beside a
`start_proxy` proxy) and against `ProxyProcess` subprocesses."""

from __future__ import annotations

import contextlib
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from streamproxy.admin import Readiness, create_admin_app
from tests.support import serve_app

Key = tuple[str, frozenset[tuple[str, str]]]


@dataclass(frozen=True)
class Scrape:
    """One parsed scrape: every sample by (sample name, label set)."""

    samples: dict[Key, float]

    def value(self, name: str, **labels: str) -> float:
        """The sample with exactly these labels (0 when absent, as PromQL sees a gap)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """The sum of every sample named `name` whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= ls)

    def label_values(self, name: str, label: str) -> set[str]:
        """The values `label` takes among the samples named `name`."""
        return {dict(ls)[label] for (n, ls), _ in self.samples.items() if n == name}


def scrape(admin_url: str) -> Scrape:
    """GET /metrics and parse it."""
    with urllib.request.urlopen(admin_url + "/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode("utf-8")
    samples: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return Scrape(samples)


def wait_for(admin_url: str, ready: Callable[[Scrape], bool], timeout: float = 5.0) -> Scrape:
    """Scrape until `ready` holds (accounting runs just after the client's last byte)."""
    deadline = time.monotonic() + timeout
    while True:
        result = scrape(admin_url)
        if ready(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never got there: {sorted(result.samples)[:50]}")
        time.sleep(0.02)


@contextlib.contextmanager
def admin_for(registry: CollectorRegistry) -> Iterator[str]:
    """Serve the real admin app for an in-process proxy's registry; yield its URL."""
    app = create_admin_app(registry, Readiness(started=True))
    with serve_app(app) as url:
        yield url
