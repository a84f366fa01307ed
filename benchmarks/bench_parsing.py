"""Per-event cost of watching a stream: the scanner plus the provider classifier.

    python benchmarks/bench_parsing.py [--seconds 0.3]

Every relayed chunk is, after it has been sent, fed to `SSEScanner` (or `NDJSONScanner`)
and each event it completes goes to `providers.classify_sse` (or `classify_ndjson`). This
script builds realistic streams for each API (the mock upstream's shapes, which copy the
providers' own field sets, plus two variants real servers send: Gemini's spaced JSON with
usage on every chunk, and vLLM's per-chunk usage), feeds them one event per chunk as they
arrive on the wire, and prints a markdown table:

- `classify`: µs per event for the classifier alone (the events scanned beforehand);
- `scan+classify`: µs per event for `feed()` + classify, the parsing cost on the hot path;
- `observer`: µs per event for `StreamObserver.on_chunk` (the above plus timings/counts);
- `slow path`: the share of all events, and of token events, that needed `orjson.loads`
  (the rest were decided by a byte check).

Each number is the best of 25 short batches; compare rows, not machines.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streamproxy import mock_shapes as shapes, providers
from streamproxy.ndjson import NDJSONScanner
from streamproxy.observer import StreamObserver
from streamproxy.providers import Api, classify_ndjson, classify_sse
from streamproxy.sse import SSEScanner

TOKENS = 200
REQ = shapes.RequestInfo(
    model="gpt-4o-mini-2024-07-18",
    prompt_tokens=42,
    created=1_732_000_000,
    suffix="AbCdEf0123456789xyzXYZ",
    include_usage=False,
)


@dataclass(frozen=True)
class Stream:
    name: str
    api: Api
    kind: str  # "sse" | "ndjson"
    chunks: list[bytes]  # one event per chunk, as providers write them


def _mock(shape: Callable[..., Iterator[shapes.Event]], *args: Any, **knobs: Any) -> list[bytes]:
    return [frame for _, frame in shape(shapes.Knobs(tokens=TOKENS, **knobs), *args)]


def _gemini_as_google(every_chunk_usage: bool = True) -> list[bytes]:
    """Gemini's own framing: `": "` after keys, usageMetadata on every chunk."""
    out = []
    for i in range(TOKENS):
        last = i == TOKENS - 1
        candidate: dict[str, Any] = {
            "content": {"parts": [{"text": shapes.WORDS[i % len(shapes.WORDS)]}], "role": "model"},
            "index": 0,
        }
        if last:
            candidate["finishReason"] = "STOP"
        chunk: dict[str, Any] = {"candidates": [candidate]}
        if every_chunk_usage or last:
            chunk["usageMetadata"] = {
                "promptTokenCount": 42,
                "candidatesTokenCount": i + 1,
                "totalTokenCount": 43 + i,
            }
        chunk["modelVersion"] = "gemini-2.0-flash"
        chunk["responseId"] = "AbCdEf0123456789"
        out.append(b"data: " + json.dumps(chunk).encode() + b"\r\n\r\n")
    return out


def _vllm_continuous_usage() -> list[bytes]:
    """vLLM with `stream_options.continuous_usage_stats`: usage on every chunk."""
    out = []
    for i in range(TOKENS):
        chunk = {
            "id": "chatcmpl-abc",
            "object": "chat.completion.chunk",
            "created": 1732000000,
            "model": "meta-llama/Llama-3.1-8B-Instruct",
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": shapes.WORDS[i % len(shapes.WORDS)]},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
            "usage": {"prompt_tokens": 42, "total_tokens": 43 + i, "completion_tokens": i + 1},
        }
        out.append(shapes.SSEFramer().event(chunk))
    out.append(b"data: [DONE]\n\n")
    return out


def streams() -> list[Stream]:
    gen = "2024-11-19T12:00:00Z"
    return [
        Stream("openai chat", "openai_chat", "sse", _mock(shapes.chat_stream, REQ)),
        Stream(
            "openai chat, include_usage",
            "openai_chat",
            "sse",
            _mock(shapes.chat_stream, REQ, usage=True),
        ),
        Stream("openai chat, vLLM usage per chunk", "openai_chat", "sse", _vllm_continuous_usage()),
        Stream(
            "openai chat, reasoning_content",
            "openai_chat",
            "sse",
            _mock(shapes.chat_stream, REQ, kind="reasoning"),
        ),
        Stream(
            "openai chat, tool call",
            "openai_chat",
            "sse",
            _mock(shapes.chat_stream, REQ, kind="tool"),
        ),
        Stream(
            "openai completions",
            "openai_completions",
            "sse",
            _mock(shapes.completion_stream, REQ),
        ),
        Stream("openai responses", "openai_responses", "sse", _mock(shapes.responses_stream, REQ)),
        Stream(
            "openai responses, reasoning",
            "openai_responses",
            "sse",
            _mock(shapes.responses_stream, REQ, kind="reasoning"),
        ),
        Stream("anthropic", "anthropic", "sse", _mock(shapes.messages_stream, REQ)),
        Stream(
            "anthropic, thinking",
            "anthropic",
            "sse",
            _mock(shapes.messages_stream, REQ, kind="reasoning"),
        ),
        Stream(
            "anthropic, tool_use",
            "anthropic",
            "sse",
            _mock(shapes.messages_stream, REQ, kind="tool"),
        ),
        Stream("gemini (compact)", "gemini", "sse", _mock(shapes.gemini_stream, REQ, True)),
        Stream("gemini (as Google sends it)", "gemini", "sse", _gemini_as_google()),
        Stream("ollama /api/chat", "ollama", "ndjson", _mock(shapes.ollama_stream, REQ, True, gen)),
        Stream(
            "ollama /api/generate", "ollama", "ndjson", _mock(shapes.ollama_stream, REQ, False, gen)
        ),
    ]


def parse_once(stream: Stream) -> int:
    """Feed every chunk and classify every event; return the number of token events."""
    tokens = 0
    api = stream.api
    if stream.kind == "sse":
        scanner = SSEScanner()
        for chunk in stream.chunks:
            for event in scanner.feed(chunk):
                tokens += classify_sse(api, event).token
    else:
        lines = NDJSONScanner()
        for chunk in stream.chunks:
            for line in lines.feed(chunk):
                tokens += classify_ndjson(api, line).token
    return tokens


def observe_once(stream: Stream) -> int:
    observer = StreamObserver(stream.api, stream.kind, 0.0, lambda gap, now: None)  # type: ignore[arg-type]  # "sse" | "ndjson"
    now = 0.0
    for chunk in stream.chunks:
        now += 0.001
        observer.on_chunk(chunk, now)
    return observer.token_events


def slow_paths(stream: Stream) -> tuple[int, int, int, int]:
    """(events, token events, events that parsed JSON, token events that parsed JSON)."""
    calls = 0
    real = providers._loads

    def counting(data: bytes) -> object:
        nonlocal calls
        calls += 1
        return real(data)

    providers._loads = counting  # type: ignore[assignment]  # instrumentation only
    try:
        events = tokens = slow = slow_tokens = 0
        items: list[tuple[bool, int]] = []
        if stream.kind == "sse":
            scanner = SSEScanner()
            for chunk in stream.chunks:
                for event in scanner.feed(chunk):
                    before = calls
                    token = classify_sse(stream.api, event).token
                    items.append((token, calls - before))
        else:
            lines = NDJSONScanner()
            for chunk in stream.chunks:
                for line in lines.feed(chunk):
                    before = calls
                    token = classify_ndjson(stream.api, line).token
                    items.append((token, calls - before))
        for token, parsed in items:
            events += 1
            tokens += token
            slow += parsed > 0
            slow_tokens += token and parsed > 0
        return events, tokens, slow, slow_tokens
    finally:
        providers._loads = real  # type: ignore[assignment]  # restore


def classify_only(stream: Stream) -> Callable[[Stream], int]:
    """A runner that classifies the stream's already-scanned events (no scanner)."""
    api = stream.api
    if stream.kind == "sse":
        scanner = SSEScanner()
        events = [event for chunk in stream.chunks for event in scanner.feed(chunk)]
        return lambda _: sum(classify_sse(api, event).token for event in events)
    lines = NDJSONScanner()
    items = [line for chunk in stream.chunks for line in lines.feed(chunk)]
    return lambda _: sum(classify_ndjson(api, line).token for line in items)


def best_per_event(
    run: Callable[[Stream], int], stream: Stream, events: int, seconds: float
) -> float:
    """µs per event: the best of many short batches, which filters out the batches a busy
    machine preempted (a shared CPU doubles single readings)."""
    start = time.perf_counter()
    run(stream)
    once = max(time.perf_counter() - start, 1e-6)
    rounds = 25
    repeat = max(1, int(seconds / rounds / once))
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for _ in range(repeat):
            run(stream)
        best = min(best, (time.perf_counter_ns() - start) / 1000 / repeat / events)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=0.3, help="time per measurement")
    args = parser.parse_args(argv)
    print(f"python {sys.version.split()[0]}, {TOKENS} content events per stream\n")
    print("| stream | events | token events | classify µs/event | scan+classify µs/event "
          "| observer µs/event | slow path (all) | slow path (tokens) |")  # fmt: skip
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    for stream in streams():
        events, tokens, slow, slow_tokens = slow_paths(stream)
        assert parse_once(stream) == tokens == observe_once(stream), stream.name
        classify = best_per_event(classify_only(stream), stream, events, args.seconds)
        parse = best_per_event(parse_once, stream, events, args.seconds)
        observe = best_per_event(observe_once, stream, events, args.seconds)
        print(
            f"| {stream.name} | {events} | {tokens} | {classify:.2f} | {parse:.2f} | {observe:.2f} "
            f"| {slow / events:.0%} | {slow_tokens / max(tokens, 1):.0%} |"
        )


if __name__ == "__main__":
    main()
