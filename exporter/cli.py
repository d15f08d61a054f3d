"""Command line: parse arguments, load and check the config, hand over to `runtime`.

Exit codes: 0 after a clean shutdown or a valid `--check-config`; 2 for a bad command line
or an invalid configuration (the message names every bad key; with `--on-invalid-config=serve`
an invalid config at start-up is logged and the process waits for a valid one instead); 1
when the listener cannot be opened.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from exporter import __version__
from exporter.config import ConfigError, load_config
from exporter.config_schema import json_schema
from exporter.runtime import load_to_serve, run_config, run_standby, run_until_stopped

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
    if args.demo:
        if args.check_config:
            parser.error("--check-config needs --config")
        from exporter.demo import run_demo  # noqa: PLC0415 - the simulator loads only for --demo

        return run_until_stopped(lambda: run_demo(port=args.port))
    if args.config is None:
        parser.error("--config PATH is required (or try --demo)")
    serve = args.on_invalid_config == ON_INVALID_SERVE and not args.check_config
    try:
        if args.check_config:
            config = load_config(args.config)
        else:  # load_to_serve also tunes the GC
            config = load_to_serve(args.config, token_files_may_be_absent=serve)
    except ConfigError as exc:
        if serve:
            return run_standby(args.config, exc.problems, port=args.port)
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
    return run_config(config, args.config, port=args.port, token_files_may_be_absent=serve)


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
