"""The `streamproxy` command: serve | check-config | mock-upstream | demo.

Exit codes: 0 success, 1 runtime failure (cannot listen), 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from streamproxy import __version__, logs
from streamproxy.config import (
    Config,
    ConfigError,
    Problem,
    find_config_path,
    load_config,
    summary,
    with_upstream,
)

EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamproxy", description="A streaming-safe reverse proxy for LLM APIs."
    )
    parser.add_argument("--version", action="version", version=f"streamproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="config file (else $STREAMPROXY_CONFIG, ./config.yaml)")
    serve.add_argument("--host", help="listen address (listen.host)")
    serve.add_argument("--port", type=int, help="listen port (listen.port)")
    serve.add_argument("--admin-port", type=int, help="admin port (admin.port)")
    serve.add_argument("--upstream", help="one catch-all upstream URL, replacing the config's")
    serve.add_argument("--workers", type=int, help="worker processes (listen.workers)")

    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("path")

    mock = commands.add_parser("mock-upstream", help="run the simulated LLM API")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=8081)

    demo = commands.add_parser("demo", help="the mock upstream and the proxy, wired together")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--admin-port", type=int, default=9090)
    demo.add_argument("--mock-port", type=int, default=8081)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(_dispatch(args))


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "check-config":
        return _check_config(Path(args.path))
    if args.command == "serve":
        return _serve(args)
    if args.command == "mock-upstream":
        return _mock_upstream(args.host, args.port)
    return _demo(args)


def _print_problems(error: ConfigError) -> int:
    for problem in error.problems:
        print(f"config error: {problem}", file=sys.stderr)
    return EXIT_CONFIG


def _check_config(path: Path) -> int:
    if not path.is_file():
        print(f"config error: {path}: no such file", file=sys.stderr)
        return EXIT_CONFIG
    try:
        config = load_config(path, os.environ)
    except ConfigError as error:
        return _print_problems(error)
    print(summary(config))
    return 0


def load_serve_config(args: argparse.Namespace) -> Config:
    """The config `serve` runs with: file (or defaults), environment, then flags."""
    path = find_config_path(args.config, os.environ, Path.cwd())
    if args.config and path is not None and not path.is_file():
        raise ConfigError([Problem("--config", f"{path}: no such file")])
    config = load_config(path, os.environ)
    if args.upstream:
        config = with_upstream(config, args.upstream)
    listen, admin = config.listen, config.admin
    if args.host is not None:
        listen = dataclasses.replace(listen, host=args.host)
    if args.port is not None:
        listen = dataclasses.replace(listen, port=args.port)
    if args.workers is not None:
        if args.workers < 1:
            raise ConfigError([Problem("--workers", "must be at least 1")])
        listen = dataclasses.replace(listen, workers=args.workers)
    if args.admin_port is not None:
        admin = dataclasses.replace(admin, port=args.admin_port)
    return dataclasses.replace(config, listen=listen, admin=admin)


def _serve(args: argparse.Namespace) -> int:
    try:
        config = load_serve_config(args)
    except ConfigError as error:
        return _print_problems(error)
    logs.configure(config.logging.level, config.logging.format)
    from streamproxy import server

    return server.run(config)


def _mock_upstream(host: str, port: int) -> int:
    from streamproxy import mock_upstream
    from streamproxy.server import run_event_loop

    print(f"mock upstream on http://{host}:{port}", file=sys.stderr)
    with contextlib.suppress(KeyboardInterrupt):
        run_event_loop(mock_upstream.serve(host, port))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from streamproxy import demo

    return demo.run(args.port, args.admin_port, args.mock_port)
