"""How each answer of getCatalogUploadStatus is read (docs/api-decisions.md)."""

from __future__ import annotations

import json

import pytest
from multidict import CIMultiDict

from exporter.models import ErrorKind, PollError, StatusReport
from exporter.responses import classify_response, describe_error, parse_retry_after

NO_HEADERS: CIMultiDict[str] = CIMultiDict()


def ok(document: object) -> StatusReport:
    outcome = classify_response(200, json.dumps(document).encode(), NO_HEADERS)
    assert isinstance(outcome, StatusReport), outcome
    return outcome


def error(code: int, body: bytes, **headers: str) -> PollError:
    outcome = classify_response(code, body, CIMultiDict(headers))
    assert isinstance(outcome, PollError), outcome
    return outcome


@pytest.mark.parametrize("status", ["INQUEUE", "INPROGRESS", "DONE", "CANCELLED", "FATAL"])
def test_each_documented_string_status_is_exposed_as_itself(status: str) -> None:
    """A string processingStatus from the spec's list maps to the same status."""
    assert ok({"processingStatus": status, "reportDownloadLink": ""}).status == status


def test_list_status_in_progress_takes_the_most_advanced_value() -> None:
    """["INQUEUE", "INPROGRESS"] (the spec's in-progress example) is INPROGRESS."""
    assert ok({"processingStatus": ["INQUEUE", "INPROGRESS"]}).status == "INPROGRESS"


def test_list_status_failed_is_fatal_because_fatal_outranks_cancelled() -> None:
    """["CANCELLED", "FATAL"] (the spec's failed example) is FATAL, the one that pages."""
    assert ok({"processingStatus": ["CANCELLED", "FATAL"]}).status == "FATAL"


def test_terminal_value_in_a_list_wins_over_earlier_states() -> None:
    """Any terminal value in a list makes the upload terminal."""
    assert ok({"processingStatus": ["INPROGRESS", "DONE"]}).status == "DONE"


def test_status_is_matched_case_insensitively_and_trimmed() -> None:
    """ " done " is DONE: be liberal in what is accepted."""
    assert ok({"processingStatus": " done "}).status == "DONE"


@pytest.mark.parametrize("value", ["PARTIALLY_DONE", "INPROGRESS_42", "on_hold", "OTHER"])
def test_an_unknown_sane_status_is_exposed_as_other_and_kept_raw_for_the_log(value: str) -> None:
    """A new identifier-like value becomes OTHER (never a label value of its own), is marked
    not known, and its spelling is kept in `raw` for the once-per-value log line."""
    report = ok({"processingStatus": value})
    assert (report.status, report.known, report.raw) == ("OTHER", False, value)


@pytest.mark.parametrize("value", ["in progress (50%)", "", "x" * 100, 'A"B', "ÄNDERUNG"])
def test_unknown_value_that_is_not_an_identifier_becomes_unknown(value: str) -> None:
    """Values that would make odd label values are exposed as UNKNOWN."""
    report = ok({"processingStatus": value})
    assert (report.status, report.known) == ("UNKNOWN", False)


def test_known_value_beats_unknown_values_in_a_list() -> None:
    """Unknown values count only when the list names no known one."""
    assert ok({"processingStatus": ["NEWTHING", "INQUEUE"]}).status == "INQUEUE"


def test_report_available_only_for_a_non_empty_link() -> None:
    """reportDownloadLink: non-empty string → available; empty, missing or odd type → not."""
    link = "https://bucket.s3.amazonaws.com/r.csv?X-Amz-Signature=abc"
    assert ok({"processingStatus": "DONE", "reportDownloadLink": link}).report_available
    assert not ok({"processingStatus": "DONE", "reportDownloadLink": ""}).report_available
    assert not ok({"processingStatus": "DONE"}).report_available
    assert not ok({"processingStatus": "DONE", "reportDownloadLink": 7}).report_available


def test_report_link_is_not_kept_anywhere_in_the_outcome() -> None:
    """The presigned link is a credential: the parsed outcome does not carry it."""
    link = "https://bucket.s3.amazonaws.com/r.csv?X-Amz-Signature=SECRETSIG"
    report = ok({"processingStatus": "DONE", "reportDownloadLink": link})
    assert "SECRETSIG" not in repr(report)


def test_unknown_fields_are_ignored() -> None:
    """New attributes (the spec warns they will come) do not disturb parsing."""
    assert ok({"processingStatus": "DONE", "newField": {"a": [1]}}).status == "DONE"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"",
        b"[1,2]",
        b'"DONE"',
        b'{"processingStatus": 5}',
        b'{"processingStatus": []}',
        b'{"processingStatus": ["DONE", 3]}',
        b'{"reportDownloadLink": ""}',
        b'{"processingStatus": "DO',
    ],
)
def test_malformed_200_bodies_are_classified_not_raised(body: bytes) -> None:
    """Anything unusable in a 200 is a malformed_response error."""
    assert error(200, body).kind is ErrorKind.MALFORMED_RESPONSE


def test_invalid_ingestion_id_from_documented_errormsg() -> None:
    """400 {"errorMsg": "API invoked with Invalid parameter"} is invalid_ingestion_id."""
    outcome = error(400, b'{"errorMsg": "API invoked with Invalid parameter"}')
    assert outcome.kind is ErrorKind.INVALID_INGESTION_ID
    assert outcome.message == "API invoked with Invalid parameter"


def test_bad_request_from_documented_message() -> None:
    """400 {"message": "Invalid request body"} is bad_request."""
    assert error(400, b'{"message": "Invalid request body"}').kind is ErrorKind.BAD_REQUEST


def test_api_gateway_error_type_header_decides_a_400() -> None:
    """x-amzn-ErrorType names the exception and takes precedence over the text."""
    body = b'{"message": "something"}'
    invalid = error(400, body, **{"x-amzn-ErrorType": "InvalidRequestException:http://x"})
    assert invalid.kind is ErrorKind.INVALID_INGESTION_ID
    bad = error(400, body, **{"x-amzn-ErrorType": "BadRequestException"})
    assert bad.kind is ErrorKind.BAD_REQUEST


def test_unrecognised_400_is_bad_request_not_invalid() -> None:
    """Only clear evidence marks an upload INVALID."""
    assert error(400, b"<html>oops</html>").kind is ErrorKind.BAD_REQUEST


@pytest.mark.parametrize("code", [401, 403])
def test_401_and_403_are_unauthorized(code: int) -> None:
    """Bad or expired credentials."""
    assert error(code, b'{"message": "Forbidden"}').kind is ErrorKind.UNAUTHORIZED


@pytest.mark.parametrize(
    "body", [b'{"message": "Too Many Requests"}', b'{"errorMsg": "Too Many Requests"}']
)
def test_429_is_throttled_with_either_message_key(body: bytes) -> None:
    """429 bodies carry errorMsg or message; both are read."""
    outcome = error(429, body)
    assert (outcome.kind, outcome.message) == (ErrorKind.THROTTLED, "Too Many Requests")


def test_429_retry_after_seconds_is_read() -> None:
    """Retry-After in seconds is carried to the scheduler."""
    assert error(429, b"", **{"Retry-After": "3"}).retry_after == 3.0


@pytest.mark.parametrize("code", [500, 502, 503, 504])
def test_5xx_is_server_error_even_with_html(code: int) -> None:
    """Gateways answer 5xx with HTML; the kind does not depend on the body."""
    outcome = error(code, b"<html><body>Bad Gateway</body></html>")
    assert outcome.kind is ErrorKind.SERVER_ERROR
    assert "Bad Gateway" in outcome.message


@pytest.mark.parametrize("code", [204, 301, 404, 418])
def test_other_codes_are_unexpected_status(code: int) -> None:
    """Anything else is unexpected_status, with its code kept."""
    outcome = error(code, b"")
    assert (outcome.kind, outcome.http_status) == (ErrorKind.UNEXPECTED_STATUS, code)


def test_error_message_is_shortened_and_stripped_of_control_characters() -> None:
    """A hostile body cannot forge log lines or flood them."""
    body = json.dumps({"errorMsg": "line1\nlevel=error fake\r\x00" + "x" * 1000}).encode()
    message = error(500, body).message
    assert "\n" not in message and "\r" not in message and "\x00" not in message
    assert len(message) <= 200


def test_an_error_is_described_by_its_type_and_cleaned_text() -> None:
    """describe_error: `Type: text` on one line, at most 200 characters of text, no credential
    (botocore and SQLite quote what a hostile endpoint or file said)."""
    hostile = PermissionError("denied\nlevel=error forged token=hunter2 " + "x" * 1000)
    described = describe_error(hostile)
    assert described.startswith("PermissionError: denied level=error forged token=")
    assert "\n" not in described and "hunter2" not in described
    assert len(described) <= len("PermissionError: ") + 200


def test_an_error_without_text_is_described_by_its_type() -> None:
    """An exception with no message still says what failed."""
    assert describe_error(TimeoutError()) == "TimeoutError"
    assert describe_error(ValueError("  \n ")) == "ValueError"


PRESIGNED = (
    "https://reports.s3.amazonaws.com/r/up-1.csv?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=ASIAEXAMPLE%2F20240101&X-Amz-Security-Token=FwoGZXIvSECRET"
    "&X-Amz-Signature=5ec7e7"
)


@pytest.mark.parametrize(
    "body",
    [
        json.dumps({"errorMsg": f"report at {PRESIGNED}"}).encode(),
        json.dumps({"message": f"report at {PRESIGNED}"}, ensure_ascii=True)
        .replace("/", "\\/")
        .encode(),
        f"<html><a href='{PRESIGNED}'>report</a></html>".encode(),
        b"X-Amz-Signature=5ec7e7 X-Amz-Security-Token=FwoGZXIvSECRET",
    ],
    ids=["json-errorMsg", "json-escaped-slashes", "html", "bare-parameters"],
)
def test_a_presigned_link_in_an_error_body_loses_its_query_string(body: bytes) -> None:
    """Error messages are logged: a link in one keeps its path, never its credential."""
    message = error(502, body).message
    for secret in ("5ec7e7", "FwoGZXIvSECRET", "ASIAEXAMPLE"):
        assert secret not in message
    assert "<redacted>" in message


def test_retry_after_http_date_is_converted_to_seconds() -> None:
    """Retry-After may be an HTTP-date; it becomes seconds from now."""
    now = 1_700_000_000.0  # 2023-11-14T22:13:20Z
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:30 GMT", now=now) == pytest.approx(10.0)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("-5", 0.0), ("1e9", 1e9), ("soon", None), ("nan", None), ("inf", None), (None, None)],
)
def test_retry_after_is_clamped_or_ignored_when_odd(
    value: str | None, expected: float | None
) -> None:
    """Negative → 0, huge is kept (polling.max_backoff_seconds bounds it), nonsense → ignored."""
    assert parse_retry_after(value) == expected


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("gateway echoed Authorization: Bearer tok-6f1c2d0e-SECRET", "tok-6f1c2d0e-SECRET"),
        ('{"authorization": "Bearer abc123def456"}', "abc123def456"),
        ("see https%3A%2F%2Fb.s3.example%2Fr.csv%3FX-Amz-Signature%3Ddeadbeef", "deadbeef"),
        ("split %3FX-Amz-Signature%3Ddeadbeef%26X-Amz-Date%3D1", "deadbeef"),
        ("Signature=c0ffee%2B&AWSAccessKeyId=AKIAOLDKEY&Expires=1", "c0ffee"),
        ("Signature=c0ffee%2B&AWSAccessKeyId=AKIAOLDKEY&Expires=1", "AKIAOLDKEY"),
        ("via https://admin:hunter2@internal.example/x", "hunter2"),
        ("via https%3A%2F%2Fadmin%3Ahunter2%40internal.example", "hunter2"),
        ('X-Amz-Signature="5ec7e7 with space"', "5ec7e7"),
        ("X-Amz-Security-Token='FwoGZXIvSECRET'", "FwoGZXIvSECRET"),
        ("Authorization: AWS4-HMAC-SHA256 Credential=AKID/x, Signature=abcdef012345", "abcdef"),
    ],
)
def test_credentials_echoed_in_an_error_message_are_redacted(text: str, secret: str) -> None:
    """Each form a gateway may echo a credential in loses the credential before any log."""
    message = error(502, json.dumps({"message": text}).encode()).message
    assert secret not in message
    assert "<redacted>" in message


def test_ordinary_error_messages_are_left_readable() -> None:
    """Redaction does not eat the API's own messages."""
    for text in ("Missing Authentication Token", "API invoked with Invalid parameter"):
        assert error(403, json.dumps({"message": text}).encode()).message == text
