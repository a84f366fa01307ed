"""Configuration: ``config.yaml`` plus the ``STREAMPROXY_*`` environment, as one frozen ``Config``.

Pure: stdlib and yaml only, no logging, no globals. The environment is an argument (as in
starlette's ``Config(environ=...)``), so tests pass a dict.

``load_config`` runs three steps. Each step collects problems instead of stopping at the
first, so ``check-config`` can print them all at once in a single ``ConfigError``:

1. **Read** the YAML file. An empty file counts as an empty mapping. If the file is missing
   or unreadable, is not valid YAML, or its top level is not a mapping, loading stops here,
   and the problem's key path is the file's path.
2. **Overlay** the environment. ``STREAMPROXY_<SECTION>__<KEY>`` and
   ``STREAMPROXY_UPSTREAMS__<I>__<KEY>`` set keys over the file's values, so the environment
   wins. Names are case-insensitive. Values are read as YAML scalars or flow collections;
   a value YAML cannot parse is kept as a plain string, and an empty value stays ``""``.
   Variables without ``__`` after the prefix (``STREAMPROXY_CONFIG``) are not overlays.
   An upstream index equal to the list's length appends an entry. If the file has no
   upstreams, the overlay applies to the built-in ``openai`` upstream, so
   ``STREAMPROXY_UPSTREAMS__0__URL`` re-points it.
3. **Validate** each section through its field table (key -> parser), then check the
   rules that span fields: unique names and prefixes, and no listen/admin port clash.
   A problem whose value came from the environment names the variable.

Decisions:
- A section set to null (``listen:`` with every key commented out) means the same as an
  absent one: its defaults apply. This includes ``upstreams:``. An explicit
  ``upstreams: []`` is a problem. A *key* set to null (``port:``) is a problem, because
  nobody writes that meaning "use the default".
- Upstream URLs may not carry credentials (``user:pass@``), because ``summary`` and the
  logs print URLs. Send credentials as headers instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

ENV_PREFIX = "streamproxy_"
_MiB = 1024 * 1024


def _describe(value: object) -> str:
    """Name a rejected value for a message: ``'15x'``, ``true``, ``null``, ``a list``."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, str | int | float):
        return repr(value)
    return "a mapping" if isinstance(value, Mapping) else f"a {type(value).__name__}"


def _number(value: object) -> float | None:
    """``value`` as a float if it is an int or float (a bool is neither), else None."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


_DURATION = re.compile(r"(-?\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Seconds from a number (``5``, ``2.5``) or a string: ``"15"``, ``"500ms"``, ``"2m"``.

    Units are ms, s, m and h; compound forms (``1m30s``) are not accepted. Raises ValueError
    for anything else, including negative, infinite or NaN values.
    """
    number = _number(value)
    if number is None and isinstance(value, str):
        match = _DURATION.fullmatch(value.strip().lower())
        if match:
            number = float(match[1]) * _DURATION_UNITS[match[2]]
    if number is None or not math.isfinite(number):
        raise ValueError(
            f"invalid duration {_describe(value)}: "
            "use seconds (15, 2.5) or a number with ms, s, m or h (500ms, 15s, 2m)"
        )
    if number < 0:
        raise ValueError(f"invalid duration {_describe(value)}: must not be negative")
    return number


_SIZE = re.compile(r"(-?\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)")
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9}
_SIZE_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(value: object) -> int:
    """Bytes from an integer or a string: ``"512KiB"``, ``"32MiB"``, ``"10MB"``, ``"1kB"``.

    Binary units (KiB, MiB, GiB) are powers of 1024, decimal ones (kB, MB, GB) of 1000, and
    units are case-insensitive. Fractions are rounded down (``1.5KiB`` is 1536). Raises
    ValueError for anything else, including negative values.
    """
    size: int | None = None
    number = _number(value)
    if number is not None and number.is_integer():
        size = int(number)
    elif isinstance(value, str):
        match = _SIZE.fullmatch(value.strip().lower())
        if match and match[2] in _SIZE_UNITS:
            size = int(Decimal(match[1]) * _SIZE_UNITS[match[2]])
    if size is None:
        raise ValueError(
            f"invalid size {_describe(value)}: use bytes (1048576) or a number with "
            "B, kB, MB, GB, KiB, MiB or GiB (512KiB, 32MiB)"
        )
    if size < 0:
        raise ValueError(f"invalid size {_describe(value)}: must not be negative")
    return size


@dataclass(frozen=True, slots=True)
class ListenConfig:
    """Where the proxy accepts client requests, and how many worker processes serve them."""

    host: str = "0.0.0.0"
    port: int = 8080
    workers: int = 1


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """Where /metrics, /healthz and /readyz are served."""

    host: str = "0.0.0.0"
    port: int = 9090


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """One upstream API. The longest matching ``path_prefix`` wins. Timeouts are in seconds."""

    name: str
    url: str
    path_prefix: str = "/"
    strip_prefix: bool = False
    connect_timeout: float = 10.0
    read_timeout: float = 300.0
    api_key_env: str | None = None  # inject the key held by this environment variable
    api_key_header: str = "authorization"  # ...as this header ("Bearer <key>" for authorization)


@dataclass(frozen=True, slots=True)
class KeepaliveConfig:
    """SSE comments sent after ``interval`` seconds of downstream silence (0 = off)."""

    interval: float = 15.0
    comment: str = "keepalive"
    before_headers: bool = False


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """Log level (debug|info|warning|error|critical) and format (json|console)."""

    level: str = "info"
    format: str = "json"


@dataclass(frozen=True, slots=True)
class ShutdownConfig:
    """Seconds that in-flight requests get to finish after SIGTERM."""

    drain_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Request limits. Bodies past ``max_request_body`` bytes get 413.

    32 MiB by default: Anthropic's Messages API rejects requests over 32 MB. nginx's
    default ``client_max_body_size`` of 1 MiB is too small for base64 images.
    """

    max_request_body: int = 32 * _MiB


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Histogram buckets (seconds), and how many distinct ``model`` labels precede ``other``."""

    max_models: int = 100
    ttft_buckets: tuple[float, ...] = (
        0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300,
    )  # fmt: skip
    itl_buckets: tuple[float, ...] = (
        0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
        1, 2, 5, 10,
    )  # fmt: skip
    duration_buckets: tuple[float, ...] = (
        0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800,
    )  # fmt: skip


DEFAULT_UPSTREAM = UpstreamConfig(name="openai", url="https://api.openai.com")


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration. ``Config()`` is the built-in default."""

    listen: ListenConfig = field(default_factory=ListenConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    upstreams: tuple[UpstreamConfig, ...] = (DEFAULT_UPSTREAM,)
    keepalive: KeepaliveConfig = field(default_factory=KeepaliveConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with the configuration, at a key path such as ``upstreams[0].url``."""

    key_path: str
    message: str

    def __str__(self) -> str:
        return f"{self.key_path}: {self.message}"


class ConfigError(Exception):
    """Every problem found while loading. ``str()`` prints one problem per line."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(problem) for problem in problems))
        self.problems = problems


# Field parsers: take a raw YAML value and return the typed value, or raise ValueError.
Parser = Callable[[object], Any]


def _text(value: object) -> str:
    """A non-empty string."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a non-empty string, got {_describe(value)}")
    return value


def _int_in(low: int, high: int | None = None) -> Parser:
    """A parser for integers in ``low..high`` (None: unbounded). A bool is not an int."""
    bounds = f"{low}..{high}" if high is not None else f">= {low}"

    def parse(value: object) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"must be an integer {bounds}, got {_describe(value)}")
        if value < low or (high is not None and value > high):
            raise ValueError(f"must be {bounds}, got {value}")
        return value

    return parse


def _bool(value: object) -> bool:
    """true or false."""
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {_describe(value)}")
    return value


def _duration(*, zero_ok: bool) -> Parser:
    """A parser for durations that are positive, or non-negative when ``zero_ok``."""

    def parse(value: object) -> float:
        seconds = parse_duration(value)
        if seconds == 0 and not zero_ok:
            raise ValueError("must be greater than 0")
        return seconds

    return parse


def _positive_size(value: object) -> int:
    """A size greater than 0."""
    size = parse_size(value)
    if size == 0:
        raise ValueError("must be greater than 0")
    return size


def _choice(*allowed: str) -> Parser:
    """A parser for one of ``allowed``, case-insensitive, returned lower-cased."""

    def parse(value: object) -> str:
        if not isinstance(value, str) or value.lower() not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {_describe(value)}")
        return value.lower()

    return parse


def _comment(value: object) -> str:
    """Text for an SSE comment line: one line of printable characters."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {_describe(value)}")
    if "\r" in value or "\n" in value or not value.isprintable():
        raise ValueError("must be a single line of printable characters")
    return value


def _buckets(value: object) -> tuple[float, ...]:
    """A non-empty list of strictly increasing, positive, finite numbers."""
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"must be a non-empty list of numbers, got {_describe(value)}")
    numbers: list[float] = []
    for item in value:
        number = _number(item)
        if number is None or not math.isfinite(number) or number <= 0:
            raise ValueError(f"every bucket must be a positive number, got {_describe(item)}")
        if numbers and number <= numbers[-1]:
            raise ValueError(
                f"buckets must be strictly increasing: {number:g} after {numbers[-1]:g}"
            )
        numbers.append(number)
    return tuple(numbers)


_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _name(value: object) -> str:
    """An upstream name. It becomes a Prometheus label value, so keep it plain."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"must be letters, digits, '_', '.' or '-', got {_describe(value)}")
    return value


def _url(value: object) -> str:
    """An absolute http(s) URL with a host, without credentials, query or fragment.

    The URL may have a base path (``https://host/openai``). A trailing slash is removed.
    """
    if not isinstance(value, str):
        raise ValueError(f"must be an http(s) URL, got {_describe(value)}")
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises ValueError for a port that is not a number or out of range
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({exc}): {value!r}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an absolute http(s) URL with a host: {value!r}")
    if "?" in value or "#" in value or any(c.isspace() for c in value):
        raise ValueError(f"must not contain a query, a fragment or whitespace: {value!r}")
    if "@" in parts.netloc:
        raise ValueError("must not contain credentials; send them as headers")
    return value.rstrip("/")


def _path_prefix(value: object) -> str:
    """A path starting with "/", with any trailing slash removed (except for "/" itself)."""
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"must start with '/', got {_describe(value)}")
    if "?" in value or "#" in value or any(c.isspace() for c in value):
        raise ValueError(f"must be a plain path, got {value!r}")
    return value.rstrip("/") or "/"


# Where each API takes its key: OpenAI (Bearer), Anthropic, Azure OpenAI, Gemini.
API_KEY_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _env_name(value: object) -> str:
    """The name of an environment variable."""
    if not isinstance(value, str) or not _ENV_NAME.fullmatch(value):
        raise ValueError(f"must be an environment variable name, got {_describe(value)}")
    return value


_SECTIONS: dict[str, tuple[Callable[..., Any], dict[str, Parser]]] = {
    "listen": (ListenConfig, {"host": _text, "port": _int_in(0, 65535), "workers": _int_in(1)}),
    "admin": (AdminConfig, {"host": _text, "port": _int_in(0, 65535)}),
    "keepalive": (
        KeepaliveConfig,
        {"interval": _duration(zero_ok=True), "comment": _comment, "before_headers": _bool},
    ),
    "logging": (
        LoggingConfig,
        {
            "level": _choice("debug", "info", "warning", "error", "critical"),
            "format": _choice("json", "console"),
        },
    ),
    "shutdown": (ShutdownConfig, {"drain_timeout": _duration(zero_ok=True)}),
    "limits": (LimitsConfig, {"max_request_body": _positive_size}),
    "metrics": (
        MetricsConfig,
        {
            "max_models": _int_in(1),
            "ttft_buckets": _buckets,
            "itl_buckets": _buckets,
            "duration_buckets": _buckets,
        },
    ),
}
_UPSTREAM_FIELDS: dict[str, Parser] = {
    "name": _name,
    "url": _url,
    "path_prefix": _path_prefix,
    "strip_prefix": _bool,
    "connect_timeout": _duration(zero_ok=False),
    "read_timeout": _duration(zero_ok=False),
    "api_key_env": _env_name,
    "api_key_header": _choice(*API_KEY_HEADERS),
}
_TOP_LEVEL = [*_SECTIONS, "upstreams"]


def _unknown(kind: str, key: object, known: list[str]) -> str:
    """The message for an unknown key, with a suggestion when one is close."""
    close = difflib.get_close_matches(str(key).lower(), known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {kind}{hint}; known: {', '.join(known)}"


def _fields(
    raw: Mapping[Any, Any], path: str, parsers: dict[str, Parser], problems: list[Problem]
) -> dict[str, Any]:
    """Parse every key of one mapping with its parser. Problems are collected."""
    values: dict[str, Any] = {}
    for key, value in raw.items():
        key_path = f"{path}.{key}"
        parser = parsers.get(key) if isinstance(key, str) else None
        if parser is None:
            problems.append(Problem(key_path, _unknown("key", key, list(parsers))))
        elif value is None:
            problems.append(Problem(key_path, "has no value (remove the key for the default)"))
        else:
            try:
                values[key] = parser(value)
            except ValueError as exc:
                problems.append(Problem(key_path, str(exc)))
    return values


def _mapping(raw: object, path: str, problems: list[Problem]) -> Mapping[Any, Any]:
    """``raw`` as a mapping. Null is an empty mapping. Anything else is a problem."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        problems.append(Problem(path, f"must be a mapping, got {_describe(raw)}"))
        return {}
    return raw


def _upstreams(raw: object, problems: list[Problem]) -> tuple[UpstreamConfig, ...]:
    """Validate the upstream list: required fields, then unique names and prefixes."""
    if raw is None:
        return (DEFAULT_UPSTREAM,)
    if not isinstance(raw, list):
        problems.append(Problem("upstreams", f"must be a list, got {_describe(raw)}"))
        return ()
    if not raw:
        problems.append(Problem("upstreams", "at least one upstream is required"))
    result: list[UpstreamConfig] = []
    seen: dict[tuple[str, object], int] = {}
    for index, item in enumerate(raw):
        path = f"upstreams[{index}]"
        if not isinstance(item, Mapping):
            message = f"must be a mapping with at least name and url, got {_describe(item)}"
            problems.append(Problem(path, message))
            continue
        values = _fields(item, path, _UPSTREAM_FIELDS, problems)
        for key in ("name", "url"):
            if key not in item:
                problems.append(Problem(f"{path}.{key}", "is required"))
        prefix = values.get("path_prefix", "/" if "path_prefix" not in item else None)
        for key, value in (("name", values.get("name")), ("path_prefix", prefix)):
            if value is not None and (key, value) in seen:
                other = f"upstreams[{seen[key, value]}]"
                problems.append(Problem(f"{path}.{key}", f"{value!r} is also used by {other}"))
            seen.setdefault((key, value), index)
        if "name" in values and "url" in values:
            result.append(UpstreamConfig(**values))
    return tuple(result)


_WILDCARD_HOSTS = {"0.0.0.0", "::"}


def _port_clash(listen: ListenConfig, admin: AdminConfig) -> Problem | None:
    """A problem if the proxy and the admin server would bind the same address."""
    same_host = listen.host == admin.host or bool({listen.host, admin.host} & _WILDCARD_HOSTS)
    if listen.port == admin.port != 0 and same_host:
        return Problem("admin.port", f"{admin.port} is also listen.port")
    return None


def _validate(raw: Mapping[Any, Any], problems: list[Problem]) -> Config:
    """Build a ``Config`` from the merged raw mapping, collecting every problem."""
    sections: dict[str, Any] = {}
    for key in raw:
        if key not in _TOP_LEVEL:
            problems.append(Problem(str(key), _unknown("section", key, _TOP_LEVEL)))
    for name, (cls, parsers) in _SECTIONS.items():
        mapping = _mapping(raw.get(name), name, problems)
        sections[name] = cls(**_fields(mapping, name, parsers, problems))
    ports_ok = not any(p.key_path in ("listen.port", "admin.port") for p in problems)
    config = Config(upstreams=_upstreams(raw.get("upstreams"), problems), **sections)
    clash = _port_clash(config.listen, config.admin)
    if clash and ports_ok:
        problems.append(clash)
    return config


_NULLS = ("~", "null", "Null", "NULL")


def _env_value(text: str) -> object:
    """An environment value read as a YAML scalar or flow list (``10``, ``true``, ``[0.1, 1]``).

    The text stays a string if YAML cannot parse it, or reads it as a mapping or as nothing
    although no key takes either: ``::`` is a host and ``#x`` a keepalive comment. So does "".
    """
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, dict) or (value is None and text.strip() not in _NULLS):
        return text
    return value


_Target = tuple[dict[Any, Any], str, str] | str  # (mapping, key, key path), or a problem


def _env_upstream(raw: dict[Any, Any], parts: list[str]) -> _Target:
    """Where ``upstreams__<i>__<key>`` writes. Index ``len(upstreams)`` appends an entry."""
    if len(parts) != 3 or not parts[1].isdigit():
        return "use STREAMPROXY_UPSTREAMS__<index>__<key>"
    index, key = int(parts[1]), parts[2]
    if key not in _UPSTREAM_FIELDS:
        return _unknown(f"key upstreams.{key}", key, list(_UPSTREAM_FIELDS))
    if raw.get("upstreams") is None:
        raw["upstreams"] = [{"name": DEFAULT_UPSTREAM.name, "url": DEFAULT_UPSTREAM.url}]
    entries = raw["upstreams"]
    if not isinstance(entries, list):
        return "cannot apply: upstreams in the file is not a list"
    if index > len(entries):
        return f"index {index} is past the end of upstreams (next index: {len(entries)})"
    if index == len(entries):
        entries.append({})
    if entries[index] is None:
        entries[index] = {}
    if not isinstance(entries[index], dict):
        return f"cannot apply: upstreams[{index}] in the file is not a mapping"
    return entries[index], key, f"upstreams[{index}].{key}"


def _env_section(raw: dict[Any, Any], parts: list[str]) -> _Target:
    """Where ``<section>__<key>`` writes."""
    section, key = parts[0], "__".join(parts[1:])
    if section not in _SECTIONS:
        return _unknown(f"section {section}", section, _TOP_LEVEL)
    if key not in _SECTIONS[section][1]:
        return _unknown(f"key {section}.{key}", key, list(_SECTIONS[section][1]))
    if raw.get(section) is None:
        raw[section] = {}
    if not isinstance(raw[section], dict):
        return f"cannot apply: section {section} in the file is not a mapping"
    return raw[section], key, f"{section}.{key}"


def _overlay(
    raw: dict[Any, Any], env: Mapping[str, str], problems: list[Problem]
) -> dict[str, str]:
    """Apply the environment overlay to ``raw`` in place. Returns {key path: variable name}."""
    overlays = []
    for name, text in env.items():
        lowered = name.lower()
        if lowered.startswith(ENV_PREFIX) and "__" in lowered[len(ENV_PREFIX) :]:
            parts = lowered[len(ENV_PREFIX) :].split("__")
            order = [int(p) if p.isdigit() else -1 for p in parts]  # index 10 after index 2
            overlays.append((parts, order, name, text))
    sources: dict[str, str] = {}
    for parts, _, name, text in sorted(overlays, key=lambda o: (o[0][0], o[1], o[2])):
        target = (_env_upstream if parts[0] == "upstreams" else _env_section)(raw, parts)
        if isinstance(target, str):
            problems.append(Problem(name, target))
            continue
        mapping, key, key_path = target
        mapping[key] = _env_value(text)
        sources[key_path] = name
    return sources


def _read(path: Path) -> dict[Any, Any]:
    """The YAML file as a mapping. Raises ConfigError(key path: the file) if it cannot be used."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([Problem(str(path), f"cannot read: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem(str(path), f"not UTF-8 text: {exc}")]) from None
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError([Problem(str(path), f"invalid YAML: {detail}")]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        message = f"the top level must be a mapping of sections, got {_describe(data)}"
        raise ConfigError([Problem(str(path), message)])
    return data


def find_config_path(cli_path: str | None, env: Mapping[str, str], cwd: Path) -> Path | None:
    """The file to load: ``--config``, else ``$STREAMPROXY_CONFIG``, else ``./config.yaml``.

    None means the built-in defaults (no option, no variable, no ``./config.yaml``). Empty
    values count as unset. Relative paths are resolved against ``cwd``. A named file is
    returned even if it is missing; ``load_config`` then reports it.
    """
    for candidate in (cli_path, env.get("STREAMPROXY_CONFIG")):
        if candidate:
            return cwd / candidate
    default = cwd / "config.yaml"
    return default if default.is_file() else None


def load_config(path: Path | None, env: Mapping[str, str]) -> Config:
    """Read ``path`` (None: no file), overlay ``env``, and validate everything.

    Raises one ConfigError that lists every problem found.
    """
    raw = _read(path) if path is not None else {}
    problems: list[Problem] = []
    sources = _overlay(raw, env, problems)
    config = _validate(raw, problems)
    for index, upstream in enumerate(config.upstreams):
        if upstream.api_key_env and not env.get(upstream.api_key_env):
            message = f"environment variable {upstream.api_key_env} is not set"
            problems.append(Problem(f"upstreams[{index}].api_key_env", message))
    if problems:
        raise ConfigError(
            [
                Problem(p.key_path, f"{p.message} (from {sources[p.key_path]})")
                if p.key_path in sources
                else p
                for p in problems
            ]
        )
    return config


def with_upstream(config: Config, url: str) -> Config:
    """``--upstream URL``: the upstreams replaced by one catch-all named ``default``.

    It gets the default timeouts. An invalid URL raises ConfigError with key path ``--upstream``.
    """
    try:
        clean = _url(url)
    except ValueError as exc:
        raise ConfigError([Problem("--upstream", str(exc))]) from None
    return dataclasses.replace(config, upstreams=(UpstreamConfig(name="default", url=clean),))


def _address(host: str, port: int) -> str:
    """``host:port``, with IPv6 hosts in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def summary(config: Config) -> str:
    """One line for ``check-config``: the upstreams and both listen addresses."""
    count = len(config.upstreams)
    routes = ", ".join(f"{u.name} -> {u.url} at {u.path_prefix}" for u in config.upstreams)
    return (
        f"ok: {count} upstream{'s' if count != 1 else ''} ({routes}), "
        f"listen {_address(config.listen.host, config.listen.port)}, "
        f"admin {_address(config.admin.host, config.admin.port)}"
    )
