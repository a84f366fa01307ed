"""`streamproxy demo`: the mock upstream and the proxy on loopback, with things to try."""

from __future__ import annotations

import asyncio
import dataclasses
import sys

from streamproxy import logs, mock_upstream
from streamproxy.config import Config, UpstreamConfig
from streamproxy.server import bind, run_event_loop, serve

HOST = "127.0.0.1"


def instructions(port: int, admin_port: int, mock_port: int) -> str:
    proxy = f"http://{HOST}:{port}"
    return f"""
streamproxy demo: proxy {proxy} -> mock LLM API http://{HOST}:{mock_port}
metrics on http://{HOST}:{admin_port}/metrics. Try, in another terminal:

  # an OpenAI-style stream, 20 tokens, 0.3 s to the first token, one every 100 ms
  curl -N {proxy}/v1/chat/completions -H 'content-type: application/json' \\
       -H 'x-mock-tokens: 20' -H 'x-mock-ttft: 0.3' -H 'x-mock-interval: 0.1' \\
       -d '{{"model": "demo-model", "stream": true, "messages": []}}'

  # an Anthropic-style stream that stalls 4 s mid-way: watch the ': keepalive' comments
  curl -N {proxy}/v1/messages -H 'content-type: application/json' \\
       -H 'x-mock-stall: 4' -H 'x-mock-interval: 0.1' \\
       -d '{{"model": "claude-demo", "stream": true, "max_tokens": 64, "messages": []}}'

  # an upstream that dies mid-stream: the client gets an error event, never a clean end
  curl -N {proxy}/v1/chat/completions -H 'content-type: application/json' \\
       -H 'x-mock-abort-after: 5' -d '{{"model": "demo-model", "stream": true}}'

  # the official SDK, unchanged but for its base URL
  OPENAI_BASE_URL={proxy}/v1 OPENAI_API_KEY=demo python -c "import openai; \\
  [print(c.choices[0].delta.content or '', end='', flush=True) for c in openai.OpenAI() \\
  .chat.completions.create(model='demo-model', messages=[], stream=True) if c.choices]"

  # what it measured: TTFT, inter-token latency, outcomes
  curl -s http://{HOST}:{admin_port}/metrics | grep '^streamproxy_'

Keepalive comments are sent after 2 s of silence in this demo (15 s by default).
Press Ctrl-C to stop.
"""


def run(port: int, admin_port: int, mock_port: int) -> int:
    """Run both servers until Ctrl-C. Returns the exit code."""
    upstream = UpstreamConfig(name="mock", url=f"http://{HOST}:{mock_port}")
    defaults = Config()
    config = dataclasses.replace(
        defaults,
        listen=dataclasses.replace(defaults.listen, host=HOST, port=port),
        admin=dataclasses.replace(defaults.admin, host=HOST, port=admin_port),
        upstreams=(upstream,),
        keepalive=dataclasses.replace(defaults.keepalive, interval=2.0),
        logging=dataclasses.replace(defaults.logging, format="console"),
    )
    logs.configure(config.logging.level, config.logging.format)
    try:
        proxy_sock, admin_sock = bind(HOST, port, fanout=True), bind(HOST, admin_port)
    except OSError as exc:
        print(f"demo: cannot listen: {exc} (try --port/--admin-port/--mock-port)", file=sys.stderr)
        return 1

    async def main() -> None:
        async with asyncio.TaskGroup() as group:
            mock = group.create_task(mock_upstream.serve(HOST, mock_port))
            await serve(
                config,
                proxy_sock,
                admin_sock,
                ready=lambda: print(instructions(port, admin_port, mock_port), flush=True),
            )
            mock.cancel()

    run_event_loop(main())
    return 0
