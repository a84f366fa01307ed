"""A bug in the metrics (the stream observer raising) never breaks the user's stream:
the rest of the body is relayed unobserved and the stream ends normally."""

from __future__ import annotations

from streamproxy.observer import StreamObserver
from tests import client

EVENTS = [b"data: %d\n\n" % i for i in range(5)] + [b"data: [DONE]\n\n"]


def test_stream_survives_an_observer_that_raises(start_proxy, mock_url, monkeypatch):
    """The observer fails on every chunk: the client still gets every byte and the
    chunked terminator."""
    calls = []

    def broken(self, chunk, now):
        calls.append(chunk)
        raise RuntimeError("metrics bug")

    monkeypatch.setattr(StreamObserver, "on_chunk", broken)
    chunks = [(event, 0.05 if i else 0.0) for i, event in enumerate(EVENTS)]
    with start_proxy(mock_url, keepalive=0) as proxy:
        response = client.request(proxy.url, "POST", "/mock/script", body=client.script(chunks))
    assert response.status == 200
    assert response.complete
    assert response.body == b"".join(EVENTS)
    assert len(calls) == 1  # observing stopped after the first failure
