"""Tests for streamproxy.config: parsing, validation, the environment overlay and lookup."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import yaml
from hypothesis import given, strategies as st

from streamproxy.config import (
    DEFAULT_UPSTREAM,
    AdminConfig,
    Config,
    ConfigError,
    KeepaliveConfig,
    LimitsConfig,
    ListenConfig,
    LoggingConfig,
    MetricsConfig,
    Problem,
    ShutdownConfig,
    UpstreamConfig,
    find_config_path,
    load_config,
    parse_duration,
    parse_size,
    summary,
    with_upstream,
)

ROOT_CONFIG = Path(__file__).resolve().parent.parent / "config.yaml"
MiB = 1024 * 1024

Loader = Callable[..., Config]
ProblemLister = Callable[..., list[Problem]]


@pytest.fixture
def load(tmp_path: Path) -> Loader:
    """Write YAML text to a file in tmp_path and load it with an optional environment."""

    def load(text: str, env: Mapping[str, str] | None = None) -> Config:
        path = tmp_path / "config.yaml"
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return load_config(path, env or {})

    return load


@pytest.fixture
def problems(load: Loader) -> ProblemLister:
    """Load YAML text that must fail, and return its problems."""

    def problems(text: str, env: Mapping[str, str] | None = None) -> list[Problem]:
        with pytest.raises(ConfigError) as info:
            load(text, env)
        return info.value.problems

    return problems


def only(found: list[Problem]) -> Problem:
    """The single problem in ``found``."""
    assert len(found) == 1, found
    return found[0]


# --- parse_duration and parse_size -------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (5, 5.0),
        (2.5, 2.5),
        (0, 0.0),
        ("15", 15.0),
        ("1.5", 1.5),
        ("500ms", 0.5),
        ("15s", 15.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        (".5s", 0.5),
        (" 15s ", 15.0),
        ("15 s", 15.0),
        ("0s", 0.0),
    ],
)
def test_parse_duration_accepts_numbers_and_units(value: object, seconds: float) -> None:
    """Durations are seconds as a number, or a number with ms, s, m or h."""
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        "15x",
        "1m30s",
        "",
        "s",
        "ms5",
        "fast",
        "inf",
        "nan",
        True,
        None,
        [1],
        float("inf"),
        float("nan"),
    ],
)
def test_parse_duration_rejects_other_forms(value: object) -> None:
    """Anything but a number or number+unit is a ValueError naming the value and the forms."""
    with pytest.raises(ValueError, match=r"invalid duration .*500ms"):
        parse_duration(value)


@pytest.mark.parametrize("value", [-1, -0.5, "-5s", "-1"])
def test_parse_duration_rejects_negative(value: object) -> None:
    """Negative durations are rejected with a message saying so."""
    with pytest.raises(ValueError, match="must not be negative"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (1048576, MiB),
        (0, 0),
        (1e6, 1_000_000),
        ("100", 100),
        ("100B", 100),
        ("1kB", 1000),
        ("10MB", 10_000_000),
        ("2GB", 2_000_000_000),
        ("512KiB", 512 * 1024),
        ("32MiB", 32 * MiB),
        ("1GiB", 1024 * MiB),
        ("1.5KiB", 1536),
        ("1 mib", MiB),
    ],
)
def test_parse_size_accepts_bytes_and_units(value: object, size: int) -> None:
    """Sizes are bytes, or a number with a decimal (kB, MB, GB) or binary (KiB, MiB, GiB) unit."""
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["32XB", "MiB", "", "1.5.5MiB", "1k", True, 1.5, None, [1]])
def test_parse_size_rejects_other_forms(value: object) -> None:
    """Anything but bytes or number+unit is a ValueError listing the accepted units."""
    with pytest.raises(ValueError, match=r"invalid size .*MiB"):
        parse_size(value)


@pytest.mark.parametrize("value", [-1, "-1KiB"])
def test_parse_size_rejects_negative(value: object) -> None:
    """Negative sizes are rejected with a message saying so."""
    with pytest.raises(ValueError, match="must not be negative"):
        parse_size(value)


# --- defaults and the shipped config.yaml -----------------------------------------------


def test_builtin_defaults_match_the_contract() -> None:
    """No file and no environment give the contract's defaults."""
    config = load_config(None, {})
    assert config == Config()
    assert config.listen == ListenConfig(host="0.0.0.0", port=8080, workers=1)
    assert config.admin == AdminConfig(host="0.0.0.0", port=9090)
    assert config.upstreams == (
        UpstreamConfig("openai", "https://api.openai.com", "/", False, 10.0, 300.0),
    )
    assert config.keepalive == KeepaliveConfig(15.0, "keepalive", before_headers=False)
    assert config.logging == LoggingConfig("info", "json")
    assert config.shutdown == ShutdownConfig(30.0)
    assert config.limits == LimitsConfig(32 * MiB)
    assert config.metrics.max_models == 100
    assert (config.metrics.ttft_buckets[0], config.metrics.ttft_buckets[-1]) == (0.05, 300)
    assert (config.metrics.itl_buckets[0], config.metrics.itl_buckets[-1]) == (0.001, 10)
    assert (config.metrics.duration_buckets[0], config.metrics.duration_buckets[-1]) == (0.1, 1800)


def test_default_buckets_pass_their_own_validation(load: Loader) -> None:
    """The built-in bucket tuples are valid when written into a file."""
    metrics = MetricsConfig()
    buckets = {k: list(v) for k, v in dataclasses.asdict(metrics).items() if isinstance(v, tuple)}
    assert load(yaml.safe_dump({"metrics": buckets})).metrics == metrics


def test_root_config_yaml_equals_builtin_defaults() -> None:
    """The documented config.yaml at the repo root loads to exactly the built-in defaults."""
    assert load_config(ROOT_CONFIG, {}) == Config()


def test_root_config_yaml_has_every_key() -> None:
    """The documented config.yaml names every section and every key, and nothing else."""
    data = yaml.safe_load(ROOT_CONFIG.read_text(encoding="utf-8"))
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    assert set(data) == set(sections)
    for section in ("listen", "admin", "keepalive", "logging", "shutdown", "limits", "metrics"):
        cls = type(getattr(Config(), section))
        assert set(data[section]) == {f.name for f in dataclasses.fields(cls)}, section
    optional = {"api_key_env"}  # no default value: documented in a comment
    upstream_keys = {f.name for f in dataclasses.fields(UpstreamConfig)}
    assert set(data["upstreams"][0]) == upstream_keys - optional
    assert all(f"# {key}:" in ROOT_CONFIG.read_text(encoding="utf-8") for key in optional)


def test_root_config_yaml_comments_every_line() -> None:
    """Every setting line of the documented config.yaml carries a comment."""
    for line in ROOT_CONFIG.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert " # " in line, f"no comment: {line!r}"


def test_root_config_yaml_examples_are_valid(tmp_path: Path) -> None:
    """The commented-out upstream examples load once uncommented."""
    example = re.compile(r"^  # ((?:- |  )[a-z_]+: .*)$")
    lines = [example.sub(r"  \1", line) for line in ROOT_CONFIG.read_text().splitlines()]
    path = tmp_path / "examples.yaml"
    path.write_text("\n".join(lines), encoding="utf-8")
    config = load_config(path, {})
    assert [(u.name, u.path_prefix, u.strip_prefix) for u in config.upstreams] == [
        ("openai", "/", False),
        ("anthropic", "/anthropic", True),
        ("gemini", "/gemini", True),
        ("ollama", "/ollama", True),
        ("vllm", "/vllm", True),
    ]


@pytest.mark.parametrize("text", ["", "# only a comment\n", "listen:\nupstreams:\nmetrics: ~\n"])
def test_empty_file_and_null_sections_mean_defaults(load: Loader, text: str) -> None:
    """An empty file, and sections set to null, give the built-in defaults."""
    assert load(text) == Config()


def test_full_file_is_parsed_and_normalised(load: Loader) -> None:
    """Durations, sizes, URLs, prefixes and levels are parsed and normalised."""
    config = load(
        """
        listen: {host: 127.0.0.1, port: 0, workers: 4}
        admin: {host: 127.0.0.1, port: 0}
        upstreams:
          - name: openai
            url: https://api.openai.com/
          - name: anthropic
            url: https://gateway.example/anthropic/
            path_prefix: /anthropic/
            strip_prefix: true
            connect_timeout: 500ms
            read_timeout: 2m
        keepalive: {interval: 0, comment: "ping", before_headers: true}
        logging: {level: DEBUG, format: console}
        shutdown: {drain_timeout: 0}
        limits: {max_request_body: 512KiB}
        metrics: {max_models: 1, ttft_buckets: [1], itl_buckets: [0.5, 2], duration_buckets: [3]}
        """
    )
    assert config.listen == ListenConfig("127.0.0.1", 0, 4)
    assert config.upstreams == (
        UpstreamConfig("openai", "https://api.openai.com"),
        UpstreamConfig(
            "anthropic", "https://gateway.example/anthropic", "/anthropic", True, 0.5, 120
        ),
    )
    assert config.keepalive == KeepaliveConfig(0.0, "ping", before_headers=True)
    assert config.logging == LoggingConfig("debug", "console")
    assert config.shutdown.drain_timeout == 0
    assert config.limits.max_request_body == 512 * 1024
    assert config.metrics == MetricsConfig(1, (1.0,), (0.5, 2.0), (3.0,))


# --- reading the file ---------------------------------------------------------------------


def test_missing_file_is_a_problem_naming_the_file(tmp_path: Path) -> None:
    """A file that does not exist is reported with its path as the key path."""
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    problem = only(info.value.problems)
    assert problem.key_path == str(path)
    assert "cannot read" in problem.message


def test_directory_is_a_problem_naming_the_file(tmp_path: Path) -> None:
    """A path that is a directory is reported, not raised as OSError."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path, {})


def test_invalid_yaml_is_a_problem_with_its_position(problems: ProblemLister) -> None:
    """A YAML syntax error is one problem naming the file and the line."""
    problem = only(problems("listen: {port: 8080\nadmin: [\n"))
    assert problem.key_path.endswith("config.yaml")
    assert "invalid YAML" in problem.message
    assert "line" in problem.message
    assert "\n" not in problem.message


def test_non_utf8_file_is_a_problem(tmp_path: Path) -> None:
    """A file that is not UTF-8 text is reported, not raised as UnicodeDecodeError."""
    path = tmp_path / "config.yaml"
    path.write_bytes(b"listen: {host: \xff}\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path, {})


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "a list"), ("8080\n", "8080")])
def test_top_level_must_be_a_mapping(problems: ProblemLister, text: str, kind: str) -> None:
    """A file whose top level is not a mapping is one problem naming the file."""
    problem = only(problems(text))
    assert problem.key_path.endswith("config.yaml")
    assert "mapping" in problem.message
    assert kind in problem.message


# --- validation rules ---------------------------------------------------------------------

UPSTREAM = "upstreams: [{name: a, url: 'http://a'}]\n"


@pytest.mark.parametrize(
    ("text", "key_path", "fragment"),
    [
        # unknown keys, with suggestions
        ("listn: {port: 1}", "listn", "did you mean 'listen'"),
        ("listen: {prot: 1}", "listen.prot", "did you mean 'port'"),
        ("keepalive: {xyzzy: 1}", "keepalive.xyzzy", "unknown key; known: interval"),
        ("upstreams: [{name: a, url: 'http://a', urll: x}]", "upstreams[0].urll", "'url'"),
        ("listen: {1: 2}", "listen.1", "unknown key"),
        # section shapes
        ("listen: 8080", "listen", "must be a mapping"),
        ("metrics: [1, 2]", "metrics", "must be a mapping"),
        ("upstreams: {name: a, url: 'http://a'}", "upstreams", "must be a list"),
        ("upstreams: []", "upstreams", "at least one upstream"),
        ("upstreams: [~]", "upstreams[0]", "must be a mapping"),
        ("upstreams: [openai]", "upstreams[0]", "must be a mapping"),
        ("listen: {port: }", "listen.port", "has no value"),
        # listen and admin
        ("listen: {host: ''}", "listen.host", "non-empty string"),
        ("listen: {host: 8}", "listen.host", "non-empty string"),
        ("listen: {port: true}", "listen.port", "integer 0..65535, got true"),
        ("listen: {port: '8080'}", "listen.port", "integer 0..65535"),
        ("listen: {port: 80.5}", "listen.port", "integer"),
        ("listen: {port: 65536}", "listen.port", "0..65535, got 65536"),
        ("listen: {port: -1}", "listen.port", "0..65535"),
        ("listen: {workers: 0}", "listen.workers", ">= 1"),
        ("admin: {port: 70000}", "admin.port", "0..65535"),
        ("admin: {port: 8080}", "admin.port", "also listen.port"),
        ("listen: {host: 127.0.0.1}\nadmin: {port: 8080}", "admin.port", "also listen.port"),
        # upstream fields
        ("upstreams: [{url: 'http://a'}]", "upstreams[0].name", "required"),
        ("upstreams: [{name: a}]", "upstreams[0].url", "required"),
        ("upstreams: [{name: '', url: 'http://a'}]", "upstreams[0].name", "letters, digits"),
        ("upstreams: [{name: my api, url: 'http://a'}]", "upstreams[0].name", "letters"),
        ("upstreams: [{name: a/b, url: 'http://a'}]", "upstreams[0].name", "letters"),
        ("upstreams: [{name: 7, url: 'http://a'}]", "upstreams[0].name", "letters"),
        ("upstreams: [{name: a, url: 'ftp://a'}]", "upstreams[0].url", "http(s)"),
        ("upstreams: [{name: a, url: api.openai.com}]", "upstreams[0].url", "http(s)"),
        ("upstreams: [{name: a, url: 'https://'}]", "upstreams[0].url", "with a host"),
        ("upstreams: [{name: a, url: 'https://a/?x=1'}]", "upstreams[0].url", "query"),
        ("upstreams: [{name: a, url: 'https://a/#x'}]", "upstreams[0].url", "fragment"),
        ("upstreams: [{name: a, url: 'https://a b'}]", "upstreams[0].url", "whitespace"),
        ("upstreams: [{name: a, url: 'https://u:p@a'}]", "upstreams[0].url", "credentials"),
        ("upstreams: [{name: a, url: 'https://a:99999'}]", "upstreams[0].url", "not a valid URL"),
        ("upstreams: [{name: a, url: 42}]", "upstreams[0].url", "got 42"),
        (
            "upstreams: [{name: a, url: 'http://a', path_prefix: v1}]",
            "upstreams[0].path_prefix",
            "start with '/'",
        ),
        (
            "upstreams: [{name: a, url: 'http://a', path_prefix: '/a?b'}]",
            "upstreams[0].path_prefix",
            "plain path",
        ),
        (
            "upstreams: [{name: a, url: 'http://a', strip_prefix: 'true'}]",
            "upstreams[0].strip_prefix",
            "true or false",
        ),
        (
            "upstreams: [{name: a, url: 'http://a', connect_timeout: 0}]",
            "upstreams[0].connect_timeout",
            "greater than 0",
        ),
        (
            "upstreams: [{name: a, url: 'http://a', read_timeout: 0s}]",
            "upstreams[0].read_timeout",
            "greater than 0",
        ),
        (
            "upstreams: [{name: a, url: 'http://a', read_timeout: soon}]",
            "upstreams[0].read_timeout",
            "invalid duration 'soon'",
        ),
        (
            "upstreams: [{name: a, url: 'http://a'}, {name: a, url: 'http://b', path_prefix: /b}]",
            "upstreams[1].name",
            "'a' is also used by upstreams[0]",
        ),
        (
            "upstreams: [{name: a, url: 'http://a'}, {name: b, url: 'http://b'}]",
            "upstreams[1].path_prefix",
            "'/' is also used by upstreams[0]",
        ),
        (
            "upstreams: [{name: a, url: 'http://a', path_prefix: /x},"
            " {name: b, url: 'http://b', path_prefix: /x/}]",
            "upstreams[1].path_prefix",
            "'/x' is also used",
        ),
        # keepalive, logging, shutdown, limits
        ("keepalive: {interval: -1}", "keepalive.interval", "must not be negative"),
        ("keepalive: {interval: 15x}", "keepalive.interval", "invalid duration"),
        ('keepalive: {comment: "a\\nb"}', "keepalive.comment", "single line"),
        ('keepalive: {comment: "a\\rb"}', "keepalive.comment", "single line"),
        ('keepalive: {comment: "a\\x00b"}', "keepalive.comment", "printable"),
        ("keepalive: {comment: 5}", "keepalive.comment", "must be a string"),
        ("keepalive: {before_headers: 1}", "keepalive.before_headers", "true or false"),
        ("logging: {level: verbose}", "logging.level", "debug, info, warning, error, critical"),
        ("logging: {format: xml}", "logging.format", "json, console"),
        ("shutdown: {drain_timeout: -1s}", "shutdown.drain_timeout", "negative"),
        ("limits: {max_request_body: 0}", "limits.max_request_body", "greater than 0"),
        ("limits: {max_request_body: lots}", "limits.max_request_body", "invalid size"),
        # metrics
        ("metrics: {max_models: 0}", "metrics.max_models", ">= 1"),
        ("metrics: {ttft_buckets: []}", "metrics.ttft_buckets", "non-empty list"),
        ("metrics: {ttft_buckets: '1, 2'}", "metrics.ttft_buckets", "non-empty list"),
        ("metrics: {itl_buckets: [1, 0.5]}", "metrics.itl_buckets", "strictly increasing"),
        ("metrics: {itl_buckets: [1, 1]}", "metrics.itl_buckets", "strictly increasing"),
        ("metrics: {duration_buckets: [0, 1]}", "metrics.duration_buckets", "positive"),
        ("metrics: {duration_buckets: [-1]}", "metrics.duration_buckets", "positive"),
        ("metrics: {duration_buckets: [true]}", "metrics.duration_buckets", "positive"),
        ("metrics: {duration_buckets: [1, .inf]}", "metrics.duration_buckets", "positive"),
        ("metrics: {duration_buckets: [1, x]}", "metrics.duration_buckets", "got 'x'"),
    ],
)
def test_each_rule_reports_its_key_path(
    problems: ProblemLister, text: str, key_path: str, fragment: str
) -> None:
    """Each validation rule yields exactly one problem at the right key path."""
    if not text.startswith("upstreams"):
        text = UPSTREAM + text
    problem = only(problems(text))
    assert problem.key_path == key_path
    assert fragment in problem.message


@pytest.mark.parametrize(
    "text",
    [
        "listen: {port: 0}\nadmin: {port: 0}",
        "listen: {host: 127.0.0.1, port: 9000}\nadmin: {host: 127.0.0.2, port: 9000}",
        "keepalive: {interval: 0, comment: ''}",
        "upstreams: [{name: a.b-c_1, url: 'HTTP://a:8000/base/'}]",
        "upstreams: [{name: a, url: 'http://[::1]:8000'}]",
    ],
)
def test_edge_values_are_accepted(load: Loader, text: str) -> None:
    """Ephemeral ports, distinct hosts, keepalive off and unusual-but-valid names load."""
    load(text)


def test_several_problems_are_reported_together(problems: ProblemLister) -> None:
    """Every problem in a file is collected into one ConfigError, one per line."""
    text = """
        listen: {port: 99999, wokers: 2}
        upstreams:
          - {name: openai, url: 'ftp://x'}
          - {url: 'http://b', path_prefix: b}
        keepalive: {interval: soon}
        surprise: 1
        """
    found = problems(text)
    assert [p.key_path for p in found] == [
        "surprise",
        "listen.port",
        "listen.wokers",
        "keepalive.interval",
        "upstreams[0].url",
        "upstreams[1].path_prefix",
        "upstreams[1].name",
    ]
    with pytest.raises(ConfigError) as info:
        load_config(None, {"STREAMPROXY_LISTEN__PORT": "x", "STREAMPROXY_ADMIN__PORT": "y"})
    assert str(info.value).splitlines() == [str(p) for p in info.value.problems]
    assert len(info.value.problems) == 2


def test_problems_do_not_cascade(problems: ProblemLister) -> None:
    """A missing name or a bad port is reported once, not again as a duplicate or a clash."""
    text = """
        listen: {port: 'x'}
        admin: {port: 8080}
        upstreams: [{url: 'http://a'}, {url: 'http://b', path_prefix: /b}]
        """
    assert [str(p) for p in problems(text)] == [
        "listen.port: must be an integer 0..65535, got 'x'",
        "upstreams[0].name: is required",
        "upstreams[1].name: is required",
    ]


def test_problem_str_is_key_path_then_message() -> None:
    """A Problem prints as 'key_path: message', the line check-config shows."""
    assert str(Problem("upstreams[0].url", "not an http(s) URL")) == (
        "upstreams[0].url: not an http(s) URL"
    )


# --- the environment overlay -------------------------------------------------------------


def test_env_sets_a_section_key() -> None:
    """STREAMPROXY_<SECTION>__<KEY> sets that key."""
    config = load_config(None, {"STREAMPROXY_KEEPALIVE__INTERVAL": "10"})
    assert config.keepalive.interval == 10.0


def test_env_names_are_case_insensitive() -> None:
    """Lower-case and mixed-case variable names work like upper-case ones."""
    env = {"streamproxy_listen__port": "1234", "StreamProxy_Admin__Port": "4321"}
    config = load_config(None, env)
    assert (config.listen.port, config.admin.port) == (1234, 4321)


def test_env_values_are_read_as_yaml() -> None:
    """Values become ints, bools, lists and strings as YAML reads them."""
    env = {
        "STREAMPROXY_LISTEN__PORT": "8081",
        "STREAMPROXY_KEEPALIVE__BEFORE_HEADERS": "true",
        "STREAMPROXY_KEEPALIVE__INTERVAL": "15s",
        "STREAMPROXY_METRICS__ITL_BUCKETS": "[0.1, 1]",
        "STREAMPROXY_LIMITS__MAX_REQUEST_BODY": "1MiB",
    }
    config = load_config(None, env)
    assert config.listen.port == 8081
    assert config.keepalive.before_headers is True
    assert config.keepalive.interval == 15.0
    assert config.metrics.itl_buckets == (0.1, 1.0)
    assert config.limits.max_request_body == MiB


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("STREAMPROXY_ADMIN__HOST", "::", "::"),
        ("STREAMPROXY_KEEPALIVE__COMMENT", "#ping", "#ping"),
        ("STREAMPROXY_KEEPALIVE__COMMENT", "a: b", "a: b"),
        ("STREAMPROXY_KEEPALIVE__COMMENT", "", ""),
        ("STREAMPROXY_KEEPALIVE__COMMENT", "@at", "@at"),
    ],
)
def test_env_values_yaml_cannot_use_stay_strings(name: str, text: str, expected: str) -> None:
    """Values YAML reads as a mapping, as nothing, or not at all stay plain strings."""
    config = load_config(None, {name: text})
    section, key = name.lower().removeprefix("streamproxy_").split("__")
    assert getattr(getattr(config, section), key) == expected


def test_env_null_literal_is_a_problem() -> None:
    """An explicit null from the environment is reported like a null key in the file."""
    with pytest.raises(
        ConfigError, match=r"listen\.port: has no value .*\(from STREAMPROXY_LISTEN__PORT\)"
    ):
        load_config(None, {"STREAMPROXY_LISTEN__PORT": "~"})


def test_env_wins_over_file(load: Loader) -> None:
    """A key set in both the file and the environment takes the environment's value."""
    config = load(
        "keepalive: {interval: 5s, comment: file}\n",
        {"STREAMPROXY_KEEPALIVE__INTERVAL": "10"},
    )
    assert config.keepalive == KeepaliveConfig(10.0, "file")


def test_env_overrides_an_upstream_by_index(load: Loader) -> None:
    """STREAMPROXY_UPSTREAMS__<i>__<KEY> sets a key of the file's i-th upstream."""
    config = load(
        "upstreams: [{name: a, url: 'http://a'}, {name: b, url: 'http://b', path_prefix: /b}]",
        {
            "STREAMPROXY_UPSTREAMS__1__URL": "http://b2/",
            "STREAMPROXY_UPSTREAMS__0__READ_TIMEOUT": "1m",
        },
    )
    assert config.upstreams == (
        UpstreamConfig("a", "http://a", read_timeout=60.0),
        UpstreamConfig("b", "http://b2", "/b"),
    )


def test_env_overrides_the_default_upstream() -> None:
    """Without upstreams in a file, index 0 is the built-in openai upstream."""
    config = load_config(None, {"STREAMPROXY_UPSTREAMS__0__URL": "http://127.0.0.1:8000"})
    assert config.upstreams == (UpstreamConfig("openai", "http://127.0.0.1:8000"),)


def test_env_appends_upstreams_in_index_order() -> None:
    """Index == length appends; indices apply in numeric order (2 before 10)."""
    env = {}
    for index in range(11, 0, -1):
        env[f"STREAMPROXY_UPSTREAMS__{index}__NAME"] = f"u{index}"
        env[f"STREAMPROXY_UPSTREAMS__{index}__URL"] = f"http://u{index}"
        env[f"STREAMPROXY_UPSTREAMS__{index}__PATH_PREFIX"] = f"/u{index}"
    config = load_config(None, env)
    assert [u.name for u in config.upstreams] == ["openai", *(f"u{i}" for i in range(1, 12))]


def test_env_appended_upstream_needs_name_and_url() -> None:
    """An appended upstream with only a url reports the missing name at its key path."""
    with pytest.raises(ConfigError) as info:
        load_config(None, {"STREAMPROXY_UPSTREAMS__1__URL": "http://b"})
    assert [p.key_path for p in info.value.problems] == [
        "upstreams[1].name",
        "upstreams[1].path_prefix",
    ]


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        (
            "STREAMPROXY_KEEPALIVE__INTERVL",
            "unknown key keepalive.intervl (did you mean 'interval'?)",
        ),
        ("STREAMPROXY_KEEPALIV__INTERVAL", "unknown section keepaliv (did you mean 'keepalive'?)"),
        ("STREAMPROXY_LISTEN__PORT__X", "unknown key listen.port__x"),
        ("STREAMPROXY_UPSTREAMS__0__URLL", "unknown key upstreams.urll (did you mean 'url'?)"),
        ("STREAMPROXY_UPSTREAMS__URL", "STREAMPROXY_UPSTREAMS__<index>__<key>"),
        ("STREAMPROXY_UPSTREAMS__X__URL", "STREAMPROXY_UPSTREAMS__<index>__<key>"),
        ("STREAMPROXY_UPSTREAMS__5__URL", "index 5 is past the end of upstreams (next index: 1)"),
    ],
)
def test_env_naming_problems_name_the_variable(name: str, fragment: str) -> None:
    """An overlay that names no known key is a problem whose key path is the variable."""
    with pytest.raises(ConfigError) as info:
        load_config(None, {name: "http://x"})
    problem = only(info.value.problems)
    assert problem.key_path == name
    assert fragment in problem.message


def test_env_value_problems_name_key_and_variable() -> None:
    """A bad value from the environment is reported at its key path, naming the variable."""
    with pytest.raises(ConfigError) as info:
        load_config(None, {"STREAMPROXY_UPSTREAMS__0__URL": "ftp://x"})
    problem = only(info.value.problems)
    assert problem.key_path == "upstreams[0].url"
    assert problem.message.endswith("(from STREAMPROXY_UPSTREAMS__0__URL)")


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("listen: 8080", "STREAMPROXY_LISTEN__PORT"),
        ("upstreams: x", "STREAMPROXY_UPSTREAMS__0__URL"),
        ("upstreams: [x]", "STREAMPROXY_UPSTREAMS__0__URL"),
    ],
)
def test_env_cannot_apply_over_a_malformed_file(
    problems: ProblemLister, text: str, name: str
) -> None:
    """An overlay into a section the file got wrong is a problem too, not a crash."""
    found = problems(text, {name: "1"})
    assert name in [p.key_path for p in found]
    assert any("cannot apply" in p.message for p in found)


def test_env_ignores_other_variables() -> None:
    """STREAMPROXY_CONFIG, prefixed names without '__' and unrelated variables are not overlays."""
    env = {"STREAMPROXY_CONFIG": "x.yaml", "STREAMPROXY_DEBUG": "1", "PATH": "/bin", "HOME": "/"}
    assert load_config(None, env) == Config()


OVERLAY_NAMES = [
    "STREAMPROXY_LISTEN__PORT",
    "STREAMPROXY_KEEPALIVE__INTERVAL",
    "STREAMPROXY_KEEPALIVE__COMMENT",
    "STREAMPROXY_METRICS__TTFT_BUCKETS",
    "STREAMPROXY_LIMITS__MAX_REQUEST_BODY",
    "STREAMPROXY_UPSTREAMS__0__URL",
    "STREAMPROXY_UPSTREAMS__1__PATH_PREFIX",
]


@given(st.dictionaries(st.sampled_from(OVERLAY_NAMES), st.text()))
def test_env_any_value_gives_config_or_config_error(env: dict[str, str]) -> None:
    """Whatever the environment holds, loading returns a Config or raises ConfigError only."""
    with contextlib.suppress(ConfigError):
        assert isinstance(load_config(None, env), Config)


@given(st.one_of(st.text(), st.integers(), st.floats(), st.booleans(), st.none()))
def test_parsers_raise_only_value_error(value: object) -> None:
    """parse_duration and parse_size return a value or raise ValueError, never anything else."""
    for parse in (parse_duration, parse_size):
        with contextlib.suppress(ValueError):
            parse(value)


# --- find_config_path ----------------------------------------------------------------------


def test_find_config_prefers_cli_then_env_then_cwd(tmp_path: Path) -> None:
    """--config wins over $STREAMPROXY_CONFIG, which wins over ./config.yaml."""
    (tmp_path / "config.yaml").write_text("")
    env = {"STREAMPROXY_CONFIG": "env.yaml"}
    assert find_config_path("cli.yaml", env, tmp_path) == tmp_path / "cli.yaml"
    assert find_config_path(None, env, tmp_path) == tmp_path / "env.yaml"
    assert find_config_path(None, {}, tmp_path) == tmp_path / "config.yaml"


def test_find_config_returns_none_without_any_source(tmp_path: Path) -> None:
    """No option, no variable and no ./config.yaml means built-in defaults (None)."""
    assert find_config_path(None, {}, tmp_path) is None
    (tmp_path / "config.yaml").mkdir()
    assert find_config_path(None, {}, tmp_path) is None


def test_find_config_treats_empty_values_as_unset(tmp_path: Path) -> None:
    """An empty --config or STREAMPROXY_CONFIG falls through to the next source."""
    assert find_config_path("", {"STREAMPROXY_CONFIG": ""}, tmp_path) is None


def test_find_config_keeps_absolute_and_missing_paths(tmp_path: Path) -> None:
    """Absolute paths are kept; a named file is returned even when missing, for load to report."""
    target = tmp_path / "elsewhere" / "missing.yaml"
    assert find_config_path(str(target), {}, Path("/somewhere")) == target
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read"):
        load_config(target, {})


# --- with_upstream and summary --------------------------------------------------------------


def test_with_upstream_replaces_upstreams_with_one_catch_all() -> None:
    """--upstream URL leaves one upstream 'default' at '/', and keeps every other section."""
    base = dataclasses.replace(Config(), keepalive=KeepaliveConfig(interval=3.0))
    base = dataclasses.replace(
        base, upstreams=(DEFAULT_UPSTREAM, UpstreamConfig("b", "http://b", "/b"))
    )
    config = with_upstream(base, "http://127.0.0.1:9000/")
    assert config.upstreams == (UpstreamConfig("default", "http://127.0.0.1:9000", "/"),)
    assert config.keepalive.interval == 3.0


@pytest.mark.parametrize("url", ["127.0.0.1:9000", "ftp://x", "http://x/?a=1", ""])
def test_with_upstream_rejects_invalid_urls(url: str) -> None:
    """An invalid --upstream URL is a ConfigError whose key path is '--upstream'."""
    with pytest.raises(ConfigError) as info:
        with_upstream(Config(), url)
    assert only(info.value.problems).key_path == "--upstream"


def test_summary_of_defaults() -> None:
    """check-config's line for the defaults names the upstream and both addresses."""
    assert summary(Config()) == (
        "ok: 1 upstream (openai -> https://api.openai.com at /), "
        "listen 0.0.0.0:8080, admin 0.0.0.0:9090"
    )


def test_summary_of_two_upstreams_and_ipv6(load: Loader) -> None:
    """The summary lists every upstream and brackets IPv6 hosts."""
    config = load(
        """
        admin: {host: '::1'}
        upstreams:
          - {name: openai, url: 'https://api.openai.com'}
          - {name: anthropic, url: 'https://api.anthropic.com', path_prefix: /anthropic}
        """
    )
    assert summary(config) == (
        "ok: 2 upstreams (openai -> https://api.openai.com at /, "
        "anthropic -> https://api.anthropic.com at /anthropic), "
        "listen 0.0.0.0:8080, admin [::1]:9090"
    )


def test_api_key_env_must_be_set(tmp_path: Path) -> None:
    """An upstream naming api_key_env needs that variable in the environment."""
    path = tmp_path / "c.yaml"
    path.write_text("upstreams:\n  - {name: a, url: 'https://x', api_key_env: MY_KEY}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path, {})
    assert [p.key_path for p in raised.value.problems] == ["upstreams[0].api_key_env"]
    assert load_config(path, {"MY_KEY": "k"}).upstreams[0].api_key_env == "MY_KEY"
