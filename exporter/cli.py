"""Command line: parse arguments, load the config, set up logs, serve; exit codes.

Exit codes: 0 after a clean shutdown or a valid `--check-config`; 2 for a bad command line
or an invalid configuration (the message names every bad key); 1 when the listener cannot
be opened.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
from aiohttp import web

from exporter import __version__
from exporter.admin import create_admin_app
from exporter.config import ConfigError, ServerConfig, json_schema, load_config
from exporter.logs import configure_logging
from exporter.reload import ConfigReloader
from exporter.server import create_app
from exporter.service import Exporter

log = structlog.get_logger("exporter.cli")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; `catalog-upload-exporter --help` shows it."""
    parser = argparse.ArgumentParser(
        prog="catalog-upload-exporter",
        description="Prometheus exporter for HAQM Catalog API upload status.",
        epilog=(
            "To register an ingestionId with a running exporter (from the app's side): "
            "catalog-upload-exporter register ID [--url URL] [--label NAME=VALUE] "
            "[--token-file PATH]; see `catalog-upload-exporter register --help`. "
            "`catalog-upload-exporter schema` prints the config file's JSON Schema."
        ),
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--config", type=Path, metavar="PATH", help="YAML configuration file")
    mode.add_argument(
        "--demo",
        action="store_true",
        help="run against the embedded simulator with demo uploads (no config, no credentials)",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate --config and exit 0, or print every problem and exit 2",
    )
    parser.add_argument(
        "--port", type=int, metavar="N", help="listen on this port instead of server.port"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `catalog-upload-exporter` console script."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["register"]:
        from exporter.register import main as register  # noqa: PLC0415 - a light client

        return register(arguments[1:])
    if arguments[:1] == ["schema"]:
        return print_schema(arguments[1:])
    parser = build_parser()
    args = parser.parse_args(arguments)
    if args.port is not None and not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    if args.demo:
        if args.check_config:
            parser.error("--check-config needs --config")
        from exporter.demo import run_demo  # noqa: PLC0415 - the simulator loads only for --demo

        return _serve_until_stopped(lambda: run_demo(port=args.port))
    if args.config is None:
        parser.error("--config PATH is required (or try --demo)")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"catalog-upload-exporter: invalid configuration in {args.config}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return EXIT_USAGE
    if args.check_config:
        print(
            f"{args.config}: configuration OK "
            f"({len(config.ingestions.ids)} ingestion ids, auth {config.api.auth.type})"
        )
        return EXIT_OK
    configure_logging(config.logging.level, config.logging.format)
    exporter = Exporter(config)
    reloader = ConfigReloader(args.config, exporter)
    host = config.server.host
    port = config.server.port if args.port is None else args.port
    app = create_app(exporter, reloader)
    admin = (
        Listener(
            create_admin_app(
                exporter.tracker,
                token_file=config.admin.token_file,
                body_timeout=config.server.idle_timeout_seconds,
            ),
            config.admin.host,
            config.admin.port,
        )
        if config.admin.enabled
        else None
    )
    return _serve_until_stopped(
        lambda: serve(
            app,
            host,
            port,
            admin=admin,
            on_reload=reloader.request,
            idle_timeout=config.server.idle_timeout_seconds,
        )
    )


def print_schema(arguments: Sequence[str]) -> int:
    """`catalog-upload-exporter schema`: the config file's JSON Schema on stdout."""
    parser = argparse.ArgumentParser(
        prog="catalog-upload-exporter schema",
        description="Print the configuration file's JSON Schema (draft 2020-12), the one "
        "config.schema.json holds, for editors and CI linters.",
    )
    parser.parse_args(arguments)
    print(json.dumps(json_schema(), indent=2, ensure_ascii=False))
    return EXIT_OK


def _serve_until_stopped(run: Callable[[], object]) -> int:
    try:
        asyncio.run(run())  # type: ignore[arg-type]
    except OSError as exc:
        log.error("cannot_listen", error=str(exc))
        return EXIT_FAILURE
    return EXIT_OK


@dataclass(frozen=True, slots=True)
class Listener:
    """A second application on its own address (the admin API)."""

    app: web.Application
    host: str
    port: int


async def _listen(runner: web.AppRunner, host: str, port: int) -> str:
    await web.TCPSite(runner, host, port).start()
    bound_host, bound_port = runner.addresses[0][:2]
    # A wildcard address is not something to click on: show loopback instead.
    shown_host = "127.0.0.1" if bound_host in {"0.0.0.0", "::"} else bound_host  # noqa: S104
    return f"http://{shown_host}:{bound_port}"


async def serve(
    app: web.Application,
    host: str,
    port: int,
    *,
    admin: Listener | None = None,
    on_reload: Callable[[], None] | None = None,
    on_listening: Callable[[str], None] | None = None,
    idle_timeout: float = ServerConfig().idle_timeout_seconds,
) -> None:
    """Serve `app` (and the admin API) until SIGTERM or SIGINT; SIGHUP calls `on_reload`.

    `idle_timeout` closes connections that sit idle or stall halfway through a request.
    """
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, keepalive_timeout=idle_timeout
    )
    admin_runner = (
        web.AppRunner(
            admin.app, access_log=None, handle_signals=False, keepalive_timeout=idle_timeout
        )
        if admin
        else None
    )
    await runner.setup()
    try:
        url = await _listen(runner, host, port)
        log.info("listening", url=url, metrics=f"{url}/metrics")
        if admin is not None and admin_runner is not None:
            await admin_runner.setup()
            admin_url = await _listen(admin_runner, admin.host, admin.port)
            log.info("admin_api_listening", url=f"{admin_url}/api/v1/ingestions")
        # What start-up loaded (up to 100,000 uploads and their lines) lives as long as the
        # process: keep it out of the cyclic GC's full collections, which would otherwise
        # pause the event loop for tens of milliseconds now and then (scrape p99;
        # BENCHMARKS.md). Frozen objects are still freed by reference counting.
        gc.collect()
        gc.freeze()
        if on_listening is not None:
            on_listening(url)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        if on_reload is not None:
            loop.add_signal_handler(signal.SIGHUP, on_reload)
        await stop.wait()
        log.info("shutting_down")
    finally:
        if admin_runner is not None and admin_runner.server is not None:
            await admin_runner.cleanup()  # no registrations while the exporter stops
        await runner.cleanup()
