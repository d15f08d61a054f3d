"""The admin HTTP API: register, list, show and delete tracked ingestionIds, over JSON.

It runs on a listener of its own (loopback by default: in a sidecar the app reaches it on
localhost) and owns only the HTTP side: routes, status codes, the optional bearer token.
What goes over the wire (the bodies, the paths, the page limits, the OpenAPI document) is
described once, in `admin_schema`. Every decision about ids (validation, labels, cap,
persistence) belongs to the `IngestionTracker`; this module never touches the store or the
state file.

Every answer is JSON, errors included: `{"error": "<code>", "message": "<text>"}` with a 4xx
or 5xx status, never an HTML page or a traceback. A 2xx to a POST or DELETE is an
acknowledgement: the tracker returns only once the state file holding the change is on disk.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import structlog
from aiohttp import web
from pydantic import BaseModel, TypeAdapter, ValidationError

from exporter import admin_schema as schema
from exporter.admin_schema import (
    DEFAULT_PAGE_SIZE,
    HEALTH_PATH,
    INGESTIONS_PATH,
    MAX_PAGE_EXAMINED,
    MAX_PAGE_SIZE,
    MAX_REPORTS_IN_FLIGHT,
    OPENAPI_PATH,
    REPORTS_RETRY_AFTER_SECONDS,
    openapi_document,
)
from exporter.auth import AuthUnavailable, BearerAuth
from exporter.config import ServerConfig, is_loopback_host
from exporter.models import MAX_INGESTION_ID_LENGTH, MAX_REGISTRATION_BYTES
from exporter.report import (
    ReportFailure,
    ReportOutcome,
    ReportProblem,
    ReportSource,
    ResponseSink,
)
from exporter.state import StateError
from exporter.tracking import IngestionTracker, RejectReason, Source, UploadView

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_EXAMINED",
    "MAX_PAGE_SIZE",
    "create_admin_app",
    "openapi_document",
    "view_body",
]

log = structlog.get_logger("exporter.admin")

TRACKER = web.AppKey("admin_tracker", IngestionTracker)
TOKEN = web.AppKey("admin_token", BearerAuth)
BODY_TIMEOUT = web.AppKey("admin_body_timeout", float)
ALLOWED_HOSTS = web.AppKey("admin_allowed_hosts", frozenset[str])
REPORTS = web.AppKey[ReportSource]("admin_reports")


@dataclass(slots=True)
class _ReportSlots:
    """Report requests being served now, out of `limit`."""

    limit: int
    taken: int = 0


REPORT_SLOTS = web.AppKey("admin_report_slots", _ReportSlots)
#: How often a report request checks that its client is still there. aiohttp's own
#: `handler_cancellation` would cancel every admin handler on a disconnect (a POST waiting
#: for its fsync too) and is a switch of whoever serves the app; this is the route's own.
_CLIENT_CHECK_SECONDS = 0.5

#: Reachable without the token: probes and API discovery must work before a client has one.
_OPEN_PATHS = frozenset({HEALTH_PATH, OPENAPI_PATH})

_LIST_PARAMETERS = ("status", "limit", "cursor")

_HTTP_ERROR_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    421: "misdirected_request",
}

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_admin_app(
    tracker: IngestionTracker,
    *,
    token_file: str = "",
    body_timeout: float = ServerConfig().idle_timeout_seconds,
    allowed_hosts: Iterable[str] = (),
    reports: ReportSource | None = None,
) -> web.Application:
    """The admin API as an aiohttp app; with `token_file`, requests need its bearer token.

    A request body not received within `body_timeout` seconds is answered 408. Only requests
    whose Host is a loopback name or address, or one of `allowed_hosts`, are served. `reports`
    fetches processing reports (GET .../{id}/report); without it that route answers 503.
    """
    app = web.Application(
        client_max_size=MAX_REGISTRATION_BYTES,
        middlewares=[_json_errors, _check_host, _authenticate],
    )
    app[TRACKER] = tracker
    app[BODY_TIMEOUT] = body_timeout
    app[ALLOWED_HOSTS] = frozenset(_normal_host(name) for name in allowed_hosts)
    if reports is not None:
        app[REPORTS] = reports
    app[REPORT_SLOTS] = _ReportSlots(MAX_REPORTS_IN_FLIGHT)
    if token_file:
        # scheme="" makes BearerAuth hand back the bare token, read (and re-read whenever the
        # file changes) by the same code that authenticates the exporter's own requests.
        app[TOKEN] = BearerAuth(token_file=token_file, scheme="")
    app.router.add_post(INGESTIONS_PATH, register)
    app.router.add_get(INGESTIONS_PATH, list_ingestions, allow_head=False)
    # `.+` lets an id contain "/" (sent as %2F); aiohttp percent-decodes the match.
    one = f"{INGESTIONS_PATH}/{{ingestion_id:.+}}"
    app.router.add_get(f"{one}/report", ingestion_report, allow_head=False)  # before `one`
    app.router.add_get(one, show_ingestion, allow_head=False)
    app.router.add_delete(one, delete_ingestion)
    app.router.add_get(OPENAPI_PATH, openapi, allow_head=False)
    app.router.add_get(HEALTH_PATH, healthz, allow_head=False)
    return app


# -- responses ----------------------------------------------------------------------------------


class _Refused(Exception):
    """A request the API answers with a JSON error; raised by handlers, rendered by middleware."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def _answer(
    body: BaseModel, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A JSON answer whose body is one of `admin_schema`'s models, as the document shows it."""
    return web.Response(
        body=body.model_dump_json().encode(),
        status=status,
        headers=headers,
        content_type="application/json",
    )


def _error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return _answer(schema.Error(error=code, message=message), status, headers)


def _moment(seconds: float) -> str:
    moment = datetime.fromtimestamp(seconds, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _timestamp(seconds: float | None) -> str | None:
    return None if seconds is None else _moment(seconds)


def view_body(view: UploadView) -> schema.UploadView:
    """One upload as the API shows it; timestamps are RFC 3339 UTC strings or null."""
    return schema.UploadView(
        ingestionId=view.ingestion_id,
        status=view.status,
        sources=[Source(source) for source in view.sources],
        labels=dict(view.labels),
        firstSeen=_moment(view.first_seen),
        statusChanged=_moment(view.status_changed),
        lastPoll=_timestamp(view.last_poll),
        lastSuccess=_timestamp(view.last_success),
        lastErrorKind=view.last_error,
        terminalAt=_timestamp(view.terminal_at),
        reportAvailable=view.report_available,
    )


def _location(ingestion_id: str) -> str:
    return f"{INGESTIONS_PATH}/{quote(ingestion_id, safe='')}"


# -- middlewares --------------------------------------------------------------------------------


@web.middleware
async def _json_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Turn aiohttp's HTTP errors (404, 405, 413...) and crashes into the JSON error shape."""
    try:
        return await handler(request)
    except _Refused as exc:
        return _error(exc.status, exc.code, exc.message, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        code = _HTTP_ERROR_CODES.get(exc.status, f"http_{exc.status}")
        return _error(exc.status, code, _http_error_message(request, exc), headers)
    except Exception:
        # Logged with the traceback for the operator; the client learns nothing about internals.
        log.exception("admin_request_failed", method=request.method, path=request.path)
        return _error(500, "internal_error", "internal error; see the exporter's log")


def _http_error_message(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return "no such endpoint; see GET /api/v1/openapi.json"
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return f"method {request.method} not allowed here; allowed: {allowed}"
    if exc.status == 413:
        return f"request body larger than {MAX_REGISTRATION_BYTES} bytes"
    return exc.reason


def _normal_host(name: str) -> str:
    """A host name as compared: lower-case, without the root's trailing dot."""
    return name.strip().lower().removesuffix(".")


def _host_of(header: str) -> str | None:
    """The host part of a Host header ("[::1]:10185" -> "::1"), or None if it is malformed."""
    value = header.strip()
    if value.startswith("["):
        end = value.find("]")
        host, rest = value[1:end], value[end + 1 :]
        if end < 0 or not host:
            return None
    else:
        host, colon, port = value.partition(":")
        rest = colon + port
    if rest and not (rest.startswith(":") and rest[1:].isdigit()):
        return None  # a bare IPv6 address, or a port that is not a number
    return _normal_host(host) or None


@web.middleware
async def _check_host(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Refuse (421, changing nothing) a request whose Host is neither loopback nor allowed.

    A web page can make a browser reach this listener under the page's own name by pointing
    that name at 127.0.0.1 (DNS rebinding); the browser then sends that name as Host.
    """
    header = request.headers.get("Host", "")
    host = _host_of(header)
    if host is not None and (is_loopback_host(host) or host in request.app[ALLOWED_HOSTS]):
        return await handler(request)
    log.warning(
        "admin_request_misdirected",
        method=request.method,
        path=request.path,
        remote=request.remote,
        host=header[:255].encode("ascii", "backslashreplace").decode(),
    )
    message = (
        "this API answers only requests for a loopback host (localhost, 127.0.0.1, [::1]) "
        "or a name listed in admin.allowed_hosts"
    )
    return _error(421, "misdirected_request", message)


@web.middleware
async def _authenticate(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """With a token configured, refuse requests without it (probes and the API doc excepted).

    Unknown paths are refused too, so a client without the token cannot map the API.
    """
    auth = request.app.get(TOKEN)
    if auth is None or request.path in _OPEN_PATHS:
        return await handler(request)
    try:
        expected = (await auth.headers(request.method, "", b"", {}))["Authorization"]
    except AuthUnavailable as exc:
        # Fail closed: a token file that vanished must not open the API.
        log.error("admin_token_unavailable", problem=str(exc))
        return _error(503, "auth_unavailable", "the admin token cannot be read; see the log")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # Compare bytes: compare_digest refuses non-ASCII str, and a client may send anything,
    # bytes that are not UTF-8 included (aiohttp hands those over as lone surrogates).
    try:
        sent = given.strip().encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        sent = b""  # not bytes off the wire: nothing that could be the token
    if scheme.lower() == "bearer" and hmac.compare_digest(sent, expected.encode()):
        return await handler(request)
    log.warning(
        "admin_request_unauthorized",
        method=request.method,
        path=request.path,
        remote=request.remote,
        token_sent=bool(given),
    )
    return _error(
        401,
        "unauthorized",
        "this API needs an 'Authorization: Bearer <token>' header with the admin token",
        headers={"WWW-Authenticate": 'Bearer realm="catalog-upload-exporter admin"'},
    )


# -- handlers -----------------------------------------------------------------------------------


def _is_json(content_type: str) -> bool:
    main, _, subtype = content_type.lower().partition("/")
    return main == "application" and (subtype == "json" or subtype.endswith("+json"))


@dataclass(frozen=True, slots=True)
class _Asked:
    """What a registration asks for; `named` is False when the body has no ingestionId."""

    ingestion_id: object
    labels: Mapping[str, object] | None
    named: bool = True


async def _registration_body(request: web.Request) -> _Asked:
    """The id and labels a registration asks for, the body checked against `RegisterRequest`.

    A body that is no JSON object, has unknown fields or labels that are no object is refused
    here. When the model refuses only the values (the id, a label value), the raw values go on
    to the tracker: it refuses them with the reason and message it gives every source (the
    model's limits are its limits), and counts the rejection.
    """
    # A JSON content type also makes a browser preflight a cross-site POST, which this API
    # never answers: a web page cannot register ids through a developer's loopback listener.
    if not _is_json(request.content_type):
        message = f"Content-Type must be application/json, got {request.content_type!r}"
        raise _Refused(415, "unsupported_media_type", message)
    try:
        async with asyncio.timeout(request.app[BODY_TIMEOUT]):
            raw = await request.read()  # raises 413 past client_max_size
    except TimeoutError:
        raise _Refused(408, "request_timeout", "request body not received in time") from None
    # Some Windows tools start UTF-8 with a byte-order mark; JSON parsers may ignore it.
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    try:
        body = schema.RegisterRequest.model_validate_json(raw)
    except ValidationError as exc:
        return _refused_values(exc, raw)
    return _Asked(body.ingestionId, body.labels)


def _refused_values(exc: ValidationError, raw: bytes) -> _Asked:
    """Raise the error a body refused for its shape gets; else hand back its raw values."""
    errors = exc.errors(include_url=False, include_context=False)
    kinds = {error["type"] for error in errors}
    if "json_invalid" in kinds:
        # Lone surrogates ("\ud800") are refused here too: valid JSON but no text, such an id
        # would break /metrics at every scrape. So is nesting too deep to parse.
        detail = errors[0]["msg"].removeprefix("Invalid JSON: ")
        raise _Refused(400, "invalid_json", f"request body is not valid JSON: {detail}")
    if "model_type" in kinds:
        raise _Refused(400, "invalid_json", "request body must be a JSON object")
    unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
    if unknown:
        shown = ", ".join(repr(name[:64]) for name in unknown[:5])
        allowed = ", ".join(schema.RegisterRequest.model_fields)
        raise _Refused(400, "unknown_field", f"unknown field(s) {shown}; allowed: {allowed}")
    if any(error["loc"] == ("labels",) for error in errors):
        message = "labels must be an object of label names to strings"
        raise _Refused(400, "invalid_field", message)
    values = _JSON_OBJECT.validate_json(raw)  # parsed as the model parsed it
    labels = values.get("labels")
    return _Asked(values.get("ingestionId"), labels, named="ingestionId" in values)


#: Any JSON object, to read the values of a body the model refused for its values alone.
_JSON_OBJECT: TypeAdapter[dict[str, Any]] = TypeAdapter(dict[str, Any])


def _state_unavailable(exc: StateError, message: str) -> _Refused:
    log.error("admin_state_write_failed", error=str(exc))
    return _Refused(503, "state_unavailable", message)


async def register(request: web.Request) -> web.Response:
    """POST /api/v1/ingestions: track an id for the API source (201 new, 200 already)."""
    asked = await _registration_body(request)
    tracker = request.app[TRACKER]
    try:
        result = await tracker.register(asked.ingestion_id, Source.API, asked.labels, durable=True)
    except StateError as exc:
        raise _state_unavailable(
            exc, "the state could not be written, so the id is not tracked; retry"
        ) from None
    if not result.accepted:
        reason = result.reason or RejectReason.NOT_A_STRING
        message = result.message if asked.named else "ingestionId is required"
        conflict = reason in (RejectReason.CAP_REACHED, RejectReason.NOT_OWNED)
        raise _Refused(409 if conflict else 400, reason.value, message)

    view = tracker.view(result.ingestion_id)
    if view is None:  # finished and retired earlier: accepted, but never polled again
        log.info("admin_ingestion_registered", ingestion_id=result.ingestion_id, retired=True)
        retired = schema.Retired(
            ingestionId=result.ingestion_id, retired=True, message=result.message
        )
        return _answer(retired)
    log.info(
        "admin_ingestion_registered",
        ingestion_id=view.ingestion_id,
        created=result.created,
        labels=dict(view.labels),
    )
    if result.created:
        location = {"Location": _location(view.ingestion_id)}
        return _answer(view_body(view), 201, location)
    return _answer(view_body(view))


async def list_ingestions(request: web.Request) -> web.Response:
    """GET /api/v1/ingestions[?status=S&limit=N&cursor=C]: a page of the uploads, in id order.

    `nextCursor` continues after the page's last id, so ids added or removed meanwhile never
    make a later page skip or repeat one that stayed tracked all along.
    """
    unknown = sorted(set(request.query) - set(_LIST_PARAMETERS))
    if unknown:
        message = (
            f"unknown query parameter {unknown[0][:64]!r}; allowed: {', '.join(_LIST_PARAMETERS)}"
        )
        raise _Refused(400, "unknown_parameter", message)
    tracker = request.app[TRACKER]
    wanted = {s.strip().upper() for s in request.query.getall("status", [])}
    allowed = tracker.statuses()
    bogus = sorted(wanted.difference(allowed))
    if bogus:
        # A typo must not read as "none in that status".
        message = f"unknown status {bogus[0][:64]!r}; allowed: {', '.join(allowed)}"
        raise _Refused(400, "invalid_parameter", message)
    limit = _page_size(_single_parameter(request, "limit"))
    cursor = _single_parameter(request, "cursor")
    after = None if cursor is None else _cursor_id(cursor)
    page = tracker.page(after, limit, frozenset(wanted), MAX_PAGE_EXAMINED)
    next_cursor = None if page.next_after is None else _cursor_of(page.next_after)
    # The views are a frozen copy: turning them into JSON (most of a page's cost) can run in
    # a thread, which gives the GIL back to the event loop every few milliseconds.
    body = await asyncio.to_thread(_list_body, page.views, next_cursor)
    return web.Response(body=body, content_type="application/json")


def _list_body(views: tuple[UploadView, ...], next_cursor: str | None) -> bytes:
    page = schema.IngestionList(ingestions=[view_body(v) for v in views], nextCursor=next_cursor)
    return page.model_dump_json().encode()


def _single_parameter(request: web.Request, name: str) -> str | None:
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise _Refused(400, "invalid_parameter", f"give {name} at most once")
    return values[0] if values else None


def _page_size(text: str | None) -> int:
    if text is None:
        return DEFAULT_PAGE_SIZE
    if len(text) <= 6 and text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_PAGE_SIZE:
        return int(text)
    message = f"limit must be an integer from 1 to {MAX_PAGE_SIZE}, got {text[:32]!r}"
    raise _Refused(400, "invalid_parameter", message)


def _cursor_of(ingestion_id: str) -> str:
    """An opaque cursor: the last id listed, base64url-encoded without padding."""
    return base64.urlsafe_b64encode(ingestion_id.encode()).decode().rstrip("=")


def _cursor_id(cursor: str) -> str:
    """The id a cursor from `_cursor_of` holds; anything else is a 400."""
    try:
        if len(cursor) > 4 * MAX_INGESTION_ID_LENGTH * 2:
            raise ValueError  # longer than any cursor this API hands out
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
        ingestion_id = raw.decode()
    except ValueError:  # binascii.Error and UnicodeDecodeError included
        ingestion_id = ""
    if not 0 < len(ingestion_id) <= MAX_INGESTION_ID_LENGTH:
        message = "cursor is not one this API handed out; list again without it"
        raise _Refused(400, "invalid_parameter", message)
    return ingestion_id


async def show_ingestion(request: web.Request) -> web.Response:
    """GET /api/v1/ingestions/{id}: one tracked upload, or 404."""
    ingestion_id = request.match_info["ingestion_id"]
    view = request.app[TRACKER].view(ingestion_id)
    if view is None:
        raise _not_tracked()
    return _answer(view_body(view))


def _not_tracked() -> _Refused:
    return _Refused(404, "not_found", "this ingestionId is not tracked")


async def delete_ingestion(request: web.Request) -> web.Response:
    """DELETE /api/v1/ingestions/{id}[?source=NAME...]: sources let go of the id.

    Without `source`, the API source. `source` (repeatable: config, directory, api,
    notification, or all) names the sources to release: any id can be deleted, forged ones
    that notifications registered included. 204 when it is gone (its series with it), 200
    with the view when another source still holds it, 409 when no named source holds it.
    Each deletion is logged (`admin_ingestion_deleted`) with the sources it had and released.
    """
    ingestion_id = request.match_info["ingestion_id"]
    tracker = request.app[TRACKER]
    view = tracker.view(ingestion_id)
    if view is None:
        raise _not_tracked()
    named = _sources_named(request)
    held_by = ", ".join(view.sources) or "no source (kept until its retention ends)"
    if named is None and Source.API.value not in view.sources:
        message = (
            f"this ingestionId was not registered through the API; it is held by {held_by}: "
            "remove it there, or name its sources (?source=NAME, or ?source=all)"
        )
        raise _Refused(409, "not_registered_by_api", message)
    wanted = (Source.API,) if named is None else named
    releasing = tuple(s for s in wanted if s.value in view.sources)
    if not releasing:
        message = f"no source named holds this ingestionId; it is held by {held_by}"
        raise _Refused(409, "not_held_by_source", message)
    try:
        released = await tracker.release_sources(
            ingestion_id, releasing, immediate=True, durable=True
        )
    except StateError as exc:
        raise _state_unavailable(
            exc, "the state could not be written, so the id is still tracked; retry"
        ) from None
    remaining = tracker.view(ingestion_id)
    log.info(
        "admin_ingestion_deleted",
        ingestion_id=ingestion_id,
        removed=remaining is None,
        sources_before=list(view.sources),
        released_sources=[s.value for s in released],
        remaining_sources=list(remaining.sources) if remaining else [],
        peer=request.remote,
    )
    if remaining is None:
        return web.Response(status=204)
    message = "released but still tracked: held by " + ", ".join(remaining.sources)
    return _answer(schema.Released(ingestion=view_body(remaining), message=message))


def _sources_named(request: web.Request) -> tuple[Source, ...] | None:
    """The sources a DELETE's `source` parameters name (None: no parameter)."""
    unknown = sorted(set(request.query) - {"source"})
    if unknown:
        message = f"unknown query parameter {unknown[0][:64]!r}; allowed: source"
        raise _Refused(400, "unknown_parameter", message)
    names = request.query.getall("source", [])
    if not names:
        return None
    if "all" in names:
        return tuple(Source)
    known = {s.value: s for s in Source}
    unknown = [n for n in names if n not in known]
    if unknown:
        choices = ", ".join([*known, "all"])
        message = f"source must be one of {choices}, got {unknown[0][:32]!r}"
        raise _Refused(400, "invalid_parameter", message)
    return tuple(dict.fromkeys(known[n] for n in names))


#: How each reason for no report is answered: status and error code.
_REPORT_FAILURES = {
    ReportProblem.NOT_READY: (409, "report_not_ready"),
    ReportProblem.API_ERROR: (502, "api_error"),
    ReportProblem.DOWNLOAD_FAILED: (502, "report_download_failed"),
    ReportProblem.TOO_LARGE: (502, "report_too_large"),
}


async def ingestion_report(request: web.Request) -> web.StreamResponse:
    """GET /api/v1/ingestions/{id}/report: stream a tracked upload's processing report.

    A fresh link is asked of the API and downloaded as the `report` command does (no
    credential to the report host, no redirect, api.max_report_bytes, public https hosts
    only); the link is never shown. At most MAX_REPORTS_IN_FLIGHT at once (429 beyond); a
    client that leaves cancels its fetch.
    """
    ingestion_id = request.match_info["ingestion_id"]
    if request.app[TRACKER].view(ingestion_id) is None:
        raise _not_tracked()
    fetch = request.app.get(REPORTS)
    if fetch is None:
        raise _Refused(503, "reports_unavailable", "this listener cannot fetch reports")
    slots = request.app[REPORT_SLOTS]
    if slots.taken >= slots.limit:
        raise _Refused(
            429,
            "too_many_reports",
            f"{slots.limit} reports are being fetched already; try again shortly",
            {"Retry-After": str(REPORTS_RETRY_AFTER_SECONDS)},
        )
    filename = "".join(
        c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in ingestion_id
    )
    sink = ResponseSink(request, f"{filename}.csv")
    slots.taken += 1
    try:
        outcome = await _while_client_waits(request, fetch(ingestion_id, sink))
    finally:
        slots.taken -= 1
    if outcome is None:
        log.info("admin_report_abandoned", ingestion_id=ingestion_id)
        return sink.response or web.Response(status=204)  # nobody reads it
    if isinstance(outcome, ReportFailure):
        log.warning(
            "admin_report_failed",
            ingestion_id=ingestion_id,
            problem=outcome.problem.value,
            kind=outcome.kind,
            message=outcome.message,
        )
        if sink.response is not None:  # the headers are out: only a cut connection tells
            sink.abort()
            return sink.response
        status, code = _REPORT_FAILURES[outcome.problem]
        raise _Refused(status, code, outcome.message)
    log.info("admin_report_sent", ingestion_id=ingestion_id, bytes=outcome.size, host=outcome.host)
    assert sink.response is not None, "a fetched report went through start()"
    await sink.response.write_eof()
    return sink.response


async def _while_client_waits(
    request: web.Request, fetching: Awaitable[ReportOutcome]
) -> ReportOutcome | None:
    """The fetch's outcome, or None once the client has gone: the fetch is then cancelled
    (its token given up, its download closed) instead of running on for nobody."""
    task = asyncio.ensure_future(fetching)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_CLIENT_CHECK_SECONDS)
            if done:
                return task.result()
            transport = request.transport
            if transport is None or transport.is_closing():
                return None
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def openapi(request: web.Request) -> web.Response:
    """GET /api/v1/openapi.json: the OpenAPI 3.1 description of this API."""
    return web.json_response(openapi_document())


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: the admin listener answers."""
    return _answer(schema.Health(status="ok"))
