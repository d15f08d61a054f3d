"""What the admin API sends and receives: its bodies as pydantic models, its paths and limits,
and the OpenAPI document generated from them.

The models are the one description of each body. `admin` validates registrations with
`RegisterRequest` and builds every JSON answer from the response models; the document's
schemas are those models' JSON Schemas, so the document cannot say something the API does
not do. The document is OpenAPI 3.1, whose schema dialect is the JSON Schema (2020-12) that
pydantic emits. This module owns no HTTP: routes, status decisions and checks that need the
tracker (allow-listed labels, characters, cap, shard) belong to `admin` and the tracker.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from exporter import __version__
from exporter.config import DEFAULT_ADMIN_PORT
from exporter.models import MAX_INGESTION_ID_LENGTH, MAX_REGISTRATION_BYTES, RejectReason
from exporter.tracking import MAX_LABEL_VALUE_LENGTH, Source

__all__ = [
    "API_PREFIX",
    "DEFAULT_PAGE_SIZE",
    "HEALTH_PATH",
    "INGESTIONS_PATH",
    "MAX_PAGE_EXAMINED",
    "MAX_PAGE_SIZE",
    "MAX_REPORTS_IN_FLIGHT",
    "OPENAPI_PATH",
    "Error",
    "Health",
    "IngestionList",
    "RegisterRequest",
    "Released",
    "Retired",
    "UploadView",
    "openapi_document",
]

API_PREFIX = "/api/v1"
INGESTIONS_PATH = f"{API_PREFIX}/ingestions"
OPENAPI_PATH = f"{API_PREFIX}/openapi.json"
HEALTH_PATH = "/healthz"

#: Uploads per page of GET /api/v1/ingestions without `limit`, and the most `limit` may ask.
#: Copying a page's uploads holds the event loop about 3 ms per 1,000; encoding them, about
#: three times that, runs in a thread.
DEFAULT_PAGE_SIZE = 1_000
MAX_PAGE_SIZE = 10_000
#: The most ids a filtered page looks at: a rare status among 100,000 ids is found over a few
#: short pages instead of in one long stall.
MAX_PAGE_EXAMINED = 10_000
#: Report requests served at once; one more is answered 429. Each holds a download (a socket
#: and up to api.max_report_bytes in flight) and took a token of the reports' budget share.
MAX_REPORTS_IN_FLIGHT = 4
#: The Retry-After of that 429, in seconds.
REPORTS_RETRY_AFTER_SECONDS = 2

_REF = "#/components/schemas/{model}"

#: RFC 3339 UTC date-times with milliseconds, as `admin` writes them.
Timestamp = Annotated[
    str, Field(json_schema_extra={"format": "date-time"}, examples=["2024-06-10T12:00:00.000Z"])
]

_STATUS_TEXT = (
    "INQUEUE, INPROGRESS, DONE, CANCELLED, FATAL (the API's), INVALID (the API rejected the "
    "id), UNKNOWN (no successful poll yet, or a value that is not an identifier) or OTHER "
    "(a value the API sent outside the documented five; the log names it)."
)


class _Body(BaseModel):
    """A JSON body. Field names are the wire names (camelCase): no alias can drift from them,
    and each field's schema title is its name."""

    model_config = ConfigDict(
        strict=True, frozen=True, field_title_generator=lambda name, _field: name
    )


# -- requests -----------------------------------------------------------------------------------


class RegisterRequest(_Body):
    """Track this ingestionId for the API source; `labels` replaces earlier labels."""

    model_config = ConfigDict(extra="forbid")

    ingestionId: str = Field(
        min_length=1,
        max_length=MAX_INGESTION_ID_LENGTH,
        description="Any characters except control characters (Unicode Cc), line/paragraph "
        "separators and invisible format characters (Cf); in Unicode normalization form NFC.",
    )
    labels: dict[str, Annotated[str, Field(max_length=MAX_LABEL_VALUE_LENGTH)]] | None = Field(
        default=None,
        description="Per-ingestion metric labels; only the names listed in the exporter's "
        "ingestions.labels are accepted. Replaces earlier labels.",
    )


# -- responses ----------------------------------------------------------------------------------


class UploadView(_Body):
    """One tracked upload. Timestamps are RFC 3339 date-times in UTC
    (e.g. 2024-06-10T12:00:00.000Z) or null."""

    ingestionId: str
    status: str = Field(description=_STATUS_TEXT)
    sources: list[Source] = Field(
        description="Who holds the id; empty once released but kept for retention.",
    )
    labels: dict[str, str]
    firstSeen: Timestamp
    statusChanged: Timestamp
    lastPoll: Timestamp | None
    lastSuccess: Timestamp | None
    lastErrorKind: str | None = Field(
        description="Kind of the last failed poll (catalog_api_errors_total's kind label), "
        "null after a successful one."
    )
    terminalAt: Timestamp | None
    reportAvailable: bool


class Retired(_Body):
    """The id finished earlier and its retention ran out: it is not polled again."""

    ingestionId: str
    retired: Literal[True]
    message: str


class IngestionList(_Body):
    """One page of the tracked uploads, in ingestionId order (Unicode code points)."""

    ingestions: list[UploadView]
    nextCursor: str | None = Field(
        description="Pass as cursor for the next page; null on the last page. A filtered page "
        "may be short, even empty, with more to come: only null means the end."
    )


class Released(_Body):
    """Released by the sources named, but another source still holds the id."""

    ingestion: UploadView
    message: str = Field(description="Which sources still hold the id.")


#: Every `error` code an answer may carry, beside the rejection reasons of `RejectReason`.
_ERROR_CODES = (
    "invalid_json",
    "unknown_field",
    "invalid_field",
    "unknown_parameter",
    "invalid_parameter",
    *(reason.value for reason in RejectReason),
    "not_found",
    "not_registered_by_api",
    "not_held_by_source",
    "unauthorized",
    "method_not_allowed",
    "request_timeout",
    "payload_too_large",
    "unsupported_media_type",
    "misdirected_request",
    "state_unavailable",
    "auth_unavailable",
    "internal_error",
    "report_not_ready",
    "api_error",
    "report_download_failed",
    "report_too_large",
    "reports_unavailable",
    "too_many_reports",
)


class Error(_Body):
    """Every error answer: a stable code and a human-readable message."""

    error: str = Field(description=f"A stable code: {', '.join(_ERROR_CODES)}.")
    message: str = Field(description="Human-readable detail.")


class Health(_Body):
    """The admin listener answers."""

    status: Literal["ok"]


# -- the OpenAPI document -----------------------------------------------------------------------


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _failure(description: str) -> dict[str, Any]:
    return _json(_ref(Error), description)


_UNAUTHORIZED = {
    "description": "No or wrong bearer token (only when the exporter has admin.token_file).",
    "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
    "content": {"application/json": {"schema": _ref(Error)}},
}
_INTERNAL = _failure("Unexpected failure (internal_error); details are in the exporter's log.")
_MISDIRECTED = _failure(
    "misdirected_request: the Host header names neither a loopback host (localhost, "
    "127.0.0.0/8, [::1]) nor one in admin.allowed_hosts; nothing was done (DNS rebinding "
    "protection)."
)
_AUTH_UNAVAILABLE = "auth_unavailable: the admin token file cannot be read (fails closed)."
_ID_PARAMETER = {
    "name": "ingestion_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_INGESTION_ID_LENGTH},
    "description": "The ingestionId, percent-encoded (a '/' in it as %2F).",
}
_SOURCE_PARAMETER = {
    "name": "source",
    "in": "query",
    "required": False,
    "schema": {
        "type": "array",
        "items": {"type": "string", "enum": [*(s.value for s in Source), "all"]},
    },
    "style": "form",
    "explode": True,
    "description": "The sources to release the id from (repeatable); `all`: every source. "
    "Without it, the API source only.",
}
_LIST_PARAMETERS = [
    {
        "name": "status",
        "in": "query",
        "required": False,
        "schema": {"type": "array", "items": {"type": "string"}},
        "style": "form",
        "explode": True,
        "description": "Only uploads in these statuses (repeatable, case-insensitive): "
        "INQUEUE, INPROGRESS, DONE, CANCELLED, FATAL, INVALID, UNKNOWN, OTHER. Anything else is "
        "a 400. A filtered page looks "
        f"at no more than {MAX_PAGE_EXAMINED:,} ids (or limit, if larger).",
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
        "description": "The nextCursor of the previous page (opaque); without it the list "
        "starts at the beginning.",
    },
]


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


def _open(responses: dict[str, Any]) -> dict[str, Any]:
    """Add the answers an operation reachable without the token may give."""
    return {**responses, "421": _MISDIRECTED, "500": _INTERNAL}


def _paths() -> dict[str, Any]:
    """Every route: its operations, parameters and the answers each may give."""
    one = f"{INGESTIONS_PATH}/{{ingestion_id}}"
    return {
        INGESTIONS_PATH: {
            "post": {
                "operationId": "registerIngestion",
                "summary": "Track an ingestionId (idempotent)",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(RegisterRequest)}},
                },
                "responses": _protected(
                    {
                        "201": {
                            **_json(_ref(UploadView), "Newly tracked, and durable."),
                            "headers": {
                                "Location": {
                                    "schema": {"type": "string"},
                                    "description": "/api/v1/ingestions/<percent-encoded id>",
                                }
                            },
                        },
                        "200": _json(
                            {"oneOf": [_ref(UploadView), _ref(Retired)]},
                            "Already tracked (labels replaced if given), or finished and "
                            "retired earlier.",
                        ),
                        "400": _failure(
                            "invalid_json, unknown_field, invalid_field, or a rejected id or "
                            "labels: not_a_string, empty, too_long, control_characters, "
                            "format_characters, not_nfc, bad_labels."
                        ),
                        "408": _failure(
                            "request_timeout: the body did not arrive within "
                            "server.idle_timeout_seconds."
                        ),
                        "409": _failure(
                            "cap_reached: ingestions.max_tracked ids tracked; not_owned: with "
                            "sharding, another replica owns this id (the message names it)."
                        ),
                        "413": _failure(
                            f"payload_too_large: body over {MAX_REGISTRATION_BYTES // 1024} KiB."
                        ),
                        "415": _failure("unsupported_media_type: not application/json."),
                    },
                    "state_unavailable: the state could not be written (or persistence is "
                    "unavailable); the id is not tracked, retry.",
                ),
            },
            "get": {
                "operationId": "listIngestions",
                "summary": "The tracked uploads, a page at a time, in id order",
                "description": "Walk every page by passing each answer's nextCursor as cursor "
                "until it is null. Each id tracked throughout the walk is listed exactly once; "
                "one added or removed meanwhile may or may not be. A page costs O(log n + the "
                "ids it looks at), whatever the number tracked.",
                "parameters": _LIST_PARAMETERS,
                "responses": _protected(
                    {
                        "200": _json(_ref(IngestionList), "The uploads."),
                        "400": _failure(
                            "unknown_parameter, or invalid_parameter: a status that is not one "
                            "of those listed (the message lists them), a limit out of range, a "
                            "cursor this API did not hand out, or one of them given twice."
                        ),
                    }
                ),
            },
        },
        one: {
            "parameters": [_ID_PARAMETER],
            "get": {
                "operationId": "getIngestion",
                "summary": "One tracked upload",
                "responses": _protected(
                    {
                        "200": _json(_ref(UploadView), "The upload."),
                        "404": _failure("not_found: not tracked."),
                    }
                ),
            },
            "delete": {
                "operationId": "deleteIngestion",
                "summary": "Stop tracking an id: for the API source, or for the sources named",
                "description": "Without `source`, the API source lets go of the id. With it, "
                "the sources named do, whichever they are: an id registered by a forged "
                "notification can be deleted too. Each deletion is logged "
                "(admin_ingestion_deleted) with the sources the id had and released. A config "
                "or directory id comes back at the next start while still listed there.",
                "parameters": [_SOURCE_PARAMETER],
                "responses": _protected(
                    {
                        "204": {"description": "Released and removed; its series are gone."},
                        "200": _json(
                            _ref(Released),
                            "Released by the sources named, but another source still holds it.",
                        ),
                        "400": _failure(
                            "unknown_parameter, or invalid_parameter: a source that is none of "
                            "config, directory, api, notification, all."
                        ),
                        "404": _failure("not_found: not tracked."),
                        "409": _failure(
                            "not_registered_by_api: no source named and the API does not hold "
                            "it (the message names its sources); not_held_by_source: none of "
                            "the sources named holds it."
                        ),
                    },
                    "state_unavailable: the state could not be written (or persistence is "
                    "unavailable); the id is still tracked, retry.",
                ),
            },
        },
        f"{one}/report": {
            "parameters": [_ID_PARAMETER],
            "get": {
                "operationId": "getIngestionReport",
                "summary": "Stream a tracked upload's processing report",
                "description": "Asks getCatalogUploadStatus for a fresh reportDownloadLink and "
                "streams the file behind it, as `catalog-upload-exporter report` does: the "
                "report host gets no API credential, redirects are not followed, reports over "
                "api.max_report_bytes are refused, and only a public https host is fetched "
                "(api.report_hosts lists exceptions). The link itself is never shown. If the "
                "transfer fails after the headers were sent, the connection is cut before the "
                "end of the body. The body is the report host's, byte for byte: a report "
                "stored gzip-encoded comes with Content-Encoding: gzip. At most "
                f"{MAX_REPORTS_IN_FLIGHT} reports are fetched at once; a client that leaves "
                "cancels its download.",
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
                            "report_not_ready: no reportDownloadLink yet; the message names "
                            "the status."
                        ),
                        "429": {
                            **_failure(
                                f"too_many_reports: {MAX_REPORTS_IN_FLIGHT} reports are being "
                                "fetched already; try again after Retry-After seconds "
                                f"({REPORTS_RETRY_AFTER_SECONDS})."
                            ),
                            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                        },
                        "502": _failure(
                            "api_error: getCatalogUploadStatus failed; report_download_failed: "
                            "the report host refused, redirected, timed out or broke off, or "
                            "the link was refused before any connection (a host that is not "
                            "public, plain http, user information); report_too_large: over "
                            "api.max_report_bytes. The message names the kind."
                        ),
                    },
                    "reports_unavailable: this listener was started without a report fetcher.",
                ),
            },
        },
        OPENAPI_PATH: {
            "get": {
                "operationId": "getOpenApi",
                "summary": "This document",
                "security": [],
                "responses": _open({"200": _json({"type": "object"}, "The OpenAPI document.")}),
            }
        },
        HEALTH_PATH: {
            "get": {
                "operationId": "health",
                "summary": "The admin listener is alive",
                "security": [],
                "responses": _open({"200": _json(_ref(Health), "Alive.")}),
            }
        },
    }


def _schemas() -> dict[str, Any]:
    """The models' JSON Schemas, keyed by model name: requests as validated, answers as sent."""
    _, top = models_json_schema(
        [
            (RegisterRequest, "validation"),
            *((model, "serialization") for model in _RESPONSES),
        ],
        ref_template=_REF,
    )
    schemas: dict[str, Any] = top["$defs"]
    return schemas


_RESPONSES: tuple[type[BaseModel], ...] = (
    UploadView,
    Retired,
    IngestionList,
    Released,
    Error,
    Health,
)


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document served at /api/v1/openapi.json."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "catalog-upload-exporter admin API",
            "version": __version__,
            "description": "Register, list and delete the ingestionIds the exporter polls. "
            "A 2xx to POST or DELETE is sent only once the change is in the exporter's state "
            "file (when one is configured). Every error is a JSON Error object. When the "
            "exporter has admin.token_file, every operation except /healthz and this document "
            "needs 'Authorization: Bearer <token>'; otherwise no authentication is needed.",
        },
        "servers": [{"url": f"http://127.0.0.1:{DEFAULT_ADMIN_PORT}"}],
        # Bearer or nothing: whether the token is required depends on admin.token_file.
        "security": [{"bearerAuth": []}, {}],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The content of the file named by admin.token_file.",
                }
            },
        },
    }
