"""The Catalog API client: one ingestionId in, a `StatusReport` or a classified `PollError` out.

It owns the HTTP exchange (signing, timeout, body-size cap) and the per-request metrics.
It does not retry or pace: that is the scheduler's and the rate limiter's job. It sends to
`api.base_url` only: a redirect is never followed, it is an `unexpected_status` error.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import aiohttp
import structlog

from exporter.auth import AuthUnavailable, RequestAuth
from exporter.metrics import ApiMetrics
from exporter.models import ErrorKind, PollError, PollOutcome, StatusReport
from exporter.responses import classify_response, clean_text, report_download_link

STATUS_PATH = "/v1/catalog/getCatalogUploadStatus"

log = structlog.get_logger("exporter.client")

#: How much of an answer's body is read at a time, here and for reports: the size caps are
#: checked between reads.
READ_CHUNK_BYTES = 64 * 1024


class BodyTooLarge(Exception):
    """A body exceeded its cap (`api.max_response_bytes`, `proxy.max_body_bytes`)."""


async def read_capped(content: aiohttp.StreamReader, declared: int | None, limit: int) -> bytes:
    """A whole body of at most `limit` bytes, read in `READ_CHUNK_BYTES` pieces; raises
    `BodyTooLarge` as soon as the declared length or the bytes read pass it, so a huge or
    endless body is never held (answers from the API, requests to the proxy)."""
    if declared is not None and declared > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in content.iter_chunked(READ_CHUNK_BYTES):
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


class CatalogClient:
    """Calls getCatalogUploadStatus through a shared keep-alive session."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        auth: RequestAuth,
        timeout_seconds: float,
        max_response_bytes: int,
        metrics: ApiMetrics,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._session = session
        self._url = base_url.rstrip("/") + STATUS_PATH
        self._auth = auth
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._max_bytes = max_response_bytes
        self._metrics = metrics
        self._clock = clock
        # The credentials problem last logged: one line per distinct problem, not one per
        # upload per interval (100,000 uploads would log 100,000 identical warnings).
        self._auth_problem: str | None = None

    async def fetch_status(self, ingestion_id: str) -> PollOutcome:
        """Poll one upload; never raises for anything the network or the API does."""
        outcome, _ = await self._poll(ingestion_id)
        return outcome

    async def fetch_report_link(self, ingestion_id: str) -> tuple[PollOutcome, str]:
        """Poll one upload and also hand back its `reportDownloadLink` ("" when none).

        The link is a presigned credential: the caller must never log or print it.
        """
        outcome, payload = await self._poll(ingestion_id)
        if isinstance(outcome, StatusReport) and outcome.report_available:
            return outcome, report_download_link(payload)
        return outcome, ""

    async def _poll(self, ingestion_id: str) -> tuple[PollOutcome, bytes]:
        body = json.dumps({"ingestionId": ingestion_id}).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        try:
            headers.update(await self._auth.headers("POST", self._url, body, headers))
        except AuthUnavailable as exc:
            outcome: PollOutcome = self._auth_failed(exc)
            self._metrics.observe_outcome(outcome)
            return outcome, b""
        if self._auth_problem is not None:
            self._auth_problem = None
            log.info("credentials_available")
        started = self._clock()
        code = "error"
        payload = b""
        try:
            # Never follow a redirect: the next hop would get our credentials (custom headers
            # and X-Amz-Security-Token survive a cross-host redirect) and would answer for us.
            async with self._session.post(
                self._url,
                data=body,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as response:
                code = str(response.status)
                payload = await read_capped(
                    response.content, response.content_length, self._max_bytes
                )
                outcome = classify_response(response.status, payload, response.headers)
        except BodyTooLarge:
            outcome = PollError(
                ErrorKind.MALFORMED_RESPONSE,
                f"body larger than {self._max_bytes} bytes",
                int(code),
            )
        except TimeoutError:
            outcome = PollError(ErrorKind.TIMEOUT, "no complete answer within the timeout")
        except aiohttp.ClientError as exc:
            outcome = PollError(ErrorKind.CONNECTION, clean_text(type(exc).__name__))
        self._metrics.observe_request(code, self._clock() - started)
        self._metrics.observe_outcome(outcome)
        return outcome, payload

    def _auth_failed(self, exc: AuthUnavailable) -> PollError:
        """Count the failure; log it only when the problem is new since the last success."""
        message = clean_text(str(exc))
        self._metrics.auth_errors.labels(exc.kind.value).inc()
        if message != self._auth_problem:
            self._auth_problem = message
            log.warning(
                "credentials_unavailable",
                kind=exc.kind.value,
                message=message,
                consequence="no request is sent until credentials can be obtained; logged "
                "again only when the problem changes",
            )
        return PollError(ErrorKind.UNAUTHORIZED, message, logged=True)
