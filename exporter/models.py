"""The vocabulary shared by every module: upload statuses, error kinds, poll outcomes, and
what makes an ingestionId acceptable.

Besides naming and ranking it owns one rule, the same for every source of ids (config,
watched directory, admin API): `ingestion_id_problem` and its limits. Parsing lives in
`responses`, I/O in `client`, scheduling in `scheduler`, counting rejections in `tracking`.
"""

from __future__ import annotations

import enum
import functools
import re
import unicodedata
from dataclasses import dataclass

#: The API's limit on an ingestionId's length, in characters.
MAX_INGESTION_ID_LENGTH = 255

#: The largest registration document read, whether a file in the watched directory or an
#: admin API request body: an id and its labels take a few hundred bytes, so anything bigger
#: is a mistake or an attack.
MAX_REGISTRATION_BYTES = 64 * 1024

#: Unicode categories refused in ids and label values: controls, line and paragraph
#: separators, lone surrogates.
_REFUSED_CATEGORIES = frozenset({"Cc", "Zl", "Zp", "Cs"})
#: The category of invisible format characters, refused in ids with a reason of their own.
_FORMAT_CATEGORY = "Cf"
_LAST_CODE_POINT = 0x10FFFF


class Status(enum.StrEnum):
    """Statuses the exporter exposes in `catalog_upload_status{status}`, the only values any
    `status` label, the state file or the admin API ever hold.

    The first five are the API's; INVALID is ours (the API rejected the id) and UNKNOWN means
    no successful poll yet, or a value the API sent that is not a sane identifier. OTHER is a
    sane identifier the API sent outside the five (`PARTIALLY_DONE`, `INPROGRESS_42`): one
    value for all of them, so an API inventing a status per poll cannot grow the series.
    """

    INQUEUE = "INQUEUE"
    INPROGRESS = "INPROGRESS"
    DONE = "DONE"
    CANCELLED = "CANCELLED"
    FATAL = "FATAL"
    INVALID = "INVALID"
    UNKNOWN = "UNKNOWN"
    OTHER = "OTHER"


#: Every status that always has a per-upload series, in exposition order; OTHER has one only
#: while the upload is in it (an eighth series per upload would cost more than it tells).
KNOWN_STATUSES: tuple[str, ...] = tuple(s.value for s in Status if s is not Status.OTHER)

#: Every value a `status` label can take: the aggregates list each, zero or not.
EXPOSED_STATUSES: tuple[str, ...] = tuple(s.value for s in Status)

#: What a value the API sent must look like (after upper-casing) to count as OTHER rather
#: than UNKNOWN: the shape of the API's own values, upper-case words joined by "_".
SANE_STATUS = re.compile(r"[A-Z][A-Z0-9_]{0,63}")

_EXPOSED = frozenset(EXPOSED_STATUSES)


def exposed_status(value: str) -> str:
    """The status label value for `value`: itself when it is one of `EXPOSED_STATUSES`, else
    OTHER for a sane identifier and UNKNOWN for anything else (a state file from an older
    version kept each new value the API sent)."""
    if value in _EXPOSED:
        return value
    return Status.OTHER.value if SANE_STATUS.fullmatch(value) else Status.UNKNOWN.value


#: Statuses after which the API will not change its answer: polling stops.
TERMINAL_STATUSES: frozenset[str] = frozenset({Status.DONE, Status.CANCELLED, Status.FATAL})

#: How far along the upload is, used to pick one status out of a list-valued
#: `processingStatus`: the highest rank wins, so a list naming a terminal state is terminal,
#: and FATAL outranks CANCELLED because it is the one someone must be paged for.
STATUS_RANK: dict[str, int] = {
    Status.INQUEUE: 1,
    Status.INPROGRESS: 2,
    Status.DONE: 3,
    Status.CANCELLED: 4,
    Status.FATAL: 5,
}


class ErrorKind(enum.StrEnum):
    """How a failed poll is classified in `catalog_api_errors_total{kind}`."""

    INVALID_INGESTION_ID = "invalid_ingestion_id"
    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    THROTTLED = "throttled"
    SERVER_ERROR = "server_error"
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    MALFORMED_RESPONSE = "malformed_response"
    UNEXPECTED_STATUS = "unexpected_status"


class AuthProblem(enum.StrEnum):
    """Why a request could not be authenticated before it was sent (the `kind` of
    `catalog_exporter_auth_errors_total`)."""

    NO_CREDENTIALS = "no_credentials"
    CREDENTIALS_ERROR = "credentials_error"
    TOKEN_UNREADABLE = "token_unreadable"  # noqa: S105 - a kind, not a secret
    TOKEN_INVALID = "token_invalid"  # noqa: S105 - a kind, not a secret


#: Kinds worth retrying soon with exponential backoff: the fault is upstream and passing.
RETRYABLE_ERRORS: frozenset[ErrorKind] = frozenset(
    {ErrorKind.THROTTLED, ErrorKind.SERVER_ERROR, ErrorKind.TIMEOUT, ErrorKind.CONNECTION}
)


class RejectReason(enum.StrEnum):
    """Why an incoming id or its labels were refused (the `reason` of the rejection counter)."""

    NOT_A_STRING = "not_a_string"
    EMPTY = "empty"
    TOO_LONG = "too_long"
    CONTROL_CHARACTERS = "control_characters"
    FORMAT_CHARACTERS = "format_characters"
    NOT_NFC = "not_nfc"
    BAD_LABELS = "bad_labels"
    CAP_REACHED = "cap_reached"
    NOT_OWNED = "not_owned"
    NOTIFICATION_CAP = "notification_cap_reached"  # notifications.sqs.max_registered


def ingestion_id_problem(value: object) -> RejectReason | None:
    """What is wrong with a would-be ingestionId, or None if the API could accept it.

    Control characters (Unicode category Cc, and the line/paragraph separators) are refused:
    they would forge log lines and make unreadable label values. So are lone surrogates (Cs),
    which cannot be encoded as UTF-8 and would break every scrape. Format characters (Cf:
    U+202E right-to-left override, U+200B zero-width space, ...) are invisible, so they let
    look-alike ids into dashboards and alerts: refused with a reason of their own. So is an
    id not in Unicode normalization form NFC (`e` + U+0301 where NFC has U+00E9): its two
    spellings render identically but are two ids, and normalizing it instead would poll an id
    the API never issued (an id is sent exactly as written).
    """
    if not isinstance(value, str):
        return RejectReason.NOT_A_STRING
    if not value:
        return RejectReason.EMPTY
    if len(value) > MAX_INGESTION_ID_LENGTH:
        return RejectReason.TOO_LONG
    return _character_problem(value)


def _character_problem(text: str) -> RejectReason | None:
    if refused_character(text) is not None:
        return RejectReason.CONTROL_CHARACTERS
    if format_character(text) is not None:
        return RejectReason.FORMAT_CHARACTERS
    if not_nfc_character(text) is not None:
        return RejectReason.NOT_NFC
    return None


def refused_character(text: str) -> str | None:
    """The first character not allowed in an id or a label value, or None."""
    if text.isascii() and text.isprintable():
        return None  # the usual id, checked at C speed: 100,000 of them at start-up
    return next((c for c in text if unicodedata.category(c) in _REFUSED_CATEGORIES), None)


def format_character(text: str) -> str | None:
    """The first invisible format character (category Cf) in an id, or None."""
    if text.isascii():
        return None  # no ASCII character is in category Cf
    return next((c for c in text if unicodedata.category(c) == "Cf"), None)


def not_nfc_character(text: str) -> int | None:
    """Where `text` first differs from its NFC spelling (an index into `text`), or None when
    it is in NFC."""
    if text.isascii() or unicodedata.is_normalized("NFC", text):
        return None  # every ASCII text is in NFC
    composed = unicodedata.normalize("NFC", text)
    return next(
        (i for i, (a, b) in enumerate(zip(text, composed, strict=False)) if a != b),
        min(len(text), len(composed)),
    )


@functools.cache
def ingestion_id_pattern() -> str:
    """The part of `ingestion_id_problem` a regular expression can say, for JSON Schema:
    no character of a refused category or of Cf, by this Python's Unicode tables.

    The same category sets as the rule, so the two cannot drift apart; the length is
    `MAX_INGESTION_ID_LENGTH` (minLength/maxLength count code points, as len() does). NFC
    is beyond a regular expression. Built on first use (a scan of every code point, about
    0.2 s), never at start-up. BMP characters are written as `\\uXXXX` escapes; those above
    it literally (no escape is common to ECMA-262 and Python), which a JSON file written
    with ensure_ascii keeps printable. `$(?!\\n)`: Python's `$` also matches before a final
    newline, ECMA-262's only at the end; the look-ahead makes both mean the end.
    """
    refused = _REFUSED_CATEGORIES | {_FORMAT_CATEGORY}
    ranges: list[tuple[int, int]] = []
    for point in range(_LAST_CODE_POINT + 1):
        if unicodedata.category(chr(point)) not in refused:
            continue
        if ranges and ranges[-1][1] == point - 1:
            ranges[-1] = (ranges[-1][0], point)
        else:
            ranges.append((point, point))
    members = "".join(
        _class_member(first) if first == last else f"{_class_member(first)}-{_class_member(last)}"
        for first, last in ranges
    )
    return f"^[^{members}]*$(?!\\n)"


def _class_member(point: int) -> str:
    return f"\\u{point:04x}" if point <= 0xFFFF else chr(point)


@dataclass(frozen=True, slots=True)
class StatusReport:
    """A successful poll: the one status we expose and whether a report link was present.

    `raw` is what the API sent (joined with "," when it was a list) for the log line of an
    unknown value (`known` False: exposed as OTHER or UNKNOWN); the report link itself is
    never kept, it is a presigned credential.
    """

    status: str
    report_available: bool
    raw: str
    known: bool = True


@dataclass(frozen=True, slots=True)
class PollError:
    """A failed poll, classified.

    `message` is the API's `errorMsg`/`message`, shortened and stripped of control
    characters; `retry_after` is the server's Retry-After in seconds when it sent one.
    `logged` says it was already logged where it arose (a credentials problem, once for
    every upload it stops), so the poller does not log it again per upload.
    """

    kind: ErrorKind
    message: str = ""
    http_status: int | None = None
    retry_after: float | None = None
    logged: bool = False


PollOutcome = StatusReport | PollError
