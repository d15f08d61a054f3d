"""Fetch one upload's processing report: a fresh link from the Catalog API, then the file.

It owns the download of the presigned `reportDownloadLink`: a session of its own that sends
none of the exporter's credentials (no Authorization, no token header, no X-Amz-* header, no
cookie: the link carries its own), follows no redirect, and is bounded in time and in size.
The link is itself a credential: it is never logged, printed or put in a message; its host
at most is. Where the report goes is the caller's: a `ReportSink` (a temporary file for the
`report` command, an HTTP response for the admin API) receives it. Errors are values.
"""

from __future__ import annotations

import asyncio
import enum
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import yarl
from aiohttp import web

from exporter.client import READ_CHUNK_BYTES, CatalogClient
from exporter.models import RETRYABLE_ERRORS, PollError
from exporter.responses import clean_text

__all__ = [
    "DEFAULT_DOWNLOAD_TIMEOUT_SECONDS",
    "DownloadLimits",
    "ReportFailure",
    "ReportFetched",
    "ReportOutcome",
    "ReportProblem",
    "ReportSink",
    "ReportSource",
    "ResponseSink",
    "fetch_report",
]

#: The whole download, from connecting to the last byte; a report is a few MiB at most.
DEFAULT_DOWNLOAD_TIMEOUT_SECONDS = 300.0

#: The longest pause before polling again for a link: someone is waiting at a terminal.
_MAX_RETRY_DELAY_SECONDS = 10.0
#: How much of an error answer is read to find S3's <Code> and <Message>.
_ERROR_BODY_BYTES = 4096
_S3_ERROR_FIELD = re.compile(r"<(Code|Message)>([^<]{1,300})</\1>")


class ReportProblem(enum.StrEnum):
    """Why no report was delivered; the `report` command's exit code follows from it."""

    NOT_READY = "not_ready"  # no link (yet): the upload is not terminal, or has no report
    API_ERROR = "api_error"  # getCatalogUploadStatus failed
    DOWNLOAD_FAILED = "download_failed"  # the report host did not give the report
    TOO_LARGE = "too_large"  # over api.max_report_bytes


@dataclass(frozen=True, slots=True)
class ReportFailure:
    """No report, and why. `kind` is finer than `problem` (an API error kind, `redirect`,
    `http_403`, `timeout`...); `status` is the upload's status when the API gave one.
    The message never contains the link."""

    problem: ReportProblem
    kind: str
    message: str
    status: str | None = None


@dataclass(frozen=True, slots=True)
class ReportFetched:
    """The report went to the sink in full: `size` bytes, from `host`."""

    size: int
    status: str
    host: str


ReportOutcome = ReportFetched | ReportFailure


@dataclass(frozen=True, slots=True)
class DownloadLimits:
    """How long and how large a download may be."""

    max_bytes: int
    timeout_seconds: float = DEFAULT_DOWNLOAD_TIMEOUT_SECONDS


class ReportSink(Protocol):
    """Where a report goes. `start` is called once, only after the report host answered 200
    with an acceptable Content-Length (None when it sent none); then `write` per chunk.
    A failure after `start` (cut connection, size cap passed mid-stream) is returned by
    `fetch_report`: the sink must then discard what it received."""

    async def start(self, content_type: str, content_length: int | None) -> None:
        """The report is coming."""
        ...

    async def write(self, chunk: bytes) -> None:
        """The next part of the report."""
        ...


class ReportSource(Protocol):
    """Something that fetches one upload's report into a sink (the running exporter does)."""

    async def __call__(self, ingestion_id: str, sink: ReportSink) -> ReportOutcome:
        """Fetch the report of `ingestion_id` into `sink`."""
        ...


class ResponseSink:
    """Streams a report into an HTTP response (the admin API's).

    Headers go out only at `start`, so a failure before it can still be answered with a JSON
    error. A failure after it cannot: `abort` then closes the connection without the final
    chunk, so the client sees a broken transfer rather than a short report.
    """

    def __init__(self, request: web.Request, filename: str) -> None:
        self._request = request
        self._filename = filename
        self.response: web.StreamResponse | None = None

    async def start(self, content_type: str, content_length: int | None) -> None:
        """Send the status line and headers."""
        response = web.StreamResponse(
            headers={
                "Content-Type": content_type or "application/octet-stream",
                "Content-Disposition": f'attachment; filename="{self._filename}"',
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
            }
        )
        if content_length is not None:
            response.content_length = content_length
        await response.prepare(self._request)
        self.response = response

    async def write(self, chunk: bytes) -> None:
        """Send the next chunk."""
        assert self.response is not None, "start() comes first"
        await self.response.write(chunk)

    def abort(self) -> None:
        """Cut the connection mid-transfer."""
        transport = self._request.transport
        if transport is not None:
            transport.abort()


async def fetch_report(
    client: CatalogClient,
    ingestion_id: str,
    sink: ReportSink,
    limits: DownloadLimits,
    *,
    retries: int = 0,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> ReportOutcome:
    """Poll the API for a fresh link, then download the report into `sink`.

    A throttled, failed or unanswered poll is tried again up to `retries` times, after the
    server's Retry-After or 1, 2, 4... seconds: the exporter may be using the API's budget.
    """
    outcome, link = await client.fetch_report_link(ingestion_id)
    for attempt in range(retries):
        if not (isinstance(outcome, PollError) and outcome.kind in RETRYABLE_ERRORS):
            break
        delay = outcome.retry_after if outcome.retry_after is not None else 2.0**attempt
        await sleep(min(delay, _MAX_RETRY_DELAY_SECONDS))
        outcome, link = await client.fetch_report_link(ingestion_id)
    if isinstance(outcome, PollError):
        detail = f": {outcome.message}" if outcome.message else ""
        code = f" (HTTP {outcome.http_status})" if outcome.http_status is not None else ""
        return ReportFailure(
            ReportProblem.API_ERROR,
            outcome.kind.value,
            f"getCatalogUploadStatus failed: {outcome.kind.value}{code}{detail}",
        )
    if not link:
        return ReportFailure(
            ReportProblem.NOT_READY,
            "no_link",
            f"no report yet: the upload's status is {outcome.status} and the API gave no "
            "reportDownloadLink",
            outcome.status,
        )
    return await download(link, sink, limits, status=outcome.status)


async def download(
    link: str, sink: ReportSink, limits: DownloadLimits, *, status: str = ""
) -> ReportOutcome:
    """GET `link` with a plain session into `sink`: no credential, no redirect, bounded."""
    try:
        url = yarl.URL(link, encoded=True)  # re-quoting could break the link's signature
    except ValueError:
        url = yarl.URL()
    host = url.host or ""
    if url.scheme not in ("http", "https") or not host or url.user or url.password:
        return _failed("bad_link", "the reportDownloadLink is not a plain http(s) URL", status)
    return await _get(url, sink, limits, status)


async def _get(
    url: yarl.URL, sink: ReportSink, limits: DownloadLimits, status: str
) -> ReportOutcome:
    host = url.host or ""
    where = f"the report host {host}"
    timeout = aiohttp.ClientTimeout(total=limits.timeout_seconds)
    try:
        # A session of its own: nothing the API session holds (headers, cookies) can leak,
        # and trust_env=False keeps ~/.netrc from adding an Authorization header.
        async with (
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), trust_env=False) as session,
            session.get(url, allow_redirects=False, timeout=timeout) as response,
        ):
            if response.status != 200:
                return await _refused(response, where, status)
            length = response.content_length
            if length is not None and length > limits.max_bytes:
                return _too_large(f"{where} announced {length} bytes,", limits, status)
            await sink.start(response.content_type, length)
            size = 0
            async for chunk in response.content.iter_chunked(READ_CHUNK_BYTES):
                size += len(chunk)
                if size > limits.max_bytes:
                    return _too_large(f"{where} sent", limits, status)
                await sink.write(chunk)
    except TimeoutError:
        return _failed(
            "timeout",
            f"{where} did not send the report within {limits.timeout_seconds:g} s",
            status,
        )
    except aiohttp.ClientError as exc:
        # The exception's text may quote the URL, and so the signature: only its name is shown.
        return _failed("connection", f"{where}: {type(exc).__name__}", status)
    return ReportFetched(size, status, host)


async def _refused(response: aiohttp.ClientResponse, where: str, status: str) -> ReportFailure:
    if 300 <= response.status < 400:
        # Location is not read: it may carry another signed URL.
        message = f"{where} answered {response.status}, a redirect, which is never followed"
        return _failed("redirect", message, status)
    try:
        head = await response.content.read(_ERROR_BODY_BYTES)
    except (aiohttp.ClientError, TimeoutError):
        head = b""
    fields = dict(_S3_ERROR_FIELD.findall(head.decode("utf-8", errors="replace")))
    said = " ".join(
        f"{name} {clean_text(fields[name])}" for name in ("Code", "Message") if name in fields
    )
    hint = " (the link expires: run the command again)" if response.status == 403 else ""
    message = f"{where} answered {response.status}{': ' + said if said else ''}{hint}"
    return _failed(f"http_{response.status}", message, status)


def _failed(kind: str, message: str, status: str) -> ReportFailure:
    return ReportFailure(ReportProblem.DOWNLOAD_FAILED, kind, message, status or None)


def _too_large(what: str, limits: DownloadLimits, status: str) -> ReportFailure:
    message = f"{what} more than api.max_report_bytes ({limits.max_bytes})"
    return ReportFailure(ReportProblem.TOO_LARGE, "too_large", message, status or None)
