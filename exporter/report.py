"""Fetch one upload's processing report: a fresh link from the Catalog API, then the file.

It owns the download of the presigned `reportDownloadLink`: a session of its own that sends
none of the exporter's credentials (no Authorization, no token header, no X-Amz-* header, no
cookie: the link carries its own), follows no redirect, and is bounded in time and in size.
The link is itself a credential: it is never logged, printed or put in a message; its host
at most is. Where the report goes is the caller's: a `ReportSink` (a temporary file for the
`report` command, an HTTP response for the admin API) receives it. Errors are values.

The link comes from the API's answer, so it is treated as hostile: the download is a GET from
S3 and nothing else. Only https, no user information, no character a URL cannot hold; and
the host must resolve to public addresses only (no loopback, link-local such as the instance
metadata service, private, multicast, unspecified or reserved one). The addresses are checked
by the resolver the connection itself uses, so a name that answers a public address to a check
and a private one to the connect (DNS rebinding) cannot get through. `api.report_hosts` names
the exceptions (the simulator, a test's server): any address, plain http allowed.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import random
import re
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import yarl
from aiohttp import hdrs, web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from exporter.backoff import backoff_delay
from exporter.client import READ_CHUNK_BYTES, CatalogClient
from exporter.models import RETRYABLE_ERRORS, ErrorKind, PollError, PollOutcome
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
    "address_problem",
    "fetch_report",
]

#: The whole download, from connecting to the last byte; a report is a few MiB at most.
DEFAULT_DOWNLOAD_TIMEOUT_SECONDS = 300.0

#: The longest pause before polling again for a link: someone is waiting at a terminal.
_MAX_RETRY_DELAY_SECONDS = 10.0
#: How much of an error answer is read to find S3's <Code> and <Message>.
_ERROR_BODY_BYTES = 4096
_S3_ERROR_FIELD = re.compile(r"<(Code|Message)>([^<]{1,300})</\1>")
#: What a link may hold: RFC 3986's characters. A presigned URL is percent-encoded; a raw
#: space or control character would reach the request line as it is.
_URL_CHARACTERS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")
#: The encodings a decoding sink gets inflated (aiohttp decodes these without extra packages).
_DECODED_ENCODINGS = frozenset({"", "identity", "gzip", "deflate"})
_EXEMPTION = "(unless the host is listed in api.report_hosts)"


class ReportProblem(enum.StrEnum):
    """Why no report was delivered; the `report` command's exit code follows from it."""

    NOT_READY = "not_ready"  # no link (yet): the upload is not terminal, or has no report
    API_ERROR = "api_error"  # getCatalogUploadStatus failed
    DOWNLOAD_FAILED = "download_failed"  # the report host did not give the report
    TOO_LARGE = "too_large"  # over api.max_report_bytes


@dataclass(frozen=True, slots=True)
class ReportFailure:
    """No report, and why. `kind` is finer than `problem` (an API error kind, `redirect`,
    `http_403`, `timeout`, `forbidden_host`...); `status` is the upload's status when the API
    gave one. The message never contains the link."""

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
    """How long and how large a download may be, and which hosts are exempt from the
    public-address and https rules (`api.report_hosts`: names or addresses as a link gives
    its host)."""

    max_bytes: int
    timeout_seconds: float = DEFAULT_DOWNLOAD_TIMEOUT_SECONDS
    allowed_hosts: frozenset[str] = frozenset()

    def allows(self, host: str) -> bool:
        """Whether `host` (a link's, lower-case) is one of `allowed_hosts`."""
        return _normal_host(host) in {_normal_host(name) for name in self.allowed_hosts}


class ReportSink(Protocol):
    """Where a report goes. `start` is called once, only after the report host answered 200
    with an acceptable Content-Length (None when it sent none); then `write` per chunk.
    A failure after `start` (cut connection, size cap passed mid-stream) is returned by
    `fetch_report`: the sink must then discard what it received.

    A sink that `decodes` gets the report itself: an object S3 serves with
    `Content-Encoding: gzip` arrives inflated, `content_encoding` is "" and `content_length`
    None (the header counted the compressed bytes). One that does not gets the bytes exactly
    as the host sent them, with their Content-Length and Content-Encoding, to pass on.
    Either way api.max_report_bytes counts the bytes the sink receives.
    """

    @property
    def decodes(self) -> bool:
        """True: inflate an encoded report; False: pass the bytes on as they came."""
        ...

    async def start(
        self, content_type: str, content_length: int | None, content_encoding: str
    ) -> None:
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
    chunk, so the client sees a broken transfer rather than a short report. The body is the
    host's, byte for byte: a gzip-encoded report goes on gzip-encoded, with its
    Content-Encoding and its Content-Length.
    """

    decodes = False

    def __init__(self, request: web.Request, filename: str) -> None:
        self._request = request
        self._filename = filename
        self.response: web.StreamResponse | None = None

    async def start(
        self, content_type: str, content_length: int | None, content_encoding: str
    ) -> None:
        """Send the status line and headers."""
        headers = {
            "Content-Type": content_type or "application/octet-stream",
            "Content-Disposition": f'attachment; filename="{self._filename}"',
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
        }
        if content_encoding:
            headers["Content-Encoding"] = content_encoding
        response = web.StreamResponse(headers=headers)
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
    rng: random.Random | None = None,
    on_throttled: Callable[[float | None], None] | None = None,
) -> ReportOutcome:
    """Poll the API for a fresh link, then download the report into `sink`.

    A throttled, failed or unanswered poll is tried again up to `retries` times, after a
    `backoff_delay` from 1 s (and no sooner than the server's Retry-After), 10 s at most:
    the exporter may be using the API's budget, and someone is waiting at a terminal.
    Each 429 is also told to `on_throttled` (with its Retry-After): a link poll that took the
    rate limiter's token must slow it when throttled, as a poll does.
    """
    rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography

    async def poll() -> tuple[PollOutcome, str]:
        outcome, link = await client.fetch_report_link(ingestion_id)
        if (
            on_throttled is not None
            and isinstance(outcome, PollError)
            and outcome.kind is ErrorKind.THROTTLED
        ):
            on_throttled(outcome.retry_after)
        return outcome, link

    outcome, link = await poll()
    for attempt in range(1, retries + 1):
        if not (isinstance(outcome, PollError) and outcome.kind in RETRYABLE_ERRORS):
            break
        await sleep(
            backoff_delay(
                attempt,
                base=1.0,
                cap=_MAX_RETRY_DELAY_SECONDS,
                rng=rng,
                retry_after=outcome.retry_after,
            )
        )
        outcome, link = await poll()
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
    """GET `link` with a plain session into `sink`: no credential, no redirect, bounded, and
    only from a public https host (or one of `limits.allowed_hosts`)."""
    try:
        url = yarl.URL(link, encoded=True)  # re-quoting could break the link's signature
        url.port  # noqa: B018 - a port out of range raises here rather than at the connect
    except ValueError:
        return _failed("bad_link", "the reportDownloadLink is not a URL", status)
    refusal = _link_refusal(link, url, limits)
    if refusal is not None:
        return _failed(*refusal, status)
    return await _get(url, sink, limits, status)


def _link_refusal(link: str, url: yarl.URL, limits: DownloadLimits) -> tuple[str, str] | None:
    """Why the link is not fetched, as (kind, message), or None. No message quotes it."""
    host = url.host or ""
    listed = limits.allows(host)
    problem = address_problem(host) if not listed and _is_address(host) else None
    refusal: tuple[str, str] | None = None
    if not _URL_CHARACTERS.fullmatch(link):
        refusal = ("bad_link", "the reportDownloadLink holds characters a URL cannot hold")
    elif url.scheme not in ("http", "https"):
        refusal = ("forbidden_scheme", "the reportDownloadLink is not an http(s) URL")
    elif not host:
        refusal = ("bad_link", "the reportDownloadLink names no host")
    elif "@" in (url.raw_authority or ""):
        # Even an empty "user:password" (`:@`) would be sent as `Authorization: Basic Og==`.
        where = f"the reportDownloadLink to {host}"
        refusal = ("forbidden_userinfo", f"{where} carries user information (user:password@)")
    elif url.scheme != "https" and not listed:
        where = f"the reportDownloadLink to {host}"
        refusal = ("forbidden_scheme", f"{where} is plain http, not https {_EXEMPTION}")
    elif problem is not None:
        message = f"the report host {host} is {problem}: not fetched {_EXEMPTION}"
        refusal = ("forbidden_host", message)
    return refusal


async def _get(
    url: yarl.URL, sink: ReportSink, limits: DownloadLimits, status: str
) -> ReportOutcome:
    host = url.host or ""
    where = f"the report host {host}"
    timeout = aiohttp.ClientTimeout(total=limits.timeout_seconds)
    resolver = None if limits.allows(host) else PublicAddresses()
    # Literal addresses were checked above (aiohttp connects to them without resolving);
    # names are resolved by `resolver`, which hands the connector public addresses only.
    connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False)
    try:
        # A session of its own: nothing the API session holds (headers, cookies) can leak,
        # and trust_env=False keeps ~/.netrc from adding an Authorization header.
        async with (
            aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
                auto_decompress=sink.decodes,
            ) as session,
            session.get(url, allow_redirects=False, timeout=timeout) as response,
        ):
            if response.status != 200:
                return await _refused(response, where, status)
            return await _stream(response, sink, limits, where, status)
    except TimeoutError:
        return _failed(
            "timeout",
            f"{where} did not send the report within {limits.timeout_seconds:g} s",
            status,
        )
    except aiohttp.ClientError as exc:
        if resolver is not None and resolver.refused:
            message = f"{where} resolves to {resolver.refused} only: not fetched"
            return _failed("forbidden_host", f"{message} {_EXEMPTION}", status)
        # The exception's text may quote the URL, and so the signature: only its name is shown.
        return _failed("connection", f"{where}: {type(exc).__name__}", status)


async def _stream(
    response: aiohttp.ClientResponse,
    sink: ReportSink,
    limits: DownloadLimits,
    where: str,
    status: str,
) -> ReportOutcome:
    """A 200's body into the sink; the cap counts the bytes the sink gets."""
    encoding = response.headers.get(hdrs.CONTENT_ENCODING, "").strip().lower()
    length = response.content_length
    if sink.decodes and encoding not in _DECODED_ENCODINGS:
        message = f"{where} sent the report in a Content-Encoding that is not decoded"
        return _failed("unsupported_encoding", message, status)
    if sink.decodes and encoding not in ("", "identity"):
        encoding, length = "", None  # inflated on the way: the header counted other bytes
    if length is not None and length > limits.max_bytes:
        return _too_large(f"{where} announced {length} bytes,", limits, status)
    await sink.start(response.content_type, length, encoding)
    size = 0
    async for chunk in response.content.iter_chunked(READ_CHUNK_BYTES):
        size += len(chunk)
        if size > limits.max_bytes:
            return _too_large(f"{where} sent", limits, status)
        await sink.write(chunk)
    return ReportFetched(size, status, response.url.host or "")


class PublicAddresses(AbstractResolver):
    """Resolves as aiohttp does, then keeps only public addresses; none left is an error.

    The connector connects to what this returns, so the address checked is the address
    connected to: a name that resolves differently the second time gains nothing.
    `refused` describes the last refusal ("" when none). `resolver` is the one wrapped
    (aiohttp's default).
    """

    def __init__(self, resolver: AbstractResolver | None = None) -> None:
        self._resolver = DefaultResolver() if resolver is None else resolver
        self.refused = ""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """The addresses `host` resolves to that are public; OSError if there are none."""
        results = await self._resolver.resolve(host, port, family)
        kept = [result for result in results if address_problem(result["host"]) is None]
        if not kept:
            refused = sorted({f"{r['host']}, {address_problem(r['host'])}" for r in results})
            self.refused = ", ".join(refused) or "no address"
            msg = f"{host} resolves to no public address"
            raise OSError(msg)
        return kept

    async def close(self) -> None:
        """Close the resolver it wraps."""
        await self._resolver.close()


def address_problem(address: str) -> str | None:
    """Why a report may not be fetched from this IP address ("a loopback address"...), or
    None for a public one. An IPv4 address inside an IPv6 one (mapped, 6to4, Teredo) is
    judged too."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # without an IPv6 zone
    except ValueError:
        return "not an IP address"
    inside: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address] = (ip,)
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = (ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None)
        inside = (*(v4 for v4 in embedded if v4 is not None), ip)
    for candidate in inside:
        for name, flagged in (
            ("a loopback address", candidate.is_loopback),
            ("a link-local address", candidate.is_link_local),
            ("an unspecified address", candidate.is_unspecified),
            ("a multicast address", candidate.is_multicast),
            ("a private address", candidate.is_private),
            ("a reserved address", candidate.is_reserved),
            ("not a global address", not candidate.is_global),
        ):
            if flagged:
                return name if candidate == ip else f"{name} ({candidate} inside)"
    return None


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _normal_host(name: str) -> str:
    """A host as compared: lower-case, no root dot, an IP address in its short form."""
    host = name.strip().lower().removesuffix(".").removeprefix("[").removesuffix("]")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


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
