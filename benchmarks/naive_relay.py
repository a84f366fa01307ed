"""The naive relay: an LLM proxy as a first attempt in Python is usually written.

Starlette's `StreamingResponse` over an httpx streaming request, served by `uvicorn.run`
with its defaults (access log on; loop and parser "auto", which picks uvloop and httptools
when they are installed, as they are with `uvicorn[standard]`). It is correct for this
benchmark: bytes pass unchanged (`aiter_raw`) and hop-by-hop headers are dropped. It is the
baseline the issue's "max events/s at least 2x the Starlette+httpx relay" is measured
against.

The one change from a literal first attempt: httpx's connection pool limit (100 by
default) is lifted and its timeouts are off. With the defaults, stream 101 waits for a free
connection and every stream dies after 5 s of upstream silence; every such proxy gets
this fix within its first day.

    python benchmarks/naive_relay.py --upstream http://127.0.0.1:8001 --port 8002
"""

from __future__ import annotations

import argparse

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}


def create_app(upstream: str) -> Starlette:
    """A Starlette app relaying every request to `upstream`."""
    client = httpx.AsyncClient(
        base_url=upstream,
        timeout=None,  # noqa: S113 - LLM streams can be silent for minutes
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=100),
    )

    async def relay(request: Request) -> StreamingResponse:
        headers = {k: v for k, v in request.headers.items() if k not in HOP_BY_HOP}
        upstream_request = client.build_request(
            request.method,
            request.url.path,
            params=request.query_params,
            headers=headers,
            content=await request.body(),
        )
        response = await client.send(upstream_request, stream=True)
        return StreamingResponse(
            response.aiter_raw(),
            status_code=response.status_code,
            headers={k: v for k, v in response.headers.items() if k not in HOP_BY_HOP},
            background=BackgroundTask(response.aclose),
        )

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
    return Starlette(routes=[Route("/{path:path}", relay, methods=methods)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    args = parser.parse_args()
    uvicorn.run(create_app(args.upstream), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
