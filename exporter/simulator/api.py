"""A fake Catalog API (`POST /v1/catalog/getCatalogUploadStatus`) served by a real aiohttp app.

It owns scripted uploads, the API's answers and error bodies as the spec shows them, real
authentication (bearer tokens, SigV4 verified with botocore), a server-side token bucket and
injectable faults. The demo runs it in-process, the test-suite talks to it over loopback and
`python -m exporter.simulator --port N` serves it standalone. It must never block: slow and
hanging answers are asyncio sleeps, so other requests keep being served.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import enum
import hashlib
import hmac
import json
import math
import random
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Final

import botocore.auth
import botocore.credentials
from aiohttp import web
from botocore.awsrequest import AWSRequest

from exporter.auth import AUTH_TYPES
from exporter.models import TERMINAL_STATUSES
from exporter.simulator.fakes3 import (
    DEFAULT_LINK_SECONDS,
    REPORTS_PATH,
    ReportBucket,
    ReportRequest,
)

__all__ = [
    "API_PATH",
    "DEMO_INVALID_IDS",
    "SIMULATOR_KEY",
    "TEST_ACCESS_KEY_ID",
    "TEST_REGION",
    "TEST_SECRET_ACCESS_KEY",
    "UPLOAD_PATHS",
    "Fault",
    "FaultKind",
    "ReceivedUpload",
    "ReportRequest",
    "RequestRecord",
    "SimulatedUpload",
    "Simulator",
    "create_app",
    "demo_uploads",
    "main",
    "random_uploads",
]

TEST_ACCESS_KEY_ID: Final = "AKIDSIMULATOREXAMPLE"
TEST_SECRET_ACCESS_KEY: Final = "simulator/secret/key/EXAMPLE"  # noqa: S105 - a published fake
TEST_REGION: Final = "us-east-1"

API_PATH: Final = "/v1/catalog/getCatalogUploadStatus"
#: Larger request bodies are refused with 413 before anything else is looked at.
MAX_BODY_BYTES: Final = 64 * 1024
#: A "hang" answers 504 after this long if the client is somehow still waiting.
MAX_HANG_SECONDS: Final = 300.0
#: How far X-Amz-Date may be from the simulator's clock, as AWS allows.
MAX_CLOCK_SKEW_SECONDS: Final = 300.0
MAX_INGESTION_ID_LENGTH: Final = 255

StatusValue = str | list[str]
Step = tuple[StatusValue, float]

#: The asynchronous operations: each answers 200 {"ingestionId": ...} with a new id whose
#: status then follows `Simulator.upload_script` (the proxy's tests and the demo use them).
UPLOAD_PATHS: Final = ("/v1/catalog/upload", "/v1/catalog/cart/upload", "/v1/catalog/archive")
#: Largest upload body taken: API Gateway's payload limit (10 MB).
MAX_UPLOAD_BYTES: Final = 10 * 1024 * 1024
#: What a new upload's status does unless a test sets `Simulator.upload_script`.
DEFAULT_UPLOAD_SCRIPT: Final[tuple[Step, ...]] = (
    ("INQUEUE", 2.0),
    ("INPROGRESS", 3.0),
    ("DONE", 0),
)

#: When the request being handled arrived, for its RequestRecord.
_RECEIVED: ContextVar[float] = ContextVar("simulator_request_received")
_PATH: ContextVar[str] = ContextVar("simulator_request_path")

_SIGV4_TIMESTAMP = "%Y%m%dT%H%M%SZ"
_UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
_ERROR_TYPE = "x-amzn-ErrorType"


class FaultKind(enum.StrEnum):
    """What a `Fault` does to the request it is applied to."""

    SERVER_ERROR_JSON = "server_error_json"  # 500 {"errorMsg": ...}
    SERVER_ERROR_HTML = "server_error_html"  # 502 (or `status`) with an HTML page
    THROTTLE = "throttle"  # 429 {key: "Too Many Requests"}, Retry-After if retry_after
    HANG = "hang"  # no answer until the client leaves (at most `seconds`, 300 by default)
    DRIP = "drip"  # 200 and headers at once, then the body one byte every `seconds` (1)
    LATENCY = "latency"  # sleep `seconds` (1 by default), then answer normally
    MALFORMED_JSON = "malformed_json"  # 200 with truncated JSON
    NON_JSON = "non_json"  # 200 text/html
    EMPTY_BODY = "empty_body"  # 200 with an empty body
    WRONG_SHAPE = "wrong_shape"  # 200 JSON without processingStatus (or `body`, e.g. "42")
    RESET = "reset"  # the connection is closed without an answer
    BAD_REQUEST = "bad_request"  # 400 {"message": "Invalid request body"}
    UNEXPECTED_STATUS = "unexpected_status"  # 418 (or `status`, e.g. 302 with Location)
    BIG_BODY = "big_body"  # 200 valid JSON of `size` bytes
    UNAUTHORIZED = "unauthorized"  # 403 {"message": "User: ... is not authorized ..."}
    REDIRECT = "redirect"  # 302 (or `status`, e.g. 307) to `location`, e.g. another server


@dataclass(frozen=True, slots=True)
class Fault:
    """A named misbehaviour applied to a request instead of (or before) the normal answer.

    `status` picks the HTTP status where the kind allows a choice (server errors, unexpected
    status), `body` replaces the default body of kinds that have one. `label` names the fault
    in the request log (the kind by default), e.g. to tell 429s with Retry-After apart.
    `retry_after` is sent as seconds, or verbatim when a string (an HTTP-date); `location` is
    where a redirect points.
    """

    kind: FaultKind | str
    status: int | None = None
    retry_after: float | str | None = None
    seconds: float | None = None
    size: int = 5 * 1024 * 1024
    key: str = "message"
    body: str | None = None
    label: str | None = None
    location: str = "https://signin.example.invalid/login"

    def __post_init__(self) -> None:
        # Accept the plain string too, and refuse an unknown kind here rather than mid-request.
        object.__setattr__(self, "kind", FaultKind(self.kind))
        if self.label is None:
            object.__setattr__(self, "label", str(self.kind))


@dataclass(frozen=True, slots=True)
class SimulatedUpload:
    """An upload whose status follows `script`: (status, seconds) steps, the last forever.

    A status is a string or, as the spec shows, a list of strings. The report link is a fake
    presigned S3 URL, given when the status is terminal and `report` is true.
    """

    ingestion_id: str
    script: Sequence[Step]
    report: bool = True

    def __post_init__(self) -> None:
        if not self.ingestion_id:
            msg = "ingestion_id must not be empty"
            raise ValueError(msg)
        steps = tuple((list(s) if isinstance(s, list) else s, float(t)) for s, t in self.script)
        if not steps:
            msg = f"upload {self.ingestion_id}: script must have at least one step"
            raise ValueError(msg)
        if any(not (t >= 0) for _, t in steps[:-1]):
            msg = f"upload {self.ingestion_id}: step durations must be >= 0"
            raise ValueError(msg)
        object.__setattr__(self, "script", steps)

    def status_at(self, elapsed: float) -> StatusValue:
        """The scripted status `elapsed` seconds after the upload was added."""
        for status, seconds in self.script[:-1]:
            if elapsed < seconds:
                return status
            elapsed -= seconds
        return self.script[-1][0]


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request the simulator received and how it answered.

    `status` is None when it never answered (hang, reset, a drip the client left); `fault` is
    the label of the fault applied (its kind unless labelled). `time` is when the answer was
    logged, `received` when the request arrived (both on the simulator's clock).
    """

    time: float
    ingestion_id: str | None
    status: int | None
    fault: str | None
    auth_ok: bool
    received: float | None = None
    path: str | None = None


@dataclass(frozen=True, slots=True)
class ReceivedUpload:
    """An upload body the simulator took: which operation, the id it answered, the body's
    size and SHA-256 (the body itself is not kept)."""

    path: str
    ingestion_id: str
    size: int
    sha256: str


@dataclass(slots=True)
class _Tracked:
    upload: SimulatedUpload
    started: float
    forced: StatusValue | None = None
    forced_report: bool | None = None
    forced_link: str | None = None


@dataclass(slots=True)
class _Injection:
    fault: Fault
    ingestion_id: str | None
    remaining: int | None


@dataclass(slots=True)
class _TokenBucket:
    rate: float
    burst: float
    clock: Callable[[], float]
    tokens: float = field(init=False)
    last: float = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = self.burst
        self.last = self.clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class _Denied(Exception):
    """An authentication failure, carrying the answer API Gateway would give."""

    def __init__(self, status: int, message: str, error_type: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type


def _is_terminal(status: StatusValue) -> bool:
    values = status if isinstance(status, list) else [status]
    return any(v in TERMINAL_STATUSES for v in values)


def _as_list(status: StatusValue) -> list[str]:
    """The list-valued form of a status, its own value ranked last as the spec's examples."""
    if isinstance(status, list):
        return list(status)
    before = {"INPROGRESS": ["INQUEUE"], "DONE": ["INPROGRESS"], "FATAL": ["CANCELLED"]}
    return [*before.get(status, []), status]


def _origin(request: web.Request) -> str:
    """Where the client reached us: report links point back at this simulator."""
    return f"{request.scheme}://{request.host}"


def _dropped() -> web.Response:
    """What a handler returns for a closed connection: aiohttp cannot send it to anyone."""
    return web.Response(status=500)


async def _wait(request: web.Request, seconds: float) -> bool:
    """Sleep up to `seconds`, less if the app shuts down; False as soon as the client leaves.

    aiohttp does not cancel a handler when its client disconnects, so without this a slow
    answer would outlive its client and hold up the server's shutdown.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        transport = request.transport
        if transport is None or transport.is_closing():
            return False
        if request.app[_RELEASE_KEY].is_set():
            return True
        remaining = deadline - loop.time()
        if remaining <= 0:
            return True
        await asyncio.sleep(min(0.05, remaining))


def _parse_body(body: bytes) -> str | None:
    """The request's ingestionId, or None when the body is not what the API's model wants."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(payload, dict):
        return None
    ingestion_id = payload.get("ingestionId")
    if not isinstance(ingestion_id, str):
        return None
    if not 1 <= len(ingestion_id) <= MAX_INGESTION_ID_LENGTH:
        return None
    return ingestion_id


def _json(
    status: int,
    payload: object,
    *,
    error_type: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    all_headers = {"x-amzn-RequestId": str(uuid.uuid4())}
    if error_type:
        all_headers[_ERROR_TYPE] = error_type
    if headers:
        all_headers.update(headers)
    return web.Response(
        status=status,
        body=json.dumps(payload).encode(),
        content_type="application/json",
        headers=all_headers,
    )


def _raw(status: int, body: str, content_type: str) -> web.Response:
    return web.Response(
        status=status,
        body=body.encode(),
        content_type=content_type,
        headers={"x-amzn-RequestId": str(uuid.uuid4())},
    )


def _bad_request() -> web.Response:
    return _json(400, {"message": "Invalid request body"}, error_type="BadRequestException")


def _server_error_json(fault: Fault) -> web.Response:
    if fault.body is not None:
        return _raw(fault.status or 500, fault.body, "application/json")
    payload = {"errorMsg": "Exception encountered while processing the request"}
    return _json(fault.status or 500, payload, error_type="InternalServerErrorException")


def _server_error_html(fault: Fault) -> web.Response:
    status = fault.status or 502
    reason = web.Response(status=status).reason
    page = (
        f"<html><head><title>{status} {reason}</title></head>"
        f"<body><center><h1>{status} {reason}</h1></center></body></html>\n"
    )
    return _raw(status, page if fault.body is None else fault.body, "text/html")


def _throttle(fault: Fault) -> web.Response:
    retry_after = fault.retry_after
    headers = (
        None
        if retry_after is None
        else {"Retry-After": retry_after if isinstance(retry_after, str) else f"{retry_after:g}"}
    )
    payload = {fault.key: "Too Many Requests"}
    return _json(429, payload, error_type="TooManyRequestsException", headers=headers)


def _unexpected_status(fault: Fault) -> web.Response:
    status = fault.status or 418
    if 300 <= status < 400:
        response = _raw(status, fault.body or "", "text/html")
        response.headers["Location"] = fault.location
        return response
    return _raw(status, fault.body or '{"message": "I\'m a teapot"}', "application/json")


def _redirect(fault: Fault) -> web.Response:
    response = _raw(fault.status or 302, fault.body or "", "text/html")
    response.headers["Location"] = fault.location
    return response


def _big_body(fault: Fault) -> web.Response:
    head = '{"processingStatus": "INPROGRESS", "reportDownloadLink": "", "padding": "'
    tail = '"}'
    padding = "x" * max(0, fault.size - len(head) - len(tail))
    return _raw(200, head + padding + tail, "application/json")


def _unauthorized(fault: Fault) -> web.Response:
    message = (
        "User: arn:aws:sts::123456789012:assumed-role/catalog-exporter/session is not "
        "authorized to perform: execute-api:Invoke on resource: arn:aws:execute-api:"
        "us-east-1:********9012:abcdef1234/prod/POST/v1/catalog/getCatalogUploadStatus"
    )
    payload = {"message": fault.body or message}
    return _json(403, payload, error_type="AccessDeniedException")


def _body_200(default: str, content_type: str) -> Callable[[Fault], web.Response]:
    def answer(fault: Fault) -> web.Response:
        return _raw(200, default if fault.body is None else fault.body, content_type)

    return answer


#: The answer of each fault kind that answers at once (hang, latency and reset act instead).
_CANNED: Final[dict[FaultKind, Callable[[Fault], web.Response]]] = {
    FaultKind.SERVER_ERROR_JSON: _server_error_json,
    FaultKind.SERVER_ERROR_HTML: _server_error_html,
    FaultKind.THROTTLE: _throttle,
    FaultKind.MALFORMED_JSON: _body_200(
        '{"processingStatus": "INPROGRESS", "reportDown', "application/json"
    ),
    FaultKind.NON_JSON: _body_200(
        "<html><body><h1>Service Unavailable</h1></body></html>\n", "text/html"
    ),
    FaultKind.EMPTY_BODY: _body_200("", "application/json"),
    FaultKind.WRONG_SHAPE: _body_200(
        '{"status": "DONE", "reportDownloadLink": ""}', "application/json"
    ),
    FaultKind.BAD_REQUEST: lambda fault: _bad_request(),
    FaultKind.UNEXPECTED_STATUS: _unexpected_status,
    FaultKind.BIG_BODY: _big_body,
    FaultKind.UNAUTHORIZED: _unauthorized,
    FaultKind.REDIRECT: _redirect,
}


def _canned(fault: Fault) -> web.Response:
    return _CANNED[FaultKind(fault.kind)](fault)


class Simulator:
    """The state behind the fake API: uploads, accepted credentials, limits, faults, a log.

    `token_header` is where bearer tokens are expected: `Authorization: Bearer <token>`, or
    the bare token in a header of the gateway's own such as X-Api-Key.
    `clock` drives upload scripts and the rate limiter (inject a fake one in tests);
    `wall_clock` is what X-Amz-Date is compared with. `on_request` is called with each
    `RequestRecord` (the CLI's --log-requests); `max_records` bounds `requests`.
    """

    def __init__(
        self,
        *,
        rate_limit: float | None = 10.0,
        burst: float | None = None,
        auth: str = "none",
        tokens: Iterable[str] = (),
        token_header: str = "Authorization",  # noqa: S107 - a header's name, not a secret
        credentials: Mapping[str, str] | None = None,
        region: str = TEST_REGION,
        error_rate: float = 0.0,
        malformed_rate: float = 0.0,
        latency: float = 0.0,
        list_status_rate: float = 0.0,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        on_request: Callable[[RequestRecord], None] | None = None,
        max_records: int | None = None,
        report_link_seconds: float = DEFAULT_LINK_SECONDS,
        report_bytes: int = 0,
        report_chunked: bool = False,
    ) -> None:
        if auth not in AUTH_TYPES:
            msg = f"unknown auth mode {auth!r}: expected one of {', '.join(AUTH_TYPES)}"
            raise ValueError(msg)
        for name, rate in (
            ("error_rate", error_rate),
            ("malformed_rate", malformed_rate),
            ("list_status_rate", list_status_rate),
        ):
            if not 0.0 <= rate <= 1.0:
                msg = f"{name} must be between 0 and 1, got {rate}"
                raise ValueError(msg)
        if latency < 0:
            msg = f"latency must be >= 0, got {latency}"
            raise ValueError(msg)
        self.auth = auth
        self.region = region
        self.requests: list[RequestRecord] = []
        # Requests whose handling has begun and not ended (a hang or drip the client left ends
        # when the simulator notices it gone): 0 once every request received is in `requests`.
        self._in_flight = 0
        self._tokens = frozenset(tokens)
        self._token_header = token_header
        self._credentials = dict(
            {TEST_ACCESS_KEY_ID: TEST_SECRET_ACCESS_KEY} if credentials is None else credentials
        )
        self._error_rate = error_rate
        self._malformed_rate = malformed_rate
        self._latency = latency
        self._list_status_rate = list_status_rate
        # Seeded, not secret: it only decides which requests get a simulated fault.
        self._rng = random.Random(seed)  # noqa: S311
        self._clock = clock
        self._wall_clock = wall_clock
        self._on_request = on_request
        self._max_records = max_records
        self._bucket = (
            _TokenBucket(rate_limit, max(1.0, burst or rate_limit), clock)
            if rate_limit is not None and rate_limit > 0
            else None
        )
        self._throttled = 0
        self._uploads: dict[str, _Tracked] = {}
        #: The script each upload created through UPLOAD_PATHS follows; its ids are
        #: `sim-upload-000001`, `-000002`... in creation order.
        self.upload_script: Sequence[Step] = DEFAULT_UPLOAD_SCRIPT
        #: Every upload body taken (a signature checked, an id answered), in order.
        self.received_uploads: list[ReceivedUpload] = []
        self._created = 0
        self._injections: list[_Injection] = []
        self._chaos: list[tuple[Fault, float]] = []
        #: The reports behind the links; `reports.requests` records who asked, with what.
        self.reports = ReportBucket(
            wall_clock=wall_clock,
            link_seconds=report_link_seconds,
            report_bytes=report_bytes,
            chunked=report_chunked,
            secret_values=lambda: (*self._tokens, *self._credentials, *self._credentials.values()),
        )

    # -- uploads -----------------------------------------------------------------------------

    def add_upload(
        self, ingestion_id: str, script: Sequence[Step], *, report: bool = True
    ) -> SimulatedUpload:
        """Track a new upload whose script starts now (replacing one with the same id)."""
        upload = SimulatedUpload(ingestion_id, script, report)
        self.add_uploads([upload])
        return upload

    def add_uploads(self, uploads: Iterable[SimulatedUpload]) -> None:
        """Track several uploads, their scripts all starting now."""
        now = self._clock()
        for upload in uploads:
            self._uploads[upload.ingestion_id] = _Tracked(upload, now)

    def set_status(
        self, ingestion_id: str, status: StatusValue, report: bool | None = None
    ) -> None:
        """Answer `status` for this upload from now on, whatever its script says.

        `report`: None gives the link when the status is terminal, True always, False never.
        Raises KeyError for an id that was never added.
        """
        tracked = self._uploads[ingestion_id]
        tracked.forced = list(status) if isinstance(status, list) else status
        tracked.forced_report = report

    def set_report_link(self, ingestion_id: str, link: str | None) -> None:
        """Give exactly `link` as this upload's reportDownloadLink whenever a link is given,
        instead of a signed one to this simulator (None: signed ones again): a hostile or
        broken API. Raises KeyError for an id that was never added."""
        self._uploads[ingestion_id].forced_link = link

    def has_upload(self, ingestion_id: str) -> bool:
        """Whether this id was added (and not removed)."""
        return ingestion_id in self._uploads

    def remove_upload(self, ingestion_id: str) -> None:
        """Forget an upload: its id becomes invalid (400). Unknown ids are ignored."""
        self._uploads.pop(ingestion_id, None)

    def current(
        self, ingestion_id: str, origin: str = "http://127.0.0.1"
    ) -> tuple[StatusValue, str]:
        """The (processingStatus, reportDownloadLink) the API would answer now.

        The link points at `origin`'s report endpoint and is signed to expire.
        """
        tracked = self._uploads[ingestion_id]
        if tracked.forced is not None:
            status = tracked.forced
            report = tracked.forced_report
            give = _is_terminal(status) if report is None else report
        else:
            status = tracked.upload.status_at(self._clock() - tracked.started)
            give = tracked.upload.report and _is_terminal(status)
        if not give:
            return status, ""
        if tracked.forced_link is not None:
            return status, tracked.forced_link
        return status, self.reports.link(origin, ingestion_id)

    # -- faults and credentials --------------------------------------------------------------

    def inject(
        self, fault: Fault, *, ingestion_id: str | None = None, count: int | None = None
    ) -> None:
        """Apply `fault` to the next `count` matching requests (None: until clear_faults()).

        A fault for a specific ingestionId takes precedence over one for any request.
        """
        if count is not None and count < 1:
            msg = f"count must be >= 1 or None, got {count}"
            raise ValueError(msg)
        self._injections.append(_Injection(fault, ingestion_id, count))

    def set_chaos(self, mix: Iterable[tuple[Fault, float]]) -> None:
        """From now on give each request `fault` with its probability, at most one per request.

        Faults injected with `inject` come first; `clear_faults()` ends the chaos too.
        """
        chosen = list(mix)
        if any(not 0.0 <= p <= 1.0 for _, p in chosen) or sum(p for _, p in chosen) > 1.0:
            msg = "chaos probabilities must be between 0 and 1 and sum to at most 1"
            raise ValueError(msg)
        self._chaos = chosen

    def clear_faults(self) -> None:
        """Remove every injected fault, and the chaos mix."""
        self._injections.clear()
        self._chaos = []

    def set_tokens(self, tokens: Iterable[str]) -> None:
        """Accept only these bearer tokens from now on (a rotation)."""
        self._tokens = frozenset(tokens)

    # -- the request log ---------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """How many requests are being handled now (received, not yet ended)."""
        return self._in_flight

    def count(
        self,
        *,
        ingestion_id: str | None = None,
        status: int | None = None,
        auth_ok: bool | None = None,
    ) -> int:
        """How many logged requests match every filter given."""
        return sum(
            1
            for r in self.requests
            if (ingestion_id is None or r.ingestion_id == ingestion_id)
            and (status is None or r.status == status)
            and (auth_ok is None or r.auth_ok == auth_ok)
        )

    def _record(
        self,
        ingestion_id: str | None,
        status: int | None,
        fault: str | None,
        *,
        auth_ok: bool = True,
    ) -> None:
        received = _RECEIVED.get(None)
        path = _PATH.get(None)
        record = RequestRecord(self._clock(), ingestion_id, status, fault, auth_ok, received, path)
        self.requests.append(record)
        if self._max_records is not None and len(self.requests) > self._max_records * 1.1:
            del self.requests[: len(self.requests) - self._max_records]
        if self._on_request is not None:
            self._on_request(record)

    def _answered(
        self,
        response: web.Response,
        ingestion_id: str | None,
        fault: str | None,
        *,
        auth_ok: bool = True,
    ) -> web.Response:
        self._record(ingestion_id, response.status, fault, auth_ok=auth_ok)
        return response

    # -- handling ----------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer one request to the app (other than /healthz), counted in `in_flight` while
        it is handled."""
        self._in_flight += 1
        try:
            return await self._handle(request)
        finally:
            self._in_flight -= 1

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        _RECEIVED.set(self._clock())  # each request is handled in a task, a context, of its own
        _PATH.set(request.path)
        if request.method == "POST" and request.path.endswith(UPLOAD_PATHS):
            return await self._create_upload(request)
        # API Gateway serves a stage under a prefix (/prod/v1/...), and answers any unknown
        # route or method with this 403 rather than a 404.
        if request.method != "POST" or not request.path.endswith(API_PATH):
            response = _json(
                403,
                {"message": "Missing Authentication Token"},
                error_type="MissingAuthenticationTokenException",
            )
            return self._answered(response, None, None, auth_ok=False)
        body = await request.content.read(MAX_BODY_BYTES + 1)
        while len(body) <= MAX_BODY_BYTES and not request.content.at_eof():
            chunk = await request.content.read(MAX_BODY_BYTES + 1 - len(body))
            if not chunk:
                break
            body += chunk
        if len(body) > MAX_BODY_BYTES:
            return self._answered(
                _json(413, {"message": "Request Too Long"}, error_type="RequestTooLongException"),
                None,
                None,
            )
        ingestion_id = _parse_body(body)
        try:
            self._authenticate(request, body)
        except _Denied as denied:
            response = _json(
                denied.status, {"message": denied.message}, error_type=denied.error_type
            )
            return self._answered(response, ingestion_id, None, auth_ok=False)

        injected = self._take_fault(ingestion_id) or self._draw_chaos()
        if injected is not None:
            return await self._apply_fault(request, injected, ingestion_id)
        return await self._answer(request, ingestion_id, None)

    async def _create_upload(self, request: web.Request) -> web.StreamResponse:
        """An asynchronous operation: authenticated and rate-limited like a poll, then a new
        id whose status follows `upload_script`. Faults injected for the operation's path
        (`inject(fault, ingestion_id="/v1/catalog/upload")`) or for any request apply first,
        those that answer at once only."""
        body = await request.content.read(MAX_UPLOAD_BYTES + 1)
        while len(body) <= MAX_UPLOAD_BYTES and not request.content.at_eof():
            chunk = await request.content.read(MAX_UPLOAD_BYTES + 1 - len(body))
            if not chunk:
                break
            body += chunk
        if len(body) > MAX_UPLOAD_BYTES:
            response = _json(
                413, {"message": "Request Too Long"}, error_type="RequestTooLongException"
            )
            return self._answered(response, None, None)
        try:
            self._authenticate(request, body)
        except _Denied as denied:
            response = _json(
                denied.status, {"message": denied.message}, error_type=denied.error_type
            )
            return self._answered(response, None, None, auth_ok=False)
        operation = next(p for p in UPLOAD_PATHS if request.path.endswith(p))
        fault = self._take_fault(operation)
        if fault is not None and FaultKind(fault.kind) in _CANNED:
            return self._answered(_canned(fault), None, fault.label)
        if self._bucket is not None and not self._bucket.take():
            return self._answered(self._throttle_response(), None, None)
        self._created += 1
        ingestion_id = f"sim-upload-{self._created:06d}"
        self.add_upload(ingestion_id, self.upload_script)
        digest = hashlib.sha256(body).hexdigest()
        self.received_uploads.append(ReceivedUpload(operation, ingestion_id, len(body), digest))
        return self._answered(_json(200, {"ingestionId": ingestion_id}), ingestion_id, None)

    def _take_fault(self, ingestion_id: str | None) -> Fault | None:
        chosen = None
        if ingestion_id is not None:
            chosen = next((i for i in self._injections if i.ingestion_id == ingestion_id), None)
        if chosen is None:
            chosen = next((i for i in self._injections if i.ingestion_id is None), None)
        if chosen is None:
            return None
        if chosen.remaining is not None:
            chosen.remaining -= 1
            if chosen.remaining <= 0:
                self._injections.remove(chosen)
        return chosen.fault

    def _draw_chaos(self) -> Fault | None:
        if not self._chaos:
            return None
        draw = self._rng.random()
        for fault, probability in self._chaos:
            if draw < probability:
                return fault
            draw -= probability
        return None

    async def _answer(
        self, request: web.Request, ingestion_id: str | None, fault: str | None
    ) -> web.StreamResponse:
        """The normal path: latency, rate limit, validation, random faults, the status."""
        if self._latency > 0:
            delay = self._latency * self._rng.uniform(0.5, 1.5)
            if not await self._delay(request, delay, ingestion_id, fault):
                return _dropped()
        if self._bucket is not None and not self._bucket.take():
            return self._answered(self._throttle_response(), ingestion_id, fault)
        if ingestion_id is None:
            return self._answered(_bad_request(), None, fault)
        chance = self._random_fault()
        if chance is not None:
            return self._answered(_canned(chance), ingestion_id, chance.label)
        if ingestion_id not in self._uploads:
            response = _json(
                400,
                {"errorMsg": "API invoked with Invalid parameter"},
                error_type="InvalidRequestException",
            )
            return self._answered(response, ingestion_id, fault)
        processing_status, link = self.current(ingestion_id, _origin(request))
        if self._list_status_rate > 0 and self._rng.random() < self._list_status_rate:
            processing_status = _as_list(processing_status)
        payload = {"processingStatus": processing_status, "reportDownloadLink": link}
        response = _json(200, payload)
        return self._answered(response, ingestion_id, fault)

    def _random_fault(self) -> Fault | None:
        """A server error or a broken 200 as often as error_rate and malformed_rate say."""
        if self._error_rate > 0 and self._rng.random() < self._error_rate:
            kind = self._rng.choice([FaultKind.SERVER_ERROR_JSON, FaultKind.SERVER_ERROR_HTML])
            code = self._rng.choice([502, 503]) if kind == FaultKind.SERVER_ERROR_HTML else None
            return Fault(kind, code)
        if self._malformed_rate > 0 and self._rng.random() < self._malformed_rate:
            broken = [
                FaultKind.MALFORMED_JSON,
                FaultKind.NON_JSON,
                FaultKind.EMPTY_BODY,
                FaultKind.WRONG_SHAPE,
            ]
            return Fault(self._rng.choice(broken))
        return None

    def _throttle_response(self) -> web.Response:
        # The spec shows both bodies; real gateways add Retry-After only sometimes.
        n = self._throttled
        self._throttled += 1
        key = "message" if n % 2 == 0 else "errorMsg"
        headers = {"Retry-After": "1"} if n % 3 == 0 else None
        return _json(
            429, {key: "Too Many Requests"}, error_type="TooManyRequestsException", headers=headers
        )

    async def _apply_fault(
        self, request: web.Request, fault: Fault, ingestion_id: str | None
    ) -> web.StreamResponse:
        kind = FaultKind(fault.kind)
        label = fault.label
        if kind == FaultKind.LATENCY:
            seconds = 1.0 if fault.seconds is None else fault.seconds
            if not await self._delay(request, seconds, ingestion_id, label):
                return _dropped()
            return await self._answer(request, ingestion_id, label)
        if kind == FaultKind.HANG:
            self._record(ingestion_id, None, label)
            await _wait(request, MAX_HANG_SECONDS if fault.seconds is None else fault.seconds)
            return _json(504, {"message": "Endpoint request timed out"})
        if kind == FaultKind.DRIP:
            return await self._drip(request, fault, ingestion_id)
        if kind == FaultKind.RESET:
            self._record(ingestion_id, None, label)
            if request.transport is not None:
                request.transport.close()
            return _dropped()
        return self._answered(_canned(fault), ingestion_id, label)

    async def _drip(
        self, request: web.Request, fault: Fault, ingestion_id: str | None
    ) -> web.StreamResponse:
        """Send 200 and the headers, then a valid body one byte at a time.

        Logged as answered (200) only if the client stayed for the last byte.
        """
        status, link = (
            self.current(ingestion_id, _origin(request))
            if ingestion_id in self._uploads
            else ("", "")
        )
        body = json.dumps({"processingStatus": status, "reportDownloadLink": link}).encode()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(body)
        interval = 1.0 if fault.seconds is None else fault.seconds
        try:
            await response.prepare(request)
            for i in range(len(body)):
                if not await _wait(request, interval):
                    self._record(ingestion_id, None, fault.label)
                    return response
                await response.write(body[i : i + 1])
        except ConnectionError:
            self._record(ingestion_id, None, fault.label)
            return response
        except asyncio.CancelledError:  # servers made with handler_cancellation=True
            self._record(ingestion_id, None, fault.label)
            raise
        self._record(ingestion_id, 200, fault.label)
        return response

    async def _delay(
        self, request: web.Request, seconds: float, ingestion_id: str | None, fault: str | None
    ) -> bool:
        """Sleep before answering; False, logged as unanswered, when the client left."""
        try:
            if await _wait(request, seconds):
                return True
        except asyncio.CancelledError:  # servers made with handler_cancellation=True
            self._record(ingestion_id, None, fault)
            raise
        self._record(ingestion_id, None, fault)
        return False

    # -- authentication ----------------------------------------------------------------------

    def _authenticate(self, request: web.Request, body: bytes) -> None:
        """Raise `_Denied` unless the request carries valid credentials for the mode."""
        if self.auth == "bearer":
            self._check_bearer(request)
        elif self.auth == "sigv4":
            self._check_sigv4(request, body)

    def _check_bearer(self, request: web.Request) -> None:
        if self._token_header.lower() == "authorization":
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        else:  # a gateway's own header (X-Api-Key...) carries the bare token
            scheme, token = "bearer", request.headers.get(self._token_header, "")
        given = token.strip().encode("utf-8", "surrogateescape")
        # Compare against every accepted token so the time taken says nothing about which.
        matches = [hmac.compare_digest(given, t.encode()) for t in self._tokens]
        if scheme.lower() != "bearer" or not any(matches):
            raise _Denied(401, "Unauthorized", "UnauthorizedException")

    def _check_sigv4(self, request: web.Request, body: bytes) -> None:  # noqa: PLR0912 - a check per way to fail
        header = request.headers.get("Authorization")
        if not header:
            raise _Denied(
                403, "Missing Authentication Token", "MissingAuthenticationTokenException"
            )
        algorithm, _, rest = header.strip().partition(" ")
        params: dict[str, str] = {}
        for part in rest.split(","):
            name, sep, value = part.strip().partition("=")
            if sep:
                params[name] = value
        scope = params.get("Credential", "").split("/")
        if (
            algorithm != "AWS4-HMAC-SHA256"
            or not {"Credential", "SignedHeaders", "Signature"} <= params.keys()
            or len(scope) != 5
        ):
            raise _Denied(
                403,
                "Authorization header requires 'Credential', 'SignedHeaders' and 'Signature' "
                "parameters in the form AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., "
                "Signature=...",
                "IncompleteSignatureException",
            )
        access_key, scope_date, region, service, terminator = scope
        secret = self._credentials.get(access_key)
        if secret is None:
            raise _Denied(
                403,
                "The security token included in the request is invalid.",
                "UnrecognizedClientException",
            )
        if service != "execute-api" or terminator != "aws4_request":
            raise _Denied(
                403,
                "Credential should be scoped to correct service: 'execute-api'.",
                "InvalidSignatureException",
            )
        if region != self.region:
            raise _Denied(
                403,
                f"Credential should be scoped to a valid region, not '{region}'.",
                "InvalidSignatureException",
            )
        amz_date = request.headers.get("X-Amz-Date", "")
        try:
            signed_at = dt.datetime.strptime(amz_date, _SIGV4_TIMESTAMP).replace(tzinfo=dt.UTC)
        except ValueError:
            raise _Denied(
                403,
                "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' "
                "header.",
                "IncompleteSignatureException",
            ) from None
        skew = signed_at.timestamp() - self._wall_clock()
        if abs(skew) > MAX_CLOCK_SKEW_SECONDS:
            what = "Signature expired" if skew < 0 else "Signature not yet current"
            raise _Denied(
                403,
                f"{what}: {amz_date} is more than {MAX_CLOCK_SKEW_SECONDS:.0f} s from the "
                "server's time.",
                "InvalidSignatureException",
            )
        if scope_date != amz_date[:8]:
            raise _Denied(
                403,
                "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of "
                "date from HTTP.",
                "InvalidSignatureException",
            )
        signed_headers = params["SignedHeaders"].split(";")
        if "host" not in signed_headers:
            raise _Denied(
                403,
                "'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization.",
                "InvalidSignatureException",
            )
        mismatch = _Denied(
            403,
            "The request signature we calculated does not match the signature you provided. "
            "Check your AWS Secret Access Key and signing method. Consult the service "
            "documentation for details.",
            "InvalidSignatureException",
        )
        content_sha = request.headers.get("X-Amz-Content-Sha256")
        if content_sha not in (None, _UNSIGNED_PAYLOAD, hashlib.sha256(body).hexdigest()):
            raise mismatch
        url = f"{request.scheme}://{request.host}{request.raw_path}"
        aws_request = AWSRequest(method=request.method, url=url, data=body)
        for name in signed_headers:
            values = request.headers.getall(name, [])
            if not values:
                raise mismatch
            for value in values:
                aws_request.headers[name] = value
        aws_request.context["timestamp"] = amz_date
        signer = botocore.auth.SigV4Auth(
            botocore.credentials.Credentials(access_key, secret), service, region
        )
        canonical = signer.canonical_request(aws_request)
        expected = signer.signature(signer.string_to_sign(aws_request, canonical), aws_request)
        provided = params["Signature"].encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(expected.encode(), provided):
            raise mismatch


SIMULATOR_KEY: Final = web.AppKey("simulator", Simulator)


#: Set when the app shuts down, so slow and hanging requests end instead of delaying it.
_RELEASE_KEY: Final = web.AppKey("simulator_release_hangs", asyncio.Event)


async def _dispatch(request: web.Request) -> web.StreamResponse:
    return await request.app[SIMULATOR_KEY].handle(request)


async def _report(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIMULATOR_KEY]
    return await sim.reports.handle(request, sim.has_upload)


async def _healthz(request: web.Request) -> web.Response:
    return _json(200, {"status": "ok"})


async def _on_shutdown(app: web.Application) -> None:
    app[_RELEASE_KEY].set()


def create_app(sim: Simulator) -> web.Application:
    """The fake API as an aiohttp app: POST .../v1/catalog/getCatalogUploadStatus, GET /healthz."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[SIMULATOR_KEY] = sim
    app.router.add_get("/healthz", _healthz)
    app.router.add_get(REPORTS_PATH + "/{key}", _report)
    app.router.add_route("*", "/{tail:.*}", _dispatch)
    app[_RELEASE_KEY] = asyncio.Event()
    app.on_shutdown.append(_on_shutdown)
    return app


# -- scripted uploads ------------------------------------------------------------------------

#: Ids the demo polls that the simulator does not know: the API answers 400 errorMsg.
DEMO_INVALID_IDS: Final[tuple[str, ...]] = ("demo-unknown-upload", "demo-typo-0000")


def demo_uploads() -> list[SimulatedUpload]:
    """A dozen uploads that, polled every 2 s, show every exposed status within ~40 s.

    Each status is first reached within ~12 s, so a demo shows them all quickly; a few
    uploads keep changing until ~40 s so the dashboard stays alive for a while.
    """
    inf = math.inf
    return [
        SimulatedUpload("demo-done-fast", [("INQUEUE", 4), ("INPROGRESS", 6), ("DONE", inf)]),
        SimulatedUpload("demo-done-slow", [("INQUEUE", 12), ("INPROGRESS", 22), ("DONE", inf)]),
        SimulatedUpload(
            "demo-done-no-report",
            [("INQUEUE", 6), ("INPROGRESS", 10), ("DONE", inf)],
            report=False,
        ),
        SimulatedUpload("demo-fatal", [("INQUEUE", 4), ("INPROGRESS", 6), ("FATAL", inf)]),
        SimulatedUpload("demo-fatal-late", [("INPROGRESS", 30), ("FATAL", inf)]),
        SimulatedUpload("demo-cancelled", [("INQUEUE", 10), ("CANCELLED", inf)]),
        SimulatedUpload(
            "demo-list-status",
            [(["INQUEUE", "INPROGRESS"], 12), (["CANCELLED", "FATAL"], inf)],
        ),
        SimulatedUpload("demo-stuck-inprogress", [("INQUEUE", 4), ("INPROGRESS", inf)]),
        SimulatedUpload("demo-stuck-inqueue", [("INQUEUE", inf)]),
        SimulatedUpload(
            "demo-partially-done", [("INQUEUE", 4), ("INPROGRESS", 10), ("PARTIALLY_DONE", inf)]
        ),
        SimulatedUpload("demo-odd-status", [("INPROGRESS", 8), ("in progress (50%)", inf)]),
        SimulatedUpload("demo-done-late", [("INQUEUE", 20), ("INPROGRESS", 18), ("DONE", inf)]),
    ]


def random_uploads(n: int, *, seed: int | None = None) -> list[SimulatedUpload]:
    """`n` uploads "sim-000001"... going INQUEUE -> INPROGRESS -> DONE (mostly) over minutes."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible script, not a secret
    uploads = []
    for i in range(1, n + 1):
        end = rng.choices(["DONE", "FATAL", "CANCELLED"], weights=[8, 1, 1])[0]
        script: list[Step] = [
            ("INQUEUE", round(rng.uniform(5, 120), 1)),
            ("INPROGRESS", round(rng.uniform(30, 600), 1)),
            (end, math.inf),
        ]
        uploads.append(SimulatedUpload(f"sim-{i:06d}", script))
    return uploads


# -- command line ----------------------------------------------------------------------------


def _uploads_arg(value: str) -> str:
    if value == "demo" or (value.isdigit() and int(value) >= 0):
        return value
    msg = f"expected 'demo' or a number of uploads, got {value!r}"
    raise argparse.ArgumentTypeError(msg)


def _rate_arg(value: str) -> float:
    rate = float(value)
    if not 0.0 <= rate <= 1.0:
        msg = f"expected a probability between 0 and 1, got {value}"
        raise argparse.ArgumentTypeError(msg)
    return rate


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m exporter.simulator",
        description="A fake HAQM Catalog API (getCatalogUploadStatus) for demos and tests.",
        epilog=(
            f"SigV4 test credentials (public, for tests only): access key {TEST_ACCESS_KEY_ID}, "
            f"secret key {TEST_SECRET_ACCESS_KEY}, region {TEST_REGION}, service execute-api. "
            "Ids it knows with --uploads demo: "
            + ", ".join(u.ingestion_id for u in demo_uploads())
            + "; any other id is answered 400 (INVALID)."
        ),
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)"
    )
    parser.add_argument("--port", type=int, required=True, help="port to listen on (0: any)")
    parser.add_argument(
        "--rate-limit",
        type=float,
        default=10.0,
        help="requests/s before 429 (default: 10; 0 disables)",
    )
    parser.add_argument(
        "--burst", type=float, default=None, help="token bucket size (default: the rate)"
    )
    parser.add_argument(
        "--auth",
        choices=AUTH_TYPES,
        default="none",
        help="what a request must carry: nothing (the default), a bearer token from "
        "--token-file, or a SigV4 signature made with the test credentials below (401/403 "
        "otherwise)",
    )
    parser.add_argument(
        "--token-file", default=None, help="bearer tokens accepted, one per line (read once)"
    )
    parser.add_argument(
        "--error-rate",
        type=_rate_arg,
        default=0.0,
        help="probability (0 to 1) of a 5xx answer, JSON or HTML (default: 0)",
    )
    parser.add_argument(
        "--malformed-rate",
        type=_rate_arg,
        default=0.0,
        help="probability (0 to 1) that a request gets a broken 200 (bad JSON, not JSON, "
        "empty, or the wrong shape; default: 0)",
    )
    parser.add_argument(
        "--latency", type=float, default=0.0, help="mean delay in seconds (default: 0)"
    )
    parser.add_argument(
        "--list-status-rate",
        type=_rate_arg,
        default=0.0,
        help="probability (0 to 1) of processingStatus sent as a list (default: 0)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="random seed, for repeatable faults and uploads"
    )
    parser.add_argument(
        "--uploads",
        type=_uploads_arg,
        default="demo",
        help="'demo' (the default: the demo's scripted uploads, listed below) or a number N "
        "of random uploads named sim-000001 to sim-N",
    )
    parser.add_argument(
        "--log-requests", action="store_true", help="print one JSON line per request to stderr"
    )
    return parser


def _log_record(record: RequestRecord) -> None:
    print(json.dumps(asdict(record)), file=sys.stderr, flush=True)


async def _serve(sim: Simulator, host: str, port: int, description: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(create_app(sim), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        print(
            f"Catalog API simulator listening on http://{shown}:{bound_port} ({description})",
            flush=True,
        )
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulator until SIGINT or SIGTERM; 0 on a clean stop."""
    parser = _parser()
    args = parser.parse_args(argv)
    tokens: list[str] = []
    if args.token_file is not None:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                tokens = [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            parser.error(f"cannot read --token-file {args.token_file}: {exc}")
    if args.auth == "bearer" and not tokens:
        parser.error("--auth bearer needs --token-file with at least one token")
    if args.latency < 0:
        parser.error("--latency must be >= 0")
    sim = Simulator(
        rate_limit=args.rate_limit if args.rate_limit > 0 else None,
        burst=args.burst,
        auth=args.auth,
        tokens=tokens,
        error_rate=args.error_rate,
        malformed_rate=args.malformed_rate,
        latency=args.latency,
        list_status_rate=args.list_status_rate,
        seed=args.seed,
        on_request=_log_record if args.log_requests else None,
        max_records=10_000,
    )
    if args.uploads == "demo":
        uploads = demo_uploads()
    else:
        uploads = random_uploads(int(args.uploads), seed=args.seed)
    sim.add_uploads(uploads)
    description = f"auth={args.auth}, {len(uploads)} uploads"
    try:
        asyncio.run(_serve(sim, args.host, args.port, description))
    except OSError as exc:
        print(f"simulator: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the loop's own handler was installed
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
