"""Turn one HTTP answer of getCatalogUploadStatus into a `StatusReport` or a `PollError`.

Pure functions, no I/O: every byte string the API may send maps to an outcome, never to an
exception. The decisions taken where the API text is ambiguous are listed in
docs/api-decisions.md and pinned by tests/test_responses.py.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
import time
import unicodedata
import urllib.parse
from collections.abc import Mapping

from exporter.models import (
    SANE_STATUS,
    STATUS_RANK,
    ErrorKind,
    PollError,
    PollOutcome,
    Status,
    StatusReport,
)

#: Longest API error message kept for logs; the rest is cut.
MAX_MESSAGE_CHARS = 200

#: `=` and `&` as they appear plain, percent-encoded, or encoded twice (a link inside a link).
_EQ = r"(?:=|%(?:25)?3[dD])"
_AMP = r"%(?:25)?26"
#: Start of a name: not inside a word, but right after a percent-escape (`%3FX-Amz-...`).
_NAME_START = r"(?:(?<![A-Za-z0-9_-])|(?<=%[0-9A-Fa-f]{2}))"
#: A value: quoted as a whole, or up to the next separator (plain or percent-encoded `&`).
_VALUE = rf"""(?:"[^"]*"|'[^']*'|(?:(?!{_AMP})[^\s&"'<>,;])+)"""

#: A URL's query string, where a presigned S3 link carries its credential and signature.
_URL_QUERY = re.compile(r"(?i)\b(https?://[^\s?#\"'<>]*)\?[^\s#\"'<>]*")
#: The same, percent-encoded (a link quoted inside another URL): `https%3A%2F%2F...%3F...`.
_ENCODED_URL_QUERY = re.compile(
    r"(?i)\b(https?%(?:25)?3A(?:(?!%(?:25)?3F)[^\s?#\"'<>&])*)%(?:25)?3F[^\s#\"'<>&]*"
)
#: `user:password@` in a URL, plain or percent-encoded.
_USERINFO = re.compile(
    r"(?i)(//|%(?:25)?2F%(?:25)?2F)((?:(?!%(?:25)?2F)[^/\s@\"'<>?#])+?)(@|%(?:25)?40)"
)
#: Parameters and fields whose value is a credential: SigV4 and SigV2 query parameters,
#: OAuth-style tokens, API keys; as `name=value`, `name: value` or `"name": "value"`.
_SECRET_FIELD = re.compile(
    rf"""(?i){_NAME_START}(X-Amz-[A-Za-z-]+|Signature|AWSAccessKeyId|Credential|access_token"""
    rf"""|id_token|refresh_token|client_secret|api[_-]?key|password|passwd|secret|token|sig)"""
    rf"""("?\s*(?::|{_EQ})\s*){_VALUE}"""
)
#: An echoed Authorization header: its scheme is kept, its credential is not.
_AUTHORIZATION = re.compile(
    rf"""(?i)\b((?:proxy-)?authorization"?\s*[:=]\s*"?)(?:([A-Za-z][A-Za-z0-9-]*)\s+)?{_VALUE}"""
)
#: A bearer or basic credential wherever it stands (long enough not to be a plain word).
_SCHEME_CREDENTIAL = re.compile(r"(?i)\b(Bearer|Basic)\s+[A-Za-z0-9\-._~+/]{8,}=*")
#: Cheap test for text that may hold one of the forms above; most texts (statuses) do not.
_MAYBE_SECRET = re.compile(r"(?i)[=%@:]|bearer|basic")

_INVALID_ID_HINTS = ("invalid parameter", "ingestionid", "ingestion id", "not associated")
_BAD_REQUEST_HINTS = ("request body", "request model")


def classify_response(
    http_status: int, body: bytes, headers: Mapping[str, str], *, now: float | None = None
) -> PollOutcome:
    """Classify one answer. `headers` must be case-insensitive (aiohttp's CIMultiDict is)."""
    if http_status == 200:
        return parse_status_body(body)
    if 300 <= http_status <= 399:
        # Not followed (see client): an unexpected_status whose log names the Location's host
        # only; its body and full Location may carry a signed link.
        message = redirect_message(headers.get("Location"))
    else:
        message = error_message(body)
    if http_status == 429:
        return PollError(
            ErrorKind.THROTTLED,
            message,
            http_status,
            parse_retry_after(headers.get("Retry-After"), now=now),
        )
    if http_status == 400:
        return PollError(_classify_400(message, headers), message, http_status)
    if http_status in (401, 403):
        return PollError(ErrorKind.UNAUTHORIZED, message, http_status)
    if 500 <= http_status <= 599:
        retry_after = parse_retry_after(headers.get("Retry-After"), now=now)
        return PollError(ErrorKind.SERVER_ERROR, message, http_status, retry_after)
    return PollError(ErrorKind.UNEXPECTED_STATUS, message, http_status)


def parse_status_body(body: bytes) -> PollOutcome:
    """Read a 200 body: `processingStatus` as a string or a list, unknown fields ignored."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return PollError(ErrorKind.MALFORMED_RESPONSE, "body is not JSON", 200)
    if not isinstance(document, dict):
        return PollError(ErrorKind.MALFORMED_RESPONSE, "body is not a JSON object", 200)
    raw = document.get("processingStatus")
    values: list[str]
    if isinstance(raw, str):
        values = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(v, str) for v in raw):
        values = list(raw)
    else:
        return PollError(
            ErrorKind.MALFORMED_RESPONSE,
            "processingStatus is missing or neither a string nor a list of strings",
            200,
        )
    link = document.get("reportDownloadLink")
    report_available = isinstance(link, str) and link.strip() != ""
    status, known = pick_status(values)
    return StatusReport(status, report_available, clean_text(",".join(values)), known)


def pick_status(values: list[str]) -> tuple[str, bool]:
    """One status out of what the API sent, and whether it was one of the known values.

    Values are compared case-insensitively after trimming. Among known values the most
    advanced wins (see `STATUS_RANK`); unknown values count only when no known one is present,
    and then any sane one (`models.SANE_STATUS`) is exposed as OTHER, else UNKNOWN: never as
    itself, so the label values stay a fixed set whatever the API invents.
    """
    normalised = [v.strip().upper() for v in values]
    known = [v for v in normalised if v in STATUS_RANK]
    if known:
        return max(known, key=STATUS_RANK.__getitem__), True
    # INVALID and UNKNOWN are ours: the API sending them is not a sane value of its own.
    ours = (Status.INVALID.value, Status.UNKNOWN.value)
    if any(SANE_STATUS.fullmatch(v) and v not in ours for v in normalised):
        return Status.OTHER.value, False
    return Status.UNKNOWN.value, False


def redirect_message(location: str | None) -> str:
    """What is logged of a redirect: the Location's host only, never its path or query."""
    if not location:
        return "redirect without a Location, not followed"
    try:
        host = urllib.parse.urlsplit(location.strip()).hostname
    except ValueError:
        host = None
    if not host:
        return "redirect to a relative or unreadable Location, not followed"
    return f"redirect to host {clean_text(host)}, not followed"


def error_message(body: bytes) -> str:
    """The API's error text: `errorMsg` or `message` from a JSON body, else the body's start."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        document = None
    if isinstance(document, dict):
        for key in ("errorMsg", "message", "Message"):
            value = document.get(key)
            if isinstance(value, str):
                return clean_text(value)
    return clean_text(body[: MAX_MESSAGE_CHARS * 4].decode("utf-8", errors="replace"))


def clean_text(text: str) -> str:
    """Shorten and drop control characters so a hostile body cannot forge log lines, and
    redact what may be a credential: URL query strings (a presigned report link), signing
    parameters, `user:pass@`, echoed Authorization headers and bearer tokens, plain,
    quoted or percent-encoded."""
    if _MAYBE_SECRET.search(text):
        text = redact(text)
    kept = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in text)
    kept = " ".join(kept.split())
    if len(kept) > MAX_MESSAGE_CHARS:
        return kept[: MAX_MESSAGE_CHARS - 1] + "…"
    return kept


def describe_error(exc: BaseException) -> str:
    """An exception as `Type: text` for a log line or a message, the text through `clean_text`.

    The one way an error reaches a log or a problem string: botocore, SQLite and the OS quote
    what a hostile endpoint or file said, so the text is shortened, kept on one line and
    stripped of anything shaped like a credential. The type says what failed when the text
    alone would not ("database is locked" from which library?).
    """
    text = clean_text(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def redact(text: str) -> str:
    """`text` with every credential-shaped part replaced by `<redacted>` (see `clean_text`)."""
    text = _URL_QUERY.sub(r"\1?<redacted>", text)
    text = _ENCODED_URL_QUERY.sub(r"\1%3F<redacted>", text)
    text = _USERINFO.sub(r"\1<redacted>\3", text)
    text = _AUTHORIZATION.sub(_keep_scheme, text)
    text = _SECRET_FIELD.sub(r"\1\2<redacted>", text)
    return _SCHEME_CREDENTIAL.sub(r"\1 <redacted>", text)


def _keep_scheme(match: re.Match[str]) -> str:
    scheme = match.group(2)
    return f"{match.group(1)}{scheme} <redacted>" if scheme else f"{match.group(1)}<redacted>"


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Retry-After as seconds from now (delta-seconds or HTTP-date), at least 0.

    Not capped here: the scheduler and the rate limiter honour it up to
    `polling.max_backoff_seconds`, the one place that bound is configured."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(seconds, 0.0)


def _classify_400(message: str, headers: Mapping[str, str]) -> ErrorKind:
    """Tell "this id is invalid" from "our request was malformed".

    API Gateway names the exception in `x-amzn-ErrorType`; failing that, the documented
    messages are matched. An unrecognised 400 is `bad_request`: only clear evidence marks
    an upload INVALID.
    """
    error_type = headers.get("x-amzn-ErrorType", "")
    if error_type.startswith("InvalidRequestException"):
        return ErrorKind.INVALID_INGESTION_ID
    if error_type.startswith("BadRequestException"):
        return ErrorKind.BAD_REQUEST
    lowered = message.lower()
    if any(hint in lowered for hint in _BAD_REQUEST_HINTS):
        return ErrorKind.BAD_REQUEST
    if any(hint in lowered for hint in _INVALID_ID_HINTS):
        return ErrorKind.INVALID_INGESTION_ID
    return ErrorKind.BAD_REQUEST


def report_download_link(body: bytes) -> str:
    """A 200 body's `reportDownloadLink`, trimmed, or "" when there is none.

    The link is a presigned credential: only the report download may use it, and nothing
    may log, print or keep it.
    """
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return ""
    link = document.get("reportDownloadLink") if isinstance(document, dict) else None
    return link.strip() if isinstance(link, str) else ""
