"""A fake S3 bucket for the simulator: processing reports behind expiring presigned links.

It owns making a link (an HMAC over the path, the date and the validity, carried in the query
as a presigned S3 URL carries X-Amz-Signature), checking one, and answering as S3 does: 403
for an expired or tampered link, 400 for a request that also carries an API credential (S3's
"only one auth mechanism allowed"), 404 for an unknown key. Every request is recorded with the
names of the credential headers it carried, so tests can prove that none did. It knows nothing
of upload scripts: the simulator asks it for links and says which ids exist.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, unquote

from aiohttp import web

__all__ = ["REPORTS_PATH", "ReportBucket", "ReportRequest"]

#: Where the simulator serves reports: `/reports/<percent-encoded id>.csv?X-Amz-...`.
REPORTS_PATH: Final = "/reports"
#: How long a link is valid unless told otherwise: the Catalog API's 60 minutes.
DEFAULT_LINK_SECONDS: Final = 3600.0

_AMZ_DATE = "%Y%m%dT%H%M%SZ"
_SUFFIX = ".csv"
_CHUNK = 64 * 1024
#: How far ahead of our clock a link's X-Amz-Date may be, as S3 allows.
_CLOCK_SKEW_SECONDS = 300.0
#: Headers that carry a credential whatever their value (X-Amz-* are matched by prefix).
_CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
_HEADER_ROW = "ingestionId,row,severity,code,message\n"
_ROWS = (
    "ERROR,INVALID_FIELD_VALUE,price: expected a decimal number; got 'N/A'",
    "ERROR,MISSING_REQUIRED_FIELD,gtin is required for category 'grocery'",
    "WARNING,VALUE_TRUNCATED,title longer than 200 characters was truncated",
)


@dataclass(frozen=True, slots=True)
class _Refusal:
    status: int
    outcome: str
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class ReportRequest:
    """One request for a report and how it was answered.

    `outcome` is served, redirected, credential, malformed, bad_signature, expired or
    no_such_key;
    `credential_headers` names (lower-case) the headers that carried a credential.
    """

    ingestion_id: str | None
    status: int
    outcome: str
    credential_headers: tuple[str, ...]


class ReportBucket:
    """Signs and serves report links; `wall_clock` decides expiry (inject one in tests).

    `report_bytes` pads each report to at least that size; `chunked` sends it without a
    Content-Length; `gzip` sends it gzip-compressed with `Content-Encoding: gzip`, as S3
    serves an object uploaded with that encoding (`encoded_body` gives those bytes);
    `redirect_to`, when set, answers every valid link with a 302 there.
    `secret_values` gives the credentials the API accepts: a header whose value contains one
    of them counts as a credential header, whatever its name.
    """

    def __init__(
        self,
        *,
        wall_clock: Callable[[], float],
        link_seconds: float = DEFAULT_LINK_SECONDS,
        report_bytes: int = 0,
        chunked: bool = False,
        secret_values: Callable[[], Iterable[str]] = tuple,
    ) -> None:
        if not link_seconds > 0:
            msg = f"link_seconds must be > 0, got {link_seconds}"
            raise ValueError(msg)
        self.link_seconds = link_seconds
        self.report_bytes = report_bytes
        self.chunked = chunked
        self.gzip = False
        self.redirect_to: str | None = None
        self.requests: list[ReportRequest] = []
        self._wall_clock = wall_clock
        self._secret_values = secret_values
        self._key = secrets.token_bytes(32)

    def link(self, origin: str, ingestion_id: str) -> str:
        """A presigned link to this id's report, valid `link_seconds` from now."""
        path = f"{REPORTS_PATH}/{quote(ingestion_id, safe='')}{_SUFFIX}"
        signed_at = dt.datetime.fromtimestamp(self._wall_clock(), tz=dt.UTC)
        amz_date = signed_at.strftime(_AMZ_DATE)
        expires = str(max(1, round(self.link_seconds)))
        token = hashlib.sha256(self._key + path.encode()).hexdigest()[:32]
        credential = quote(
            f"ASIASIMULATOREXAMPLE/{amz_date[:8]}/us-east-1/s3/aws4_request", safe=""
        )
        return (
            f"{origin}{path}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={credential}"
            f"&X-Amz-Date={amz_date}&X-Amz-Expires={expires}&X-Amz-SignedHeaders=host"
            f"&X-Amz-Security-Token=FwoGZXIvYXdzE{token}"
            f"&X-Amz-Signature={self._sign(path, amz_date, expires)}"
        )

    def body(self, ingestion_id: str) -> bytes:
        """The report: a CSV of made-up row errors, padded to `report_bytes`."""
        safe_id = ingestion_id.replace('"', '""')
        lines = [_HEADER_ROW]
        size, row = len(_HEADER_ROW), 0
        while row < len(_ROWS) or size < self.report_bytes:
            severity, code, message = _ROWS[row % len(_ROWS)].split(",", 2)
            line = f'"{safe_id}",{row + 1},{severity},{code},"{message}"\n'
            lines.append(line)
            size += len(line.encode())
            row += 1
        return "".join(lines).encode()

    def encoded_body(self, ingestion_id: str) -> bytes:
        """The report as sent: `body`, gzip-compressed when `gzip` is set (no timestamp, so
        the same bytes each time)."""
        body = self.body(ingestion_id)
        return gzip.compress(body, mtime=0) if self.gzip else body

    async def handle(
        self, request: web.Request, exists: Callable[[str], bool]
    ) -> web.StreamResponse:
        """Answer GET /reports/<key>?<presigned query> as S3 would."""
        raw_path = request.rel_url.raw_path
        key = raw_path[len(REPORTS_PATH) + 1 :]
        ingestion_id = unquote(key[: -len(_SUFFIX)]) if key.endswith(_SUFFIX) else None
        carried = self._credential_headers(request)
        refusal = self._refusal(request, raw_path, carried)
        if refusal is None and self.redirect_to is not None:
            self.requests.append(ReportRequest(ingestion_id, 302, "redirected", ()))
            raise web.HTTPFound(self.redirect_to)
        if refusal is None and ingestion_id is not None and exists(ingestion_id):
            self.requests.append(ReportRequest(ingestion_id, 200, "served", ()))
            return await self._serve(request, self.encoded_body(ingestion_id))
        refusal = refusal or _Refusal(
            404, "no_such_key", "NoSuchKey", "The specified key does not exist."
        )
        self.requests.append(ReportRequest(ingestion_id, refusal.status, refusal.outcome, carried))
        text = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{refusal.code}</Code><Message>{refusal.message}</Message></Error>\n"
        )
        return web.Response(status=refusal.status, text=text, content_type="application/xml")

    async def _serve(self, request: web.Request, body: bytes) -> web.StreamResponse:
        headers = {"Content-Encoding": "gzip"} if self.gzip else {}
        if not self.chunked:
            return web.Response(body=body, content_type="text/csv", headers=headers)
        response = web.StreamResponse(headers={"Content-Type": "text/csv", **headers})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(body), _CHUNK):
            await response.write(body[start : start + _CHUNK])
        await response.write_eof()
        return response

    def _refusal(
        self, request: web.Request, raw_path: str, carried: tuple[str, ...]
    ) -> _Refusal | None:
        """Why S3 would refuse this request, in S3's order of checks; None to serve it."""
        if carried:
            return _Refusal(
                400,
                "credential",
                "InvalidArgument",
                "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, "
                "Signature query string parameter or the Authorization header should be "
                "specified",
            )
        query = request.rel_url.query
        amz_date, expires = query.get("X-Amz-Date", ""), query.get("X-Amz-Expires", "")
        try:
            signed_at = dt.datetime.strptime(amz_date, _AMZ_DATE).replace(tzinfo=dt.UTC)
            valid_for = int(expires)
        except ValueError:
            return _Refusal(
                403,
                "malformed",
                "AuthorizationQueryParametersError",
                "X-Amz-Date and X-Amz-Expires must be present and well formed",
            )
        expected = self._sign(raw_path, amz_date, expires)
        given = query.get("X-Amz-Signature", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(expected.encode(), given):
            return _Refusal(
                403,
                "bad_signature",
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you "
                "provided. Check your key and signing method.",
            )
        now = self._wall_clock()
        if (
            not signed_at.timestamp() - _CLOCK_SKEW_SECONDS
            <= now
            <= signed_at.timestamp() + valid_for
        ):
            return _Refusal(403, "expired", "AccessDenied", "Request has expired")
        return None

    def _sign(self, raw_path: str, amz_date: str, expires: str) -> str:
        message = f"GET\n{raw_path}\n{amz_date}\n{expires}".encode("utf-8", "surrogateescape")
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def _credential_headers(self, request: web.Request) -> tuple[str, ...]:
        values = [v for v in self._secret_values() if v]
        found = []
        for name, value in request.headers.items():
            lowered = name.lower()
            if (
                lowered in _CREDENTIAL_HEADERS
                or lowered.startswith("x-amz-")
                or any(secret in value for secret in values)
            ):
                found.append(lowered)
        return tuple(dict.fromkeys(found))
