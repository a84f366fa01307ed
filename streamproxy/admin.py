"""The admin app: /metrics, /healthz, /readyz. Starlette is fine here: it is off the relay path."""

from __future__ import annotations

import os
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route


@dataclass(slots=True)
class Readiness:
    """Ready once both servers listen; not ready again from the first SIGTERM on."""

    started: bool = False
    draining: bool = False

    @property
    def ready(self) -> bool:
        return self.started and not self.draining


def create_admin_app(registry: CollectorRegistry, readiness: Readiness) -> Starlette:
    """The admin ASGI app. In multiprocess mode each scrape aggregates every worker's files."""

    async def metrics(_: Request) -> Response:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            scrape = CollectorRegistry()
            MultiProcessCollector(scrape)  # type: ignore[no-untyped-call]  # untyped in prometheus_client
            body = generate_latest(scrape)
        else:
            body = generate_latest(registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def healthz(_: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(_: Request) -> Response:
        if readiness.ready:
            return PlainTextResponse("ready\n")
        return PlainTextResponse("draining\n" if readiness.draining else "starting\n", 503)

    return Starlette(
        routes=[
            Route("/metrics", metrics),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
        ]
    )
