"""Logging: structlog configured once, one format for our lines and uvicorn's.

The access line is built from an allow-list of fields (relay.py), so secrets cannot
slip into it; `redact` is the second line of defence for every event, ours or a
library's: sensitive keys are masked and bearer tokens or API keys inside strings are cut.
"""

from __future__ import annotations

import datetime
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import orjson
import structlog

from streamproxy.headers import REDACTED
from streamproxy.observer import StreamRecord

MASK = "[REDACTED]"
_SECRET_PATTERNS = re.compile(
    r"(?i)(bearer\s+)[^\s\"',]+"  # Authorization values
    r"|\b(sk-(?:ant-)?[A-Za-z0-9_\-]{6})[A-Za-z0-9_\-]+"  # OpenAI/Anthropic key shapes
    r"|([?&](?:key|api[-_]key)=)[^&\s\"']+"  # keys in query strings (Gemini)
)


def _mask_match(match: re.Match[str]) -> str:
    prefix = next(group for group in match.groups() if group is not None)
    return prefix + MASK


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        # Every secret shape above contains one of these; most values contain none, and
        # three substring tests cost far less than the case-insensitive regex.
        lowered = value.lower()
        if "bearer" in lowered or "sk-" in lowered or "key=" in lowered:
            return _SECRET_PATTERNS.sub(_mask_match, value)
        return value
    if isinstance(value, dict):
        return {
            k: MASK if str(k).lower() in REDACTED else _redact_value(v) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redact_pair(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_redact_pair(item) for item in value)
    return value


def _redact_pair(item: Any) -> Any:
    # Header lists: [(name, value), ...] with str or bytes names.
    if isinstance(item, list | tuple) and len(item) == 2:
        name = item[0].decode("latin-1") if isinstance(item[0], bytes) else str(item[0])
        if name.lower() in REDACTED:
            return (item[0], MASK)
    return _redact_value(item)


_PLAIN = (int, float, type(None))  # bool is an int
_KEY_IS_SECRET: dict[str, bool] = {}  # the verdict per key name, remembered (bounded below)


def _learn_key(key: str) -> bool:
    verdict = key.lower() in REDACTED
    if len(_KEY_IS_SECRET) < 4096:  # log keys are names from code, a bounded set
        _KEY_IS_SECRET[key] = verdict
    return verdict


def redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: mask sensitive keys and secret-shaped substrings.
    It runs for every line, so the common cases are inlined: a key seen before is one
    dict lookup, a string one lower() and three substring tests, a number nothing."""
    verdicts = _KEY_IS_SECRET
    for key, value in event_dict.items():
        secret = verdicts.get(key)
        if secret is None:
            secret = _learn_key(key)
        if secret:
            event_dict[key] = MASK
        elif type(value) is str:
            lowered = value.lower()
            if "bearer" in lowered or "sk-" in lowered or "key=" in lowered:
                event_dict[key] = _SECRET_PATTERNS.sub(_mask_match, value)
        elif value is not None and not isinstance(value, _PLAIN):
            event_dict[key] = _redact_value(value)
    return event_dict


def _dumps(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=str).decode("utf-8")


def configure(
    level: str = "info", fmt: str = "json", stream: TextIO | None = None, cache: bool = True
) -> None:
    """Configure structlog and the stdlib root logger (uvicorn's loggers) alike."""
    out = stream or sys.stderr
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    numeric = logging.getLevelNamesMapping()[level.upper()]
    _access.enabled = numeric <= logging.INFO
    _access.json_out = out if fmt == "json" else None
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=cache,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
            ],
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # our access line replaces it
    # uvicorn's lifecycle lines ("Started server process": the admin app, the mock)
    # repeat what our own listening/draining/stopped lines say; keep warnings and errors.
    logging.getLogger("uvicorn.error").setLevel(max(numeric, logging.WARNING))


access_log = structlog.get_logger("streamproxy.access")


class _AccessOutput:
    """Where access lines go, set by `configure()`. In JSON, the line one request costs
    is rendered here directly: the same object structlog's pipeline would write (same
    keys, order, timestamp and redaction), at a fraction of its cost per request."""

    enabled = True
    json_out: TextIO | None = None  # the stream, when lines are JSON; else via structlog


_access = _AccessOutput()


def access_line(
    *,
    request_id: str,
    method: str,
    path: str,
    upstream: str,
    model: str,
    status: int,
    record: StreamRecord,
    error: str | None,
) -> None:
    """One canonical line per request, built from an allow-list of fields: no headers,
    no query string (Gemini puts its API key there), no bodies. Times in milliseconds."""
    if not _access.enabled:
        return
    fields: dict[str, Any] = {
        "method": method,
        "path": path,
        "upstream": upstream,
        "model": model,
        "status": status,
        "outcome": record.outcome,
        "bytes": record.bytes_sent,
        "ttfb": _ms(record.ttfb),
        "ttft": _ms(record.ttft),
        "token_events": record.token_events,
        "output_tokens": record.output_tokens,
        "duration": _ms(record.duration),
        "error": error,
    }
    out = _access.json_out
    if out is None:
        # Bound here: on the fast path this runs in an upstream connection's callback, in
        # the context of whichever request opened that connection.
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            access_log.info("request", **fields)
        return
    fields["event"] = "request"
    fields["request_id"] = request_id
    fields["level"] = "info"
    fields["timestamp"] = _now_iso()
    # `redact`'s work, on the only values a client or an upstream can put text in (the
    # keys are fixed, none secret): what `redact` would do to each of them.
    for key in _FREE_TEXT:
        value = fields[key]
        if value is not None:
            fields[key] = _redact_value(value)
    out.write(_dumps(fields) + "\n")
    out.flush()


_FREE_TEXT = ("path", "model", "error", "request_id")


def _now_iso() -> str:
    # structlog's TimeStamper(fmt="iso", utc=True), the other lines' timestamp
    return datetime.datetime.now(tz=datetime.UTC).isoformat().replace("+00:00", "Z")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
