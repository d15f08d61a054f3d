"""The admin HTTP API: register, list, show and delete tracked ingestionIds, over JSON.

It runs on a listener of its own (loopback by default: in a sidecar the app reaches it on
localhost) and owns only the HTTP side: request validation, status codes, the optional bearer
token, the OpenAPI document. Every decision about ids (validation, labels, cap, persistence)
belongs to the `IngestionTracker`; this module never touches the store or the state file.

Every answer is JSON, errors included: `{"error": "<code>", "message": "<text>"}` with a 4xx
or 5xx status, never an HTML page or a traceback. A 2xx to a POST or DELETE is an
acknowledgement: the tracker returns only once the state file holding the change is on disk.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import structlog
from aiohttp import web

from exporter import __version__
from exporter.auth import AuthUnavailable, BearerAuth
from exporter.config import ServerConfig, is_loopback_host
from exporter.models import MAX_INGESTION_ID_LENGTH
from exporter.report import ReportFailure, ReportProblem, ReportSource, ResponseSink
from exporter.state import StateError
from exporter.tracking import IngestionTracker, RejectReason, Source, UploadView

__all__ = [
    "API_PREFIX",
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_EXAMINED",
    "MAX_PAGE_SIZE",
    "MAX_REQUEST_BYTES",
    "create_admin_app",
    "openapi_document",
    "view_json",
]

log = structlog.get_logger("exporter.admin")

API_PREFIX = "/api/v1"
INGESTIONS_PATH = f"{API_PREFIX}/ingestions"
OPENAPI_PATH = f"{API_PREFIX}/openapi.json"
HEALTH_PATH = "/healthz"

#: Registrations are a few hundred bytes; anything bigger is a mistake or an attack.
MAX_REQUEST_BYTES = 64 * 1024

#: Uploads per page of GET /api/v1/ingestions without `limit`, and the most `limit` may ask.
#: Copying a page's uploads holds the event loop about 3 ms per 1,000; encoding them, about
#: three times that, runs in a thread.
DEFAULT_PAGE_SIZE = 1_000
MAX_PAGE_SIZE = 10_000
#: The most ids a filtered page looks at: a rare status among 100,000 ids is found over a few
#: short pages instead of in one long stall.
MAX_PAGE_EXAMINED = 10_000

TRACKER = web.AppKey("admin_tracker", IngestionTracker)
TOKEN = web.AppKey("admin_token", BearerAuth)
BODY_TIMEOUT = web.AppKey("admin_body_timeout", float)
ALLOWED_HOSTS = web.AppKey("admin_allowed_hosts", frozenset[str])
REPORTS = web.AppKey[ReportSource]("admin_reports")

#: Reachable without the token: probes and API discovery must work before a client has one.
_OPEN_PATHS = frozenset({HEALTH_PATH, OPENAPI_PATH})

_REQUEST_FIELDS = frozenset({"ingestionId", "labels"})
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
        client_max_size=MAX_REQUEST_BYTES,
        middlewares=[_json_errors, _check_host, _authenticate],
    )
    app[TRACKER] = tracker
    app[BODY_TIMEOUT] = body_timeout
    app[ALLOWED_HOSTS] = frozenset(_normal_host(name) for name in allowed_hosts)
    if reports is not None:
        app[REPORTS] = reports
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

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status, headers=headers)


def _timestamp(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    moment = datetime.fromtimestamp(seconds, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def view_json(view: UploadView) -> dict[str, Any]:
    """One upload as the API shows it; timestamps are RFC 3339 UTC strings or null."""
    return {
        "ingestionId": view.ingestion_id,
        "status": view.status,
        "sources": list(view.sources),
        "labels": dict(view.labels),
        "firstSeen": _timestamp(view.first_seen),
        "statusChanged": _timestamp(view.status_changed),
        "lastPoll": _timestamp(view.last_poll),
        "lastSuccess": _timestamp(view.last_success),
        "lastErrorKind": view.last_error,
        "terminalAt": _timestamp(view.terminal_at),
        "reportAvailable": view.report_available,
    }


def _location(ingestion_id: str) -> str:
    return f"{INGESTIONS_PATH}/{quote(ingestion_id, safe='')}"


# -- middlewares --------------------------------------------------------------------------------


@web.middleware
async def _json_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Turn aiohttp's HTTP errors (404, 405, 413...) and crashes into the JSON error shape."""
    try:
        return await handler(request)
    except _Refused as exc:
        return _error(exc.status, exc.code, exc.message)
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
        return f"request body larger than {MAX_REQUEST_BYTES} bytes"
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


async def _registration_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object, its shape checked; the values are the tracker's to judge."""
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
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        text = str(exc) if isinstance(exc, json.JSONDecodeError) else "not UTF-8 JSON"
        raise _Refused(400, "invalid_json", f"request body is not valid JSON: {text}") from None
    if not isinstance(body, dict):
        raise _Refused(400, "invalid_json", "request body must be a JSON object")
    try:
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        # "\ud800" is valid JSON but no text: such an id would break /metrics at every scrape.
        message = "request body contains an unpaired surrogate escape (\\uD800-\\uDFFF)"
        raise _Refused(400, "invalid_json", message) from None
    unknown = sorted(set(body) - _REQUEST_FIELDS)
    if unknown:
        shown = ", ".join(repr(name[:64]) for name in unknown[:5])
        message = f"unknown field(s) {shown}; allowed: ingestionId, labels"
        raise _Refused(400, "unknown_field", message)
    labels = body.get("labels")
    if labels is not None and not isinstance(labels, dict):
        message = "labels must be an object of label names to strings"
        raise _Refused(400, "invalid_field", message)
    return body


def _state_unavailable(exc: StateError, message: str) -> _Refused:
    log.error("admin_state_write_failed", error=str(exc))
    return _Refused(503, "state_unavailable", message)


async def register(request: web.Request) -> web.Response:
    """POST /api/v1/ingestions: track an id for the API source (201 new, 200 already)."""
    body = await _registration_body(request)
    tracker = request.app[TRACKER]
    try:
        result = await tracker.register(
            body.get("ingestionId"), Source.API, body.get("labels"), durable=True
        )
    except StateError as exc:
        raise _state_unavailable(
            exc, "the state could not be written, so the id is not tracked; retry"
        ) from None
    if not result.accepted:
        reason = result.reason or RejectReason.NOT_A_STRING
        message = result.message if "ingestionId" in body else "ingestionId is required"
        conflict = reason in (RejectReason.CAP_REACHED, RejectReason.NOT_OWNED)
        raise _Refused(409 if conflict else 400, reason.value, message)

    view = tracker.view(result.ingestion_id)
    if view is None:  # finished and retired earlier: accepted, but never polled again
        log.info("admin_ingestion_registered", ingestion_id=result.ingestion_id, retired=True)
        return web.json_response(
            {"ingestionId": result.ingestion_id, "retired": True, "message": result.message}
        )
    log.info(
        "admin_ingestion_registered",
        ingestion_id=view.ingestion_id,
        created=result.created,
        labels=dict(view.labels),
    )
    if result.created:
        return web.json_response(
            view_json(view), status=201, headers={"Location": _location(view.ingestion_id)}
        )
    return web.json_response(view_json(view))


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
    document = {"ingestions": [view_json(v) for v in views], "nextCursor": next_cursor}
    return json.dumps(document).encode()


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
    return web.json_response(view_json(view))


def _not_tracked() -> _Refused:
    return _Refused(404, "not_found", "this ingestionId is not tracked")


async def delete_ingestion(request: web.Request) -> web.Response:
    """DELETE /api/v1/ingestions/{id}: the API source lets go of the id.

    204 when it is gone (its series with it), 200 with the view when another source still
    holds it, 409 when the API never held it: config and directory ids are removed there.
    """
    ingestion_id = request.match_info["ingestion_id"]
    tracker = request.app[TRACKER]
    view = tracker.view(ingestion_id)
    if view is None:
        raise _not_tracked()
    if Source.API.value not in view.sources:
        held_by = ", ".join(view.sources) or "no source (kept until its retention ends)"
        message = (
            f"this ingestionId was not registered through the API; it is held by {held_by}: "
            "remove it there"
        )
        raise _Refused(409, "not_registered_by_api", message)
    try:
        await tracker.release(ingestion_id, Source.API, immediate=True, durable=True)
    except StateError as exc:
        raise _state_unavailable(
            exc, "the state could not be written, so the id is still tracked; retry"
        ) from None
    remaining = tracker.view(ingestion_id)
    log.info(
        "admin_ingestion_deleted",
        ingestion_id=ingestion_id,
        removed=remaining is None,
        remaining_sources=list(remaining.sources) if remaining else [],
    )
    if remaining is None:
        return web.Response(status=204)
    return web.json_response(
        {
            "ingestion": view_json(remaining),
            "message": "released by the API but still tracked: held by "
            + ", ".join(remaining.sources),
        }
    )


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
    credential to the report host, no redirect, api.max_report_bytes); the link is never shown.
    """
    ingestion_id = request.match_info["ingestion_id"]
    if request.app[TRACKER].view(ingestion_id) is None:
        raise _not_tracked()
    fetch = request.app.get(REPORTS)
    if fetch is None:
        raise _Refused(503, "reports_unavailable", "this listener cannot fetch reports")
    filename = "".join(
        c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in ingestion_id
    )
    sink = ResponseSink(request, f"{filename}.csv")
    outcome = await fetch(ingestion_id, sink)
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


async def openapi(request: web.Request) -> web.Response:
    """GET /api/v1/openapi.json: the OpenAPI 3.0.3 description of this API."""
    return web.json_response(openapi_document())


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: the admin listener answers."""
    return web.json_response({"status": "ok"})


# -- the OpenAPI document -----------------------------------------------------------------------


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_body(schema: Mapping[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _failure(description: str) -> dict[str, Any]:
    return _json_body(_ref("Error"), description)


_TIMESTAMP = {"type": "string", "format": "date-time", "nullable": True}

_STATUS_TEXT = (
    "INQUEUE, INPROGRESS, DONE, CANCELLED, FATAL (the API's), INVALID (the API rejected the "
    "id), UNKNOWN (no successful poll yet), or another upper-case identifier the API sent."
)

_SCHEMAS: dict[str, Any] = {
    "RegisterRequest": {
        "type": "object",
        "required": ["ingestionId"],
        "additionalProperties": False,
        "properties": {
            "ingestionId": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_INGESTION_ID_LENGTH,
                "description": "Any characters except control characters (Unicode Cc) and "
                "line/paragraph separators.",
            },
            "labels": {
                "type": "object",
                "additionalProperties": {"type": "string", "maxLength": 128},
                "description": "Per-ingestion metric labels; only the names listed in the "
                "exporter's ingestions.labels are accepted. Replaces earlier labels.",
            },
        },
    },
    "UploadView": {
        "type": "object",
        "required": [
            "ingestionId",
            "status",
            "sources",
            "labels",
            "firstSeen",
            "statusChanged",
            "lastPoll",
            "lastSuccess",
            "lastErrorKind",
            "terminalAt",
            "reportAvailable",
        ],
        "description": "One tracked upload. Timestamps are RFC 3339 date-times in UTC "
        "(e.g. 2024-06-10T12:00:00.000Z) or null.",
        "properties": {
            "ingestionId": {"type": "string"},
            "status": {"type": "string", "description": _STATUS_TEXT},
            "sources": {
                "type": "array",
                "items": {"type": "string", "enum": [s.value for s in Source]},
                "description": "Who holds the id; empty once released but kept for retention.",
            },
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "firstSeen": {**_TIMESTAMP, "nullable": False},
            "statusChanged": {**_TIMESTAMP, "nullable": False},
            "lastPoll": _TIMESTAMP,
            "lastSuccess": _TIMESTAMP,
            "lastErrorKind": {
                "type": "string",
                "nullable": True,
                "description": "Kind of the last failed poll (catalog_api_errors_total's kind "
                "label), null after a successful one.",
            },
            "terminalAt": _TIMESTAMP,
            "reportAvailable": {"type": "boolean"},
        },
    },
    "Retired": {
        "type": "object",
        "required": ["ingestionId", "retired", "message"],
        "description": "The id finished earlier and its retention ran out: it is not polled again.",
        "properties": {
            "ingestionId": {"type": "string"},
            "retired": {"type": "boolean", "enum": [True]},
            "message": {"type": "string"},
        },
    },
    "IngestionList": {
        "type": "object",
        "required": ["ingestions", "nextCursor"],
        "description": "One page of the tracked uploads, in ingestionId order (Unicode code "
        "points).",
        "properties": {
            "ingestions": {"type": "array", "items": _ref("UploadView")},
            "nextCursor": {
                "type": "string",
                "nullable": True,
                "description": "Pass as cursor for the next page; null on the last page. A "
                "filtered page may be short, even empty, with more to come: only null means "
                "the end.",
            },
        },
    },
    "Released": {
        "type": "object",
        "required": ["ingestion", "message"],
        "properties": {
            "ingestion": _ref("UploadView"),
            "message": {"type": "string", "description": "Which sources still hold the id."},
        },
    },
    "Error": {
        "type": "object",
        "required": ["error", "message"],
        "properties": {
            "error": {
                "type": "string",
                "description": "A stable code: invalid_json, unknown_field, invalid_field, "
                "unknown_parameter, not_a_string, empty, too_long, control_characters, "
                "bad_labels, cap_reached, not_owned, not_found, not_registered_by_api, "
                "unauthorized, method_not_allowed, payload_too_large, unsupported_media_type, "
                "invalid_parameter, misdirected_request, state_unavailable, auth_unavailable, "
                "internal_error, report_not_ready, api_error, report_download_failed, "
                "report_too_large, reports_unavailable.",
            },
            "message": {"type": "string", "description": "Human-readable detail."},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string", "enum": ["ok"]}},
    },
}

_UNAUTHORIZED = {
    "description": "No or wrong bearer token (only when the exporter has admin.token_file).",
    "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
    "content": {"application/json": {"schema": _ref("Error")}},
}
_INTERNAL = _failure("Unexpected failure (internal_error); details are in the exporter's log.")
_AUTH_UNAVAILABLE = "auth_unavailable: the admin token file cannot be read (fails closed)."
_ID_PARAMETER = {
    "name": "ingestion_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_INGESTION_ID_LENGTH},
    "description": "The ingestionId, percent-encoded (a '/' in it as %2F).",
}


_MISDIRECTED = _failure(
    "misdirected_request: the Host header names neither a loopback host (localhost, "
    "127.0.0.0/8, [::1]) nor one in admin.allowed_hosts; nothing was done (DNS rebinding "
    "protection)."
)


def _protected(responses: dict[str, Any], unavailable: str = "") -> dict[str, Any]:
    """Add the answers every token-protected operation may give."""
    text = f"{unavailable} Or {_AUTH_UNAVAILABLE}" if unavailable else _AUTH_UNAVAILABLE
    return {
        **responses,
        "401": _UNAUTHORIZED,
        "421": _MISDIRECTED,
        "500": _INTERNAL,
        "503": _failure(text),
    }


_REPORT_PATH: dict[str, Any] = {
    "parameters": [_ID_PARAMETER],
    "get": {
        "operationId": "getIngestionReport",
        "summary": "Stream a tracked upload's processing report",
        "description": "Asks getCatalogUploadStatus for a fresh reportDownloadLink and streams "
        "the file behind it, as `catalog-upload-exporter report` does: the report host gets "
        "no API credential, redirects are not followed, reports over api.max_report_bytes are "
        "refused. The link itself is never shown. If the transfer fails after the headers "
        "were sent, the connection is cut before the end of the body.",
        "responses": _protected(
            {
                "200": {
                    "description": "The report, as the report host sent it (usually CSV).",
                    "headers": {"Content-Disposition": {"schema": {"type": "string"}}},
                    "content": {
                        "text/csv": {"schema": {"type": "string", "format": "binary"}},
                        "application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"}
                        },
                    },
                },
                "404": _failure("not_found: not tracked."),
                "409": _failure(
                    "report_not_ready: no reportDownloadLink yet; the message names the status."
                ),
                "502": _failure(
                    "api_error: getCatalogUploadStatus failed; report_download_failed: the "
                    "report host refused, redirected, timed out or broke off; "
                    "report_too_large: over api.max_report_bytes. The message names the kind."
                ),
            },
            "reports_unavailable: this listener was started without a report fetcher.",
        ),
    },
}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.0.3 document served at /api/v1/openapi.json."""
    view = _ref("UploadView")
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "catalog-upload-exporter admin API",
            "version": __version__,
            "description": "Register, list and delete the ingestionIds the exporter polls. "
            "A 2xx to POST or DELETE is sent only once the change is in the exporter's state "
            "file (when one is configured). Every error is a JSON Error object. When the "
            "exporter has admin.token_file, every operation except /healthz and this document "
            "needs 'Authorization: Bearer <token>'; otherwise no authentication is needed.",
        },
        "servers": [{"url": "http://127.0.0.1:10185"}],
        # Bearer or nothing: whether the token is required depends on admin.token_file.
        "security": [{"bearerAuth": []}, {}],
        "paths": {
            INGESTIONS_PATH: {
                "post": {
                    "operationId": "registerIngestion",
                    "summary": "Track an ingestionId (idempotent)",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("RegisterRequest")}},
                    },
                    "responses": _protected(
                        {
                            "201": {
                                **_json_body(view, "Newly tracked, and durable."),
                                "headers": {
                                    "Location": {
                                        "schema": {"type": "string"},
                                        "description": "/api/v1/ingestions/<percent-encoded id>",
                                    }
                                },
                            },
                            "200": _json_body(
                                {"oneOf": [view, _ref("Retired")]},
                                "Already tracked (labels replaced if given), or finished and "
                                "retired earlier.",
                            ),
                            "400": _failure(
                                "invalid_json, unknown_field, invalid_field, or a rejected id "
                                "or labels: not_a_string, empty, too_long, control_characters, "
                                "bad_labels."
                            ),
                            "409": _failure(
                                "cap_reached: ingestions.max_tracked ids tracked; not_owned: "
                                "with sharding, another replica owns this id (the message "
                                "names it)."
                            ),
                            "408": _failure(
                                "request_timeout: the body did not arrive within "
                                "server.idle_timeout_seconds."
                            ),
                            "413": _failure("payload_too_large: body over 64 KiB."),
                            "415": _failure("unsupported_media_type: not application/json."),
                        },
                        "state_unavailable: the state could not be written (or persistence "
                        "is unavailable); the id is not tracked, retry.",
                    ),
                },
                "get": {
                    "operationId": "listIngestions",
                    "summary": "The tracked uploads, a page at a time, in id order",
                    "description": "Walk every page by passing each answer's nextCursor as "
                    "cursor until it is null. Each id tracked throughout the walk is listed "
                    "exactly once; one added or removed meanwhile may or may not be. A page "
                    "costs O(log n + the ids it looks at), whatever the number tracked.",
                    "parameters": [
                        {
                            "name": "status",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "array", "items": {"type": "string"}},
                            "style": "form",
                            "explode": True,
                            "description": "Only uploads in these statuses (repeatable, "
                            "case-insensitive): INQUEUE, INPROGRESS, DONE, CANCELLED, FATAL, "
                            "INVALID, UNKNOWN, or another status the API sent that a tracked "
                            "upload has now. Anything else is a 400. A filtered page "
                            f"looks at no more than {MAX_PAGE_EXAMINED:,} ids (or limit, if "
                            "larger).",
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": MAX_PAGE_SIZE,
                                "default": DEFAULT_PAGE_SIZE,
                            },
                            "description": "The most uploads on this page.",
                        },
                        {
                            "name": "cursor",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string"},
                            "description": "The nextCursor of the previous page (opaque); "
                            "without it the list starts at the beginning.",
                        },
                    ],
                    "responses": _protected(
                        {
                            "200": _json_body(_ref("IngestionList"), "The uploads."),
                            "400": _failure(
                                "unknown_parameter, or invalid_parameter: a status that is "
                                "neither known nor held by a tracked upload (the message "
                                "lists the allowed ones), a limit out of range, a cursor this "
                                "API did not hand out, or one of them given twice."
                            ),
                        }
                    ),
                },
            },
            f"{INGESTIONS_PATH}/{{ingestion_id}}": {
                "parameters": [_ID_PARAMETER],
                "get": {
                    "operationId": "getIngestion",
                    "summary": "One tracked upload",
                    "responses": _protected(
                        {
                            "200": _json_body(view, "The upload."),
                            "404": _failure("not_found: not tracked."),
                        }
                    ),
                },
                "delete": {
                    "operationId": "deleteIngestion",
                    "summary": "Stop tracking an id registered through the API",
                    "responses": _protected(
                        {
                            "204": {"description": "Released and removed; its series are gone."},
                            "200": _json_body(
                                _ref("Released"),
                                "Released by the API, but another source still holds it.",
                            ),
                            "404": _failure("not_found: not tracked."),
                            "409": _failure(
                                "not_registered_by_api: held only by config or directory; "
                                "remove it there."
                            ),
                        },
                        "state_unavailable: the state could not be written (or persistence "
                        "is unavailable); the id is still tracked, retry.",
                    ),
                },
            },
            f"{INGESTIONS_PATH}/{{ingestion_id}}/report": _REPORT_PATH,
            OPENAPI_PATH: {
                "get": {
                    "operationId": "getOpenApi",
                    "summary": "This document",
                    "security": [],
                    "responses": {
                        "200": _json_body({"type": "object"}, "The OpenAPI document."),
                        "500": _INTERNAL,
                        "421": _MISDIRECTED,
                    },
                }
            },
            HEALTH_PATH: {
                "get": {
                    "operationId": "health",
                    "summary": "The admin listener is alive",
                    "security": [],
                    "responses": {
                        "200": _json_body(_ref("Health"), "Alive."),
                        "500": _INTERNAL,
                        "421": _MISDIRECTED,
                    },
                }
            },
        },
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The content of the file named by admin.token_file.",
                }
            },
        },
    }
