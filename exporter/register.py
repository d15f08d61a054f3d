"""`catalog-upload-exporter register ID`: ask a running exporter's admin API to track an id.

This is the app side of the admin API, meant for a shell step after an upload in the app's
container. It uses only the standard library (and `secretfile`, which does too) so that it
starts fast, sends one POST (retried while the exporter cannot be reached: a sidecar may still
be starting) and maps the answer to an exit code. A 2xx means the exporter has the id on
disk: nothing more to wait for.

Exit codes: 0 registered (the upload's JSON view on stdout); 1 the exporter refused it (4xx or
5xx, its message on stderr); 2 bad command line or unreadable token file; 3 the exporter could
not be reached.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from exporter.secretfile import SecretFile, SecretFileProblem

__all__ = ["DEFAULT_URL", "URL_ENV", "main"]

# Copies of the admin API's defaults (`admin_schema`), kept equal by tests/test_admin.py:
# importing them would cost this command pydantic's start-up time.
DEFAULT_URL = "http://127.0.0.1:10185"
URL_ENV = "CATALOG_EXPORTER_ADMIN_URL"
INGESTIONS_PATH = "/api/v1/ingestions"
TIMEOUT_SECONDS = 10.0

#: Pauses before each retry of a connection that failed (refused, reset, no route): about
#: 7 s in all, the time a starting sidecar takes to listen.
RETRY_DELAYS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 3.0)

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3

_PROG = "catalog-upload-exporter register"


class _Unreachable(Exception):
    """No HTTP answer came back from the exporter."""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Ask a running exporter (its admin API) to track an ingestionId. "
        "Exit 0 registered, 1 refused, 2 usage error, 3 exporter unreachable.",
    )
    parser.add_argument("ingestion_id", metavar="ID", help="the ingestionId to track")
    parser.add_argument(
        "--url",
        default=os.environ.get(URL_ENV) or DEFAULT_URL,
        help=f"the admin API's base URL (default: ${URL_ENV}, else {DEFAULT_URL})",
    )
    parser.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a label for the upload's metrics (repeatable; names must be allow-listed in "
        "ingestions.labels)",
    )
    parser.add_argument(
        "--token-file",
        metavar="PATH",
        help="file holding the admin bearer token (when the exporter has admin.token_file)",
    )
    return parser


class _Usage(Exception):
    """The command line (or the token file it names) is unusable; the message says why."""

    def __init__(self, message: str = "", code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def main(argv: Sequence[str]) -> int:
    """Run `register` with `argv` (the words after "register"); returns the exit code."""
    try:
        request = _build_request(argv)
    except _Usage as exc:
        if str(exc):
            print(f"{_PROG}: {exc}", file=sys.stderr)
        return exc.code
    base = request.full_url.removesuffix(INGESTIONS_PATH)
    try:
        status, answer = _send(request)
    except _Unreachable as exc:
        print(f"{_PROG}: cannot reach the exporter at {base}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if 200 <= status < 300:
        print(json.dumps(answer) if answer is not None else "")
        return EXIT_OK
    if isinstance(answer, dict) and "message" in answer:
        detail = f"{answer.get('error', 'error')}: {answer['message']}"
    else:
        detail = "unexpected answer"
    print(f"{_PROG}: HTTP {status}: {detail}", file=sys.stderr)
    return EXIT_REFUSED


def _build_request(argv: Sequence[str]) -> urllib.request.Request:
    """The POST that registers the id, from the command line; raises _Usage."""
    try:
        args = _build_parser().parse_args(list(argv))
    except SystemExit as exc:  # argparse has printed its message (or --help)
        raise _Usage(code=exc.code if isinstance(exc.code, int) else EXIT_USAGE) from None
    labels: dict[str, str] = {}
    for item in args.label:
        name, sep, value = item.partition("=")
        if not sep or not name:
            msg = f"--label expects NAME=VALUE, got {item!r}"
            raise _Usage(msg)
        labels[name] = value
    base = args.url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        msg = f"--url must start with http:// or https://, got {args.url!r}"
        raise _Usage(msg)
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if args.token_file:
        headers["Authorization"] = f"Bearer {_read_token(args.token_file)}"
    body: dict[str, Any] = {"ingestionId": args.ingestion_id}
    if labels:
        body["labels"] = labels
    return urllib.request.Request(  # noqa: S310 - the scheme is checked above
        base + INGESTIONS_PATH, data=json.dumps(body).encode(), headers=headers, method="POST"
    )


def _read_token(path: str) -> str:
    """The token in `path`, read as the exporter reads its own (regular file, bounded)."""
    token = SecretFile(path).read()
    if isinstance(token, SecretFileProblem):
        raise _Usage(token.message)
    return token


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Hand a 3xx back as the answer instead of following it."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _send(request: urllib.request.Request) -> tuple[int, object]:
    """The answer's status and parsed JSON body (None if not JSON); retries refused connections."""
    # No proxy: the admin API is a local listener, and an HTTP_PROXY meant for the app's
    # outbound traffic must not capture (or see the token of) this request.
    # No redirect either: urllib would re-send the Authorization header to the new host.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())
    delays = iter(RETRY_DELAYS)
    while True:
        try:
            with opener.open(request, timeout=TIMEOUT_SECONDS) as response:
                return response.status, _parse(response.read())
        except urllib.error.HTTPError as exc:
            try:
                return exc.code, _parse(exc.read())
            finally:
                exc.close()
        # URLError, TimeoutError and ConnectionError are OSErrors; RemoteDisconnected is both.
        except (OSError, http.client.HTTPException) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            # A timeout means something listens but does not answer: waiting longer won't help.
            delay = None if isinstance(reason, TimeoutError) else next(delays, None)
            if delay is None:
                raise _Unreachable(str(reason) or type(reason).__name__) from None
            time.sleep(delay)


def _parse(raw: bytes) -> object:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None
