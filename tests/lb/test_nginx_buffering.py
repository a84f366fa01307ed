"""nginx's default `proxy_buffering on` vs `X-Accel-Buffering: no`.

nginx (default settings: buffering on, HTTP/1.0 to the backend) holds a small streamed
response that the backend delimits by closing the connection until the response ends,
unless the backend answers with `X-Accel-Buffering: no`, which the proxy adds to every
streamed response. Both backends answer an HTTP/1.0 request close-delimited (the proxy
itself, and the mock under uvicorn's h11 parser). (A *chunked* backend answer, e.g. from
uvicorn's httptools parser, which chunks even for HTTP/1.0, or with `proxy_http_version
1.1`, is passed through chunk by chunk by nginx 1.22 even with buffering on, so it could
not tell whether the header works.) The control puts the same nginx directly in front of
the mock, which does not send the header.
"""

from __future__ import annotations

import pytest

from streamproxy import mock_upstream
from tests import client
from tests.support import serve_app

pytestmark = pytest.mark.lb

EVENTS = [b"data: %d\n\n" % i for i in range(10)]
GAP = 0.2  # 10 events 200 ms apart: the stream lasts 1.8 s


def _events_through(url: str) -> list[float]:
    """Request the scripted stream through `url`; return each event's arrival time."""
    chunks: list[bytes | tuple[bytes, float]] = [
        (event, GAP if i else 0.0) for i, event in enumerate(EVENTS)
    ]
    response = client.request(url, "POST", "/mock/script", body=client.script(chunks), timeout=15)
    assert response.status == 200
    assert response.complete
    assert response.body == b"".join(EVENTS)
    ends = [sum(len(e) for e in EVENTS[: i + 1]) for i in range(len(EVENTS))]
    arrivals: list[float] = []
    received = 0
    for t, data in response.chunks:
        received += len(data)
        arrivals.extend(t for end in ends[len(arrivals) :] if end <= received)
    return arrivals


@pytest.fixture
def h11_mock_url():
    """The mock under uvicorn's h11 parser: close-delimited answers to HTTP/1.0 requests."""
    with serve_app(mock_upstream.create_app(), http="h11") as url:
        yield url


def test_events_pass_buffering_nginx_one_by_one(start_proxy, h11_mock_url, nginx):
    """Behind nginx with proxy_buffering on, the proxy's events still arrive one by one,
    spread over the stream's 1.8 s, because it sends X-Accel-Buffering: no."""
    with start_proxy(h11_mock_url, keepalive=0) as proxy:
        balancer = nginx(proxy.url)
        arrivals = _events_through(balancer.url)
    assert arrivals[0] < 0.8, arrivals  # the first event did not wait for the last
    assert arrivals[-1] - arrivals[0] > 1.2, arrivals
    assert len(set(arrivals)) >= 8, arrivals  # not delivered in lumps


def test_nginx_buffers_a_backend_without_the_header(h11_mock_url, nginx):
    """Control: nginx directly in front of the mock (no X-Accel-Buffering) delivers the
    same events in one lump when the stream ends, so the rig really buffers."""
    balancer = nginx(h11_mock_url)
    arrivals = _events_through(balancer.url)
    assert arrivals[0] > 1.5, arrivals  # nothing came before the upstream finished
    assert arrivals[-1] - arrivals[0] < 0.3, arrivals
