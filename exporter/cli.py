"""Command line: parse arguments, load and check the config, hand over to `runtime`.

Exit codes: 0 after a clean shutdown or a valid `--check-config`; 2 for a bad command line
or an invalid configuration (the message names every bad key; with `--on-invalid-config=serve`
an invalid config at start-up is logged and the process waits for a valid one instead); 1
when the listener cannot be opened.

`--web.listen-address` and `--web.config.file` are the flags every Go exporter takes
(exporter-toolkit's): the listen address as `host:port`, `[v6]:port` or `:port`, and the web
config file (TLS, basic auth, headers; `webconfig`).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from exporter import __version__
from exporter.config import ConfigError, ServerConfig, load_config
from exporter.config_schema import json_schema
from exporter.runtime import load_to_serve, run_config, run_standby, run_until_stopped
from exporter.webconfig import load_web_config, settings_from

EXIT_OK, EXIT_USAGE = 0, 2

#: `--on-invalid-config`: fail fast (a person at a terminal), or keep serving (a sidecar,
#: whose crash loop would keep the app it watches from starting).
ON_INVALID_EXIT, ON_INVALID_SERVE = "exit", "serve"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; `catalog-upload-exporter --help` shows it."""
    parser = argparse.ArgumentParser(
        prog="catalog-upload-exporter",
        description="Prometheus exporter for HAQM Catalog API upload status.",
        epilog=(
            "To register an ingestionId with a running exporter (from the app's side): "
            "catalog-upload-exporter register ID [--url URL] [--label NAME=VALUE] "
            "[--token-file PATH]; see `catalog-upload-exporter register --help`. "
            "To download an upload's processing report: catalog-upload-exporter report "
            "[--config FILE] ID [-o PATH]; see `catalog-upload-exporter report --help`. "
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
    parser.add_argument(
        "--on-invalid-config",
        choices=[ON_INVALID_EXIT, ON_INVALID_SERVE],
        default=ON_INVALID_EXIT,
        help="what an invalid --config does at start-up: exit 2 (the default), or serve "
        "/healthz and /metrics (catalog_exporter_config_valid 0) until the file is fixed, then "
        "start without a restart; with serve, a token file that does not exist yet is no "
        "error either (the sidecar's setting; --check-config always exits 2)",
    )
    parser.add_argument(
        "--web.listen-address",
        dest="listen_address",
        metavar="ADDRESS",
        help="listen on host:port, [IPv6]:port or :port (every interface) instead of "
        "server.host and server.port",
    )
    parser.add_argument(
        "--web.config.file",
        dest="web_config_file",
        metavar="PATH",
        help="exporter-toolkit's web config (TLS, client certificates, basic auth, headers) "
        "for /metrics, instead of server.web_config_file; see docs/security.md",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `catalog-upload-exporter` console script."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    command = _run_command(arguments)
    if command is not None:
        return command
    parser = build_parser()
    args = parser.parse_args(arguments)
    if args.port is not None and not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    host, port = _listen_flags(parser, args)
    if args.demo:
        return _run_demo(parser, args)
    if args.config is None:
        parser.error("--config PATH is required (or try --demo)")
    if args.check_config:
        return _check_config(args.config, args.web_config_file)
    serve = args.on_invalid_config == ON_INVALID_SERVE
    try:  # load_to_serve also tunes the GC
        config = load_to_serve(args.config, token_files_may_be_absent=serve)
    except ConfigError as exc:
        if not serve:
            return _invalid(args.config, exc)
        return run_standby(
            args.config, exc.problems, port=port, host=host, web_config_file=args.web_config_file
        )
    return run_config(
        config,
        args.config,
        port=port,
        host=host,
        web_config_file=args.web_config_file,
        token_files_may_be_absent=serve,
    )


def _run_demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`--demo`: the exporter against the embedded simulator; no config, no web flags."""
    if args.check_config:
        parser.error("--check-config needs --config")
    if args.listen_address is not None or args.web_config_file is not None:
        parser.error("--web.listen-address and --web.config.file need --config")
    from exporter.demo import run_demo  # noqa: PLC0415 - the simulator loads only for --demo

    return run_until_stopped(lambda: run_demo(port=args.port))


def _check_config(path: Path, web_config_file: str | None) -> int:
    """`--check-config`: always strict (exit 2 on any problem, whatever
    `--on-invalid-config` says), the web config, its certificate and key included."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        return _invalid(path, exc)
    web_config = config.server.web_config_file if web_config_file is None else web_config_file
    if web_config and not _web_config_ok(web_config):
        return EXIT_USAGE
    print(
        f"{path}: configuration OK "
        f"({len(config.ingestions.ids)} ingestion ids, auth {config.api.auth.type})"
    )
    return EXIT_OK


def _invalid(path: Path, error: ConfigError) -> int:
    """Every problem on stderr, exit 2: failing fast, where a user runs the exporter."""
    print(f"catalog-upload-exporter: invalid configuration in {path}:", file=sys.stderr)
    for problem in error.problems:
        print(f"  - {problem}", file=sys.stderr)
    return EXIT_USAGE


def _listen_flags(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[str | None, int | None]:
    """The host and port the flags ask for (None: the config's)."""
    if args.listen_address is None:
        return None, args.port
    if args.port is not None:
        parser.error("give --web.listen-address or --port, not both")
    try:
        return parse_listen_address(args.listen_address)
    except ValueError as error:
        parser.error(f"--web.listen-address: {error}")


def _web_config_ok(path: str) -> bool:
    """--check-config of the web config, its certificate and key loaded too; problems on
    stderr."""
    try:
        settings_from(load_web_config(path))
    except ConfigError as exc:
        print(f"catalog-upload-exporter: invalid web config in {path}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return False
    return True


def parse_listen_address(text: str) -> tuple[str, int]:
    """(host, port) from `host:port`, `[IPv6]:port` or `:port` (host "": every interface,
    IPv4 and IPv6, as Go listens); ValueError says what is wrong."""
    if text.startswith("["):
        inside, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(f"expected [IPv6 address]:port, got {text!r}")
        try:
            ipaddress.IPv6Address(inside)
        except ValueError:
            raise ValueError(f"{inside!r} in brackets is not an IPv6 address") from None
        host, port_text = inside, rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ValueError(f"expected host:port, [IPv6]:port or :port, got {text!r}")
        if ":" in host:
            raise ValueError(f"an IPv6 address goes in brackets, as in [::1]:10184; got {text!r}")
    if not port_text.isascii() or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"the port must be a number from 0 to 65535, got {port_text!r}")
    port = int(port_text)
    if host:
        try:  # the same checks as server.host and server.port
            ServerConfig.model_validate({"host": host, "port": port})
        except ValueError:
            raise ValueError(f"{host!r} is not a host name or address to listen on") from None
    return host, port


def _run_command(arguments: Sequence[str]) -> int | None:
    """Run `register`, `report` or `schema` when named first; None when none is."""
    name, rest = arguments[:1], arguments[1:]
    if name == ["register"]:
        from exporter.register import main as register  # noqa: PLC0415 - a light client

        return register(rest)
    if name == ["report"]:
        from exporter.report_command import main as report  # noqa: PLC0415 - a command of its own

        return report(rest)
    if name == ["schema"]:
        return print_schema(rest)
    return None


def print_schema(arguments: Sequence[str]) -> int:
    """`catalog-upload-exporter schema`: the config file's JSON Schema on stdout."""
    parser = argparse.ArgumentParser(
        prog="catalog-upload-exporter schema",
        description="Print the configuration file's JSON Schema (draft 2020-12), the one "
        "config.schema.json holds, for editors and CI linters.",
    )
    parser.parse_args(arguments)
    # ASCII only: the id pattern names invisible characters above U+FFFF, which JSON escapes
    # keep visible in the file (no regex escape for them is common to ECMA-262 and Python).
    print(json.dumps(json_schema(), indent=2))
    return EXIT_OK
