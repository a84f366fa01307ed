"""How fast does a client's disconnect reach the upstream?

Runs `python -m streamproxy serve` in front of a tiny endless SSE upstream on loopback,
opens a stream, waits for a few events, closes the client socket, and times how long
until the upstream sees its connection closed (the moment the model would stop
generating and billing). Usage: `python benchmarks/disconnect.py [--trials 20]`.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

EVENT = b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'


class Upstream:
    """An endless chunked SSE stream per connection; records when each one is closed."""

    def __init__(self) -> None:
        self.closed: list[float] = []
        self.port = 0
        self.ready = threading.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")  # fmt: skip
        eof = asyncio.ensure_future(reader.read())  # resolves when the proxy hangs up
        while not eof.done():
            writer.write(b"%x\r\n%s\r\n" % (len(EVENT), EVENT))
            await asyncio.wait([eof], timeout=0.05)
        self.closed.append(time.monotonic())
        writer.close()

    def run(self) -> None:
        async def main() -> None:
            server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            self.ready.set()
            await server.serve_forever()

        asyncio.run(main())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    upstream = Upstream()
    threading.Thread(target=upstream.run, daemon=True).start()
    upstream.ready.wait(5)
    port, admin = free_port(), free_port()
    config = Path(tempfile.mkdtemp()) / "config.yaml"
    config.write_text(
        f"listen: {{host: 127.0.0.1, port: {port}}}\nadmin: {{host: 127.0.0.1, port: {admin}}}\n"
        f"upstreams: [{{name: u, url: 'http://127.0.0.1:{upstream.port}'}}]\n"
        "logging: {level: warning}\n"
    )
    proxy = subprocess.Popen(
        [sys.executable, "-m", "streamproxy", "serve", "--config", str(config)]
    )
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        latencies = []
        for trial in range(args.trials):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                         b"content-length: 16\r\n\r\n" + b'{"stream": true}')  # fmt: skip
            received = b""
            while received.count(b"data:") < 3:
                received += sock.recv(65536)
            started = time.monotonic()
            sock.close()
            while len(upstream.closed) <= trial:
                time.sleep(0.0005)
            latencies.append((upstream.closed[trial] - started) * 1000)
        print(
            f"client close -> upstream connection closed, {args.trials} trials: "
            f"median {statistics.median(latencies):.2f} ms, max {max(latencies):.2f} ms"
        )
    finally:
        proxy.terminate()
        proxy.wait(30)


if __name__ == "__main__":
    main()
