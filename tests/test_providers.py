"""providers: API detection, model extraction, and per-API token/terminal/usage facts."""

from __future__ import annotations

import base64
import typing

import orjson
import pytest
from hypothesis import given, strategies as st

from streamproxy.providers import (
    NOTHING,
    Api,
    EventFacts,
    classify_ndjson,
    classify_sse,
    detect_api,
    request_model,
    wants_stream,
)
from streamproxy.sse import SSEEvent

APIS: tuple[Api, ...] = typing.get_args(Api)
TOKEN = EventFacts(token=True, terminal=False, output_tokens=None, error=False)
TERMINAL = EventFacts(token=False, terminal=True, output_tokens=None, error=False)
ERROR = EventFacts(token=False, terminal=False, output_tokens=None, error=True)


def usage(n: int, *, token: bool = False, terminal: bool = False) -> EventFacts:
    return EventFacts(token=token, terminal=terminal, output_tokens=n, error=False)


def sse(api: Api, data: bytes, event: bytes | None = None) -> EventFacts:
    return classify_sse(api, SSEEvent(event=event, data=data, truncated=False))


# --- detect_api / request_model -------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "api"),
    [
        ("/v1/chat/completions", "openai_chat"),
        ("/openai/v1/chat/completions", "openai_chat"),
        ("/openai/deployments/gpt4o/chat/completions", "openai_chat"),
        ("/v1/chat/completions/", "openai_chat"),
        ("/v1/chat/completions?api-version=2024-10-21", "openai_chat"),
        ("/v1/completions", "openai_completions"),
        ("/v1/responses", "openai_responses"),
        ("/proxy/openai/v1/responses", "openai_responses"),
        ("/v1/messages", "anthropic"),
        ("/anthropic/v1/messages", "anthropic"),
        ("/v1beta/models/gemini-2.0-flash:streamGenerateContent", "gemini"),
        ("/v1beta/models/gemini-2.0-flash:generateContent", "gemini"),
        (
            "/v1/projects/p/locations/us-central1/publishers/google/models/"
            "gemini-2.5-pro:streamGenerateContent",
            "gemini",
        ),
        ("/v1beta/models/gemini-2.0-flash:countTokens", "unknown"),
        ("/api/chat", "ollama"),
        ("/api/generate", "ollama"),
        ("/ollama/api/chat", "ollama"),
        ("/v1/models", "unknown"),
        ("/v1/embeddings", "unknown"),
        ("/", "unknown"),
        ("", "unknown"),
    ],
)
def test_detect_api(path: str, api: Api) -> None:
    """Each API is recognised by its path suffix, behind any prefix."""
    assert detect_api(path) == api


def test_request_model_from_small_body() -> None:
    """The top-level "model" string of a JSON body is the model."""
    body = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    assert request_model("openai_chat", "/v1/chat/completions", body) == "gpt-4o"
    body = b'{"messages": [], "model" : "claude-sonnet-4-5", "stream": true}'
    assert request_model("anthropic", "/v1/messages", body) == "claude-sonnet-4-5"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"{",
        b"[1, 2]",
        b'"model"',
        b'{"model": 4}',
        b'{"model": ""}',
        b'{"model": null}',
        b'{"messages": []}',
        b"\xff\xfe\x00",
        b'{"tools": [{"parameters": {"model": "nested"}}]}',
    ],
)
def test_request_model_garbage_is_none(body: bytes) -> None:
    """Bodies without a top-level model string give None, never an exception."""
    assert request_model("openai_chat", "/v1/chat/completions", body) is None


def test_request_model_from_gemini_path() -> None:
    """For Gemini the model is in the path, not the body."""
    path = "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse"
    assert request_model("gemini", path, b'{"contents": []}') == "gemini-2.0-flash"
    assert request_model("gemini", "/v1beta/models", b"") is None


def big_image_message() -> dict[str, object]:
    image = base64.b64encode(b"\x89PNG" * 300_000).decode()  # ~1.6 MB
    return {
        "role": "user",
        "content": [
            {"type": "text", "text": 'say "model": "fake"'},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
        ],
    }


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "pick",
            "parameters": {"type": "object", "properties": {"model": {"type": "string"}}},
        },
    }
]


@pytest.mark.parametrize(
    "payload",
    [
        # curl / JS SDKs: model first
        {"model": "gpt-4o", "messages": [big_image_message()], "stream": True},
        # openai-python: messages, then model, then the rest
        {"messages": [big_image_message()], "model": "gpt-4o", "stream": True},
        # a nested "model" key after the top-level one (a tool schema property)
        {"messages": [big_image_message()], "model": "gpt-4o", "tools": TOOLS},
        # a nested "model" key before it
        {"tools": TOOLS, "messages": [big_image_message()], "model": "gpt-4o"},
    ],
)
def test_request_model_from_large_body(payload: dict[str, object]) -> None:
    """Multi-megabyte bodies still yield the top-level model, not a nested one."""
    body = orjson.dumps(payload)
    assert len(body) > 1_000_000
    assert request_model("openai_chat", "/v1/chat/completions", body) == "gpt-4o"
    spaced = orjson.dumps(payload, option=orjson.OPT_INDENT_2)
    assert request_model("openai_chat", "/v1/chat/completions", spaced) == "gpt-4o"


def test_request_model_large_body_without_model() -> None:
    """A large body without a top-level model gives None (nested keys do not count)."""
    body = orjson.dumps({"messages": [big_image_message()], "tools": TOOLS})
    assert request_model("openai_chat", "/v1/chat/completions", body) is None
    assert request_model("openai_chat", "/v1/chat/completions", b"x" * 2_000_000) is None


# --- OpenAI chat completions ----------------------------------------------------------

CHAT_HEAD = b'{"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,'
CHAT_HEAD += b'"model":"gpt-4o-mini","system_fingerprint":"fp_44709d6fcb",'


def chat(delta: bytes, finish: bytes = b"null", tail: bytes = b"") -> bytes:
    return (
        CHAT_HEAD + b'"choices":[{"index":0,"delta":' + delta + b',"logprobs":null,'
        b'"finish_reason":' + finish + b"}]" + tail + b"}"
    )


@pytest.mark.parametrize(
    ("data", "facts"),
    [
        (chat(b'{"role":"assistant","content":"","refusal":null}'), NOTHING),
        (chat(b'{"content":"Hello"}'), TOKEN),
        (chat(b'{"content":"\\"quoted\\""}'), TOKEN),
        (chat(b'{"content":""}'), NOTHING),
        (chat(b'{"content":null}'), NOTHING),
        (chat(b"{}", b'"stop"'), NOTHING),
        (chat(b'{"content":"Hi"}', tail=b',"usage":null'), TOKEN),
        (chat(b'{"role":"assistant","content":null,"reasoning_content":"Let me"}'), TOKEN),
        (chat(b'{"role":"assistant","content":"","reasoning":"Hmm"}'), TOKEN),
        (chat(b'{"content":null,"refusal":"I can\'t help"}'), TOKEN),
        (
            chat(
                b'{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_abc",'
                b'"type":"function","function":{"name":"get_weather","arguments":""}}],'
                b'"refusal":null}'
            ),
            NOTHING,
        ),
        (chat(b'{"tool_calls":[{"index":0,"function":{"arguments":"{\\""}}]}'), TOKEN),
        (chat(b'{"function_call":{"arguments":"{\\"x"}}'), TOKEN),
        (
            CHAT_HEAD + b'"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":12,'
            b'"total_tokens":21,"completion_tokens_details":{"reasoning_tokens":0}}}',
            usage(12),
        ),
        (
            chat(b'{"content":"Hi"}', tail=b',"usage":{"prompt_tokens":9,"completion_tokens":3}'),
            usage(3, token=True),
        ),
        (b'{"choices": [{"index": 0, "delta": {"content": "Hi"}}]}', TOKEN),
        (b'{"choices": [{"index": 0, "delta": {"content": ""}}]}', NOTHING),
        (b"[DONE]", TERMINAL),
        (
            b'{"error":{"message":"The server had an error while processing your request.",'
            b'"type":"server_error","param":null,"code":null}}',
            ERROR,
        ),
    ],
)
def test_openai_chat(data: bytes, facts: EventFacts) -> None:
    """OpenAI chat chunks: content, reasoning and tool arguments are tokens; [DONE] ends."""
    assert sse("openai_chat", data) == facts


def test_uninteresting_events_share_nothing() -> None:
    """The common uninteresting event returns the shared NOTHING instance."""
    assert sse("openai_chat", chat(b"{}", b'"stop"')) is NOTHING
    assert sse("openai_chat", chat(b'{"role":"assistant","content":""}')) is NOTHING
    assert sse("anthropic", b'{"type": "ping"}', b"ping") is NOTHING


# --- OpenAI legacy completions -------------------------------------------------------

COMPLETION = (
    b'{"id":"cmpl-7iA7iJjj8V2zOkCGvWF2hAkDWBQZe","object":"text_completion",'
    b'"created":1690759702,"choices":[{"text":%s,"index":0,"logprobs":null,'
    b'"finish_reason":%s}],"model":"gpt-3.5-turbo-instruct"}'
)


@pytest.mark.parametrize(
    ("data", "facts"),
    [
        (COMPLETION % (b'"This"', b"null"), TOKEN),
        (COMPLETION % (b'""', b'"stop"'), NOTHING),
        (
            b'{"id":"cmpl-1","object":"text_completion","choices":[],'
            b'"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}',
            usage(7),
        ),
        (b"[DONE]", TERMINAL),
    ],
)
def test_openai_completions(data: bytes, facts: EventFacts) -> None:
    """Legacy completions: non-empty choices[].text is a token; [DONE] ends."""
    assert sse("openai_completions", data) == facts


# --- OpenAI Responses ----------------------------------------------------------------

RESPONSE_DONE = (
    b'{"type":"%s","sequence_number":9,"response":{"id":"resp_67c9","object":"response",'
    b'"status":"completed","output":[],"usage":{"input_tokens":36,"input_tokens_details":'
    b'{"cached_tokens":0},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":0},'
    b'"total_tokens":123}}}'
)


def delta_event(kind: bytes, delta: bytes) -> bytes:
    return (
        b'{"type":"' + kind + b'","sequence_number":4,"item_id":"msg_67c9","output_index":0,'
        b'"content_index":0,"delta":' + delta + b',"logprobs":[]}'
    )


@pytest.mark.parametrize(
    ("event", "data", "facts"),
    [
        (
            b"response.created",
            b'{"type":"response.created","sequence_number":0,"response":{"id":"resp_67c9",'
            b'"object":"response","status":"in_progress","output":[],"usage":null}}',
            NOTHING,
        ),
        (
            b"response.output_item.added",
            b'{"type":"response.output_item.added","sequence_number":2,"output_index":0,'
            b'"item":{"id":"msg_67c9","type":"message","status":"in_progress","content":[],'
            b'"role":"assistant"}}',
            NOTHING,
        ),
        (
            b"response.output_text.delta",
            delta_event(b"response.output_text.delta", b'"Hi"'),
            TOKEN,
        ),
        (
            b"response.output_text.delta",
            delta_event(b"response.output_text.delta", b'""'),
            NOTHING,
        ),
        (
            b"response.reasoning_summary_text.delta",
            delta_event(b"response.reasoning_summary_text.delta", b'"**Plan**"'),
            TOKEN,
        ),
        (
            b"response.reasoning_text.delta",
            delta_event(b"response.reasoning_text.delta", b'"first"'),
            TOKEN,
        ),
        (
            b"response.function_call_arguments.delta",
            delta_event(b"response.function_call_arguments.delta", b'"{\\"loc"'),
            TOKEN,
        ),
        (b"response.refusal.delta", delta_event(b"response.refusal.delta", b'"No"'), TOKEN),
        (
            b"response.output_text.done",
            b'{"type":"response.output_text.done","sequence_number":5,"item_id":"msg_67c9",'
            b'"output_index":0,"content_index":0,"text":"Hi"}',
            NOTHING,
        ),
        (b"response.completed", RESPONSE_DONE % b"response.completed", usage(87, terminal=True)),
        (
            b"response.incomplete",
            RESPONSE_DONE % b"response.incomplete",
            usage(87, terminal=True),
        ),
        (
            b"response.failed",
            b'{"type":"response.failed","sequence_number":3,"response":{"id":"resp_1",'
            b'"status":"failed","error":{"code":"server_error","message":"boom"}}}',
            ERROR,
        ),
        (
            b"error",
            b'{"type":"error","code":"ERR_SOMETHING","message":"Something went wrong",'
            b'"param":null,"sequence_number":1}',
            ERROR,
        ),
    ],
)
def test_openai_responses(event: bytes, data: bytes, facts: EventFacts) -> None:
    """Responses events: *.delta with content is a token; completed ends with usage."""
    assert sse("openai_responses", data, event) == facts
    assert sse("openai_responses", data) == facts  # the data's "type" when event: is absent


# --- Anthropic -----------------------------------------------------------------------


def block_delta(delta: bytes) -> bytes:
    return b'{"type":"content_block_delta","index":0,"delta":' + delta + b"}"


@pytest.mark.parametrize(
    ("event", "data", "facts"),
    [
        (
            b"message_start",
            b'{"type":"message_start","message":{"id":"msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",'
            b'"type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5",'
            b'"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,'
            b'"output_tokens":1}}}',
            NOTHING,
        ),
        (
            b"content_block_start",
            b'{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}',
            NOTHING,
        ),
        (b"ping", b'{"type": "ping"}', NOTHING),
        (b"content_block_delta", block_delta(b'{"type":"text_delta","text":"Hello"}'), TOKEN),
        (b"content_block_delta", block_delta(b'{"type":"text_delta","text":""}'), NOTHING),
        (b"content_block_delta", block_delta(b'{"type": "text_delta", "text": "Hi"}'), TOKEN),
        (
            b"content_block_delta",
            block_delta(b'{"type":"thinking_delta","thinking":"Let me solve this"}'),
            TOKEN,
        ),
        (
            b"content_block_delta",
            block_delta(b'{"type":"signature_delta","signature":"EqQBCgIYAhIM1gbcDa9GJwZA"}'),
            NOTHING,
        ),
        (
            b"content_block_delta",
            block_delta(b'{"type":"input_json_delta","partial_json":""}'),
            NOTHING,
        ),
        (
            b"content_block_delta",
            block_delta(b'{"type":"input_json_delta","partial_json":"{\\"location\\": \\"San"}'),
            TOKEN,
        ),
        (
            b"content_block_delta",
            block_delta(b'{"type":"input_json_delta","partial_json":"{\\""}'),
            TOKEN,
        ),
        (
            b"content_block_delta",
            block_delta(
                b'{"type":"citations_delta","citation":{"type":"char_location",'
                b'"cited_text":"The grass is green.","document_index":0,"document_title":"",'
                b'"start_char_index":0,"end_char_index":20}}'
            ),
            TOKEN,
        ),
        (b"content_block_stop", b'{"type":"content_block_stop","index":0}', NOTHING),
        (
            b"message_delta",
            b'{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
            b'"usage":{"output_tokens":15}}',
            usage(15),
        ),
        (b"message_stop", b'{"type":"message_stop"}', TERMINAL),
        (
            b"error",
            b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
            ERROR,
        ),
    ],
)
def test_anthropic(event: bytes, data: bytes, facts: EventFacts) -> None:
    """Anthropic: every non-empty content_block_delta is a token; message_stop ends."""
    assert sse("anthropic", data, event) == facts
    assert sse("anthropic", data) == facts  # the data's "type" when event: is absent


# --- Gemini --------------------------------------------------------------------------


def gemini(parts: str, extra: str = "", meta: str = '"candidatesTokenCount": 1') -> bytes:
    return (
        '{"candidates": [{"content": {"parts": ' + parts + ',"role": "model"}' + extra + ","
        '"index": 0}],"usageMetadata": {"promptTokenCount": 5,' + meta + ","
        '"totalTokenCount": 6},"modelVersion": "gemini-2.0-flash","responseId": "abc"}'
    ).encode()


@pytest.mark.parametrize(
    ("data", "facts"),
    [
        (gemini('[{"text": "Hello"}]'), usage(1, token=True)),
        (gemini('[{"text": "Hmm", "thought": true}]'), usage(1, token=True)),
        (
            gemini('[{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]'),
            usage(1, token=True),
        ),
        (gemini('[{"text": ""}]'), usage(1)),
        (
            gemini(
                '[{"text": " world"}]',
                ',"finishReason": "STOP"',
                '"candidatesTokenCount": 12,"thoughtsTokenCount": 30',
            ),
            usage(42, token=True, terminal=True),
        ),
        (
            gemini('[{"text": ""}]', ',"finishReason": "MAX_TOKENS"', '"thoughtsTokenCount": 7'),
            usage(7, terminal=True),
        ),
        (
            b'{"promptFeedback": {"blockReason": "SAFETY"},'
            b'"usageMetadata": {"promptTokenCount": 5,"totalTokenCount": 5}}',
            TERMINAL,
        ),
        (
            b'{"error": {"code": 500, "message": "Internal error", "status": "INTERNAL"}}',
            ERROR,
        ),
        (b'{"modelVersion": "gemini-2.0-flash"}', NOTHING),
    ],
)
def test_gemini(data: bytes, facts: EventFacts) -> None:
    """Gemini chunks: text or function calls are tokens; finishReason ends the stream."""
    assert sse("gemini", data) == facts


# --- Ollama --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "facts"),
    [
        (
            b'{"model":"llama3.2","created_at":"2023-08-04T08:52:19.385406455-07:00",'
            b'"message":{"role":"assistant","content":"The"},"done":false}',
            TOKEN,
        ),
        (
            b'{"model":"llama3.2","created_at":"2023-08-04T08:52:19.385406455-07:00",'
            b'"response":"The","done":false}',
            TOKEN,
        ),
        (
            b'{"model":"qwen3","created_at":"2025-05-29T09:35:56.836222Z","message":'
            b'{"role":"assistant","content":"","thinking":"Hmm"},"done":false}',
            TOKEN,
        ),
        (b'{"model":"qwen3","response":"","thinking":"Hmm","done":false}', TOKEN),
        (
            b'{"model":"llama3.2","message":{"role":"assistant","content":"","tool_calls":'
            b'[{"function":{"name":"get_weather","arguments":{"city":"Paris"}}}]},"done":false}',
            TOKEN,
        ),
        (b'{"model":"llama3.2","message":{"role":"assistant","content":""},"done":false}', NOTHING),
        (
            b'{"model":"llama3.2","created_at":"2023-08-04T19:22:45.499127Z","message":'
            b'{"role":"assistant","content":""},"done":true,"done_reason":"stop",'
            b'"total_duration":4883583458,"load_duration":1334875,"prompt_eval_count":26,'
            b'"prompt_eval_duration":342546000,"eval_count":282,"eval_duration":4535599000}',
            usage(282, terminal=True),
        ),
        (
            b'{"model":"llama3.2","created_at":"2023-08-04T19:22:45.499127Z","response":"",'
            b'"done":true,"done_reason":"stop","context":[1,2,3],"eval_count":290}',
            usage(290, terminal=True),
        ),
        (b'{"error":"model \'nope\' not found"}', ERROR),
        (b"", NOTHING),
        (b"garbage", NOTHING),
    ],
)
def test_ollama(line: bytes, facts: EventFacts) -> None:
    """Ollama lines: content, thinking or tool calls are tokens; done:true ends with usage."""
    assert classify_ndjson("ollama", line) == facts


def test_ndjson_for_other_apis_is_nothing() -> None:
    """Only Ollama streams NDJSON; other APIs' lines are NOTHING."""
    assert classify_ndjson("openai_chat", b'{"response":"x","done":true}') is NOTHING


# --- unknown, truncation, garbage ----------------------------------------------------


def test_unknown_api_best_effort() -> None:
    """An unknown API only recognises [DONE] (and event: error)."""
    assert sse("unknown", b"[DONE]") == TERMINAL
    assert sse("unknown", chat(b'{"content":"Hi"}')) is NOTHING
    assert sse("ollama", b"[DONE]") == TERMINAL  # Ollama's SSE is its OpenAI-compatible API
    assert sse("unknown", b"{}", b"error") == ERROR


@pytest.mark.parametrize("api", APIS)
def test_truncated_events_are_nothing(api: Api) -> None:
    """A truncated event is opaque, whatever its type."""
    for kind in (None, b"content_block_delta", b"response.output_text.delta", b"error"):
        assert classify_sse(api, SSEEvent(event=kind, data=b"", truncated=True)) is NOTHING


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"{",
        b"[1,2]",
        b"null",
        b'"content":"x"',
        b'{"choices":"x"}',
        b'{"choices":[1,{"delta":[]},{"delta":{"tool_calls":[1,{"function":2}]}}]}',
        b'{"candidates":[{"content":{"parts":[1,"x",{"text":5}]}}],"usageMetadata":[]}',
        b'{"usage":{"completion_tokens":"12","output_tokens":true}}',
        b'{"type":5,"delta":{"text":""},"response":[]}',
        b"\xff\xfe",
        b'{"a":' * 2000 + b"1" + b"}" * 2000,
        b'{"n":123456789012345678901234567890}',
    ],
)
def test_garbage_never_raises(api: Api, data: bytes) -> None:
    """Malformed or wrong-shaped data never raises, for any API and event type."""
    for kind in (None, b"content_block_delta", b"message_delta", b"response.completed"):
        assert isinstance(sse(api, data, kind), EventFacts)
    assert isinstance(classify_ndjson(api, data), EventFacts)
    assert request_model(api, "/v1/x", data) is None or isinstance(
        request_model(api, "/v1/x", data), str
    )


@given(st.sampled_from(APIS), st.one_of(st.none(), st.binary(max_size=30)), st.binary())
def test_fuzz_classify_never_raises(api: Api, kind: bytes | None, data: bytes) -> None:
    """Arbitrary event types and data never raise."""
    assert isinstance(sse(api, data, kind), EventFacts)
    assert isinstance(classify_ndjson(api, data), EventFacts)
    model = request_model(api, "/v1/x", data)
    assert model is None or isinstance(model, str)


@pytest.mark.parametrize(
    ("api", "path", "accept", "body", "expected"),
    [
        ("openai_chat", "/v1/chat/completions", None, b'{"stream": true}', True),
        ("openai_chat", "/v1/chat/completions", None, b'{"stream":false}', False),
        ("openai_chat", "/v1/chat/completions", None, b"{}", False),
        ("anthropic", "/v1/messages", b"text/event-stream", b"{}", True),
        ("ollama", "/api/chat", None, b"{}", True),
        ("ollama", "/api/chat", None, b'{"stream" : false}', False),
        ("gemini", "/v1beta/models/g:streamGenerateContent", None, b"{}", True),
        ("gemini", "/v1beta/models/g:generateContent", None, b'{"stream": true}', False),
    ],
)
def test_wants_stream(api, path, accept, body, expected) -> None:
    """Which requests ask for a stream (keepalive.before_headers and stream metrics use it)."""
    assert wants_stream(api, path, accept, body) is expected
