"""`catalog-upload-exporter report ID`: download an upload's processing report, now.

For the on-call engineer after CatalogUploadFatal: with the exporter's own config and
credentials it asks getCatalogUploadStatus for a fresh `reportDownloadLink` and downloads the
report (see `exporter.report`), into a temporary file first, so that stdout or PATH receives
the whole report or nothing. The link is never printed; messages go to stderr.

Exit codes: 0 the report was written; 1 no report yet (the message names the status); 2 bad
command line or config; 3 the API or the download failed (the message names the kind); 4 the
report is larger than api.max_report_bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import IO, BinaryIO, TextIO

import aiohttp
from prometheus_client import CollectorRegistry

from exporter.auth import RequestAuth
from exporter.auth_setup import AuthFactory, auth_from_config
from exporter.client import CatalogClient
from exporter.config import Config, ConfigError, load_config
from exporter.logs import SecretMask, configure_logging
from exporter.metrics import ApiMetrics
from exporter.models import ingestion_id_problem
from exporter.report import (
    DEFAULT_DOWNLOAD_TIMEOUT_SECONDS,
    DownloadLimits,
    ReportFailure,
    ReportProblem,
    fetch_report,
)

__all__ = ["CONFIG_ENV", "DEFAULT_CONFIG_PATH", "main"]

#: Where the container image and the Kubernetes manifests put the config, so that
#: `kubectl exec ... -- catalog-upload-exporter report ID` needs no --config.
DEFAULT_CONFIG_PATH = "/etc/catalog-upload-exporter/config.yaml"
CONFIG_ENV = "CATALOG_EXPORTER_CONFIG"

#: Polls tried again when throttled or failing, before giving up with exit 3.
RETRIES = 3

EXIT_OK, EXIT_NOT_READY, EXIT_USAGE, EXIT_FAILED, EXIT_TOO_LARGE = 0, 1, 2, 3, 4

_EXIT_CODES = {
    ReportProblem.NOT_READY: EXIT_NOT_READY,
    ReportProblem.API_ERROR: EXIT_FAILED,
    ReportProblem.DOWNLOAD_FAILED: EXIT_FAILED,
    ReportProblem.TOO_LARGE: EXIT_TOO_LARGE,
}
_PROG = "catalog-upload-exporter report"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Download the processing report of one upload (a fresh reportDownloadLink "
        "from getCatalogUploadStatus, with the config's API settings and credentials). "
        "Exit 0 written, 1 no report yet, 2 usage or config error, 3 API or download failure, "
        "4 larger than api.max_report_bytes.",
    )
    parser.add_argument("ingestion_id", metavar="ID", help="the upload's ingestionId")
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH),
        metavar="FILE",
        help=f"the exporter's YAML config (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="PATH",
        help="write the report here (atomically: whole or not at all) instead of stdout",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_DOWNLOAD_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help="give up on the download after this long "
        f"(default {DEFAULT_DOWNLOAD_TIMEOUT_SECONDS:g})",
    )
    return parser


class _SpoolSink:
    """Collects the report in a temporary file; nothing reaches the target before the end.

    It takes the report itself: one S3 serves gzip-encoded is written inflated.
    Blocking writes are fine here: the command's event loop runs nothing else.
    """

    decodes = True

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file

    async def start(
        self, content_type: str, content_length: int | None, content_encoding: str
    ) -> None:
        """Nothing to prepare: the file exists."""

    async def write(self, chunk: bytes) -> None:
        """Append to the temporary file."""
        self.file.write(chunk)


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: BinaryIO | None = None,
    stderr: TextIO | None = None,
    auth_factory: AuthFactory = auth_from_config,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> int:
    """Run the command; returns its exit code."""
    err = sys.stderr if stderr is None else stderr
    parser = _build_parser()
    args = parser.parse_args(argv)
    problem = ingestion_id_problem(args.ingestion_id)
    if problem is not None:
        parser.error(f"ID is not a usable ingestionId ({problem.value})")
    if not args.timeout > 0:
        parser.error("--timeout must be > 0")
    output: Path | None = None if args.output in (None, Path("-")) else args.output
    if output is not None and not output.parent.is_dir():
        parser.error(f"-o {output}: {output.parent} is not a directory")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"{_PROG}: invalid configuration in {args.config}:", file=err)
        for line in exc.problems:
            print(f"  - {line}", file=err)
        return EXIT_USAGE
    auth = auth_factory(config.api.auth)
    # Every line on stderr, logs and messages, is masked: an API may echo our token back.
    mask = SecretMask()
    mask.watch("api", auth.held_secrets)
    # Logs go to stderr: stdout may be the report itself.
    configure_logging(config.logging.level, config.logging.format, stream=err, mask=mask)
    out = (sys.stdout.buffer if stdout is None else stdout) if output is None else None
    limits = DownloadLimits(
        config.api.max_report_bytes, args.timeout, frozenset(config.api.report_hosts)
    )
    return asyncio.run(
        _run(
            config,
            args.ingestion_id,
            limits=limits,
            output=output,
            stdout=out,
            err=_MaskedText(err, mask),
            auth=auth,
            sleep=sleep,
        )
    )


async def _run(
    config: Config,
    ingestion_id: str,
    *,
    limits: DownloadLimits,
    output: Path | None,
    stdout: BinaryIO | None,
    err: _MaskedText,
    auth: RequestAuth,
    sleep: Callable[[float], Awaitable[None]],
) -> int:
    directory = None if output is None else output.parent
    prefix = "report-" if output is None else f".{output.name}."
    try:
        spool = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed or moved below
            mode="w+b", dir=directory, prefix=prefix, suffix=".part", delete=False
        )
    except OSError as exc:
        print(f"{_PROG}: cannot create a temporary file: {exc}", file=err)
        return EXIT_FAILED
    try:
        async with aiohttp.ClientSession(raise_for_status=False) as session:
            client = CatalogClient(
                session,
                base_url=config.api.base_url,
                auth=auth,
                timeout_seconds=config.api.timeout_seconds,
                max_response_bytes=config.api.max_response_bytes,
                metrics=ApiMetrics(CollectorRegistry(auto_describe=True)),
            )
            outcome = await fetch_report(
                client, ingestion_id, _SpoolSink(spool), limits, retries=RETRIES, sleep=sleep
            )
        if isinstance(outcome, ReportFailure):
            print(f"{_PROG}: {_describe(outcome, ingestion_id)}", file=err)
            return _EXIT_CODES[outcome.problem]
        spool.flush()
        if output is None:
            assert stdout is not None
            spool.seek(0)
            shutil.copyfileobj(spool, stdout)
            stdout.flush()
            where = "stdout"
        else:
            os.fsync(spool.fileno())
            spool.close()
            os.replace(spool.name, output)
            where = str(output)
    except OSError as exc:
        print(f"{_PROG}: cannot write the report: {exc}", file=err)
        return EXIT_FAILED
    finally:
        spool.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(spool.name)
    print(
        f"{_PROG}: wrote {outcome.size} bytes to {where} (upload {ingestion_id!r}, status "
        f"{outcome.status}, from {outcome.host})",
        file=err,
    )
    return EXIT_OK


class _MaskedText:
    """A text stream that masks the secrets the process holds in whatever is written."""

    def __init__(self, stream: TextIO, mask: SecretMask) -> None:
        self._stream = stream
        self._mask = mask

    def write(self, text: str) -> int:
        """Write `text`, masked."""
        return self._stream.write(self._mask.mask(text))

    def flush(self) -> None:
        """Flush the stream."""
        self._stream.flush()


def _describe(failure: ReportFailure, ingestion_id: str) -> str:
    if failure.problem == ReportProblem.NOT_READY:
        return f"upload {ingestion_id!r}: {failure.message}"
    what = {
        ReportProblem.API_ERROR: "API error",
        ReportProblem.DOWNLOAD_FAILED: "download failed",
        ReportProblem.TOO_LARGE: "report too large",
    }[failure.problem]
    return f"upload {ingestion_id!r}: {what} ({failure.kind}): {failure.message}"
