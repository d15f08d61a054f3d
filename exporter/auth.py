"""Request authentication for the Catalog API: SigV4 signing, bearer tokens, or nothing.

This module owns turning (method, url, body, headers) into the extra headers that authenticate
one request, and obtaining the credentials to do so. It sends nothing over HTTP itself, never
blocks the event loop (AWS credential look-ups and token file reads run in a thread) and never
lets a secret reach an exception message or a log line.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Literal, Protocol, get_args

import botocore.auth
import botocore.credentials
import botocore.session
from botocore.awsrequest import AWSRequest

from exporter.models import AuthProblem
from exporter.responses import describe_error
from exporter.secretfile import SecretFile, SecretFileProblem, SecretProblem

__all__ = [
    "AUTH_TYPES",
    "TOKEN_RECHECK_SECONDS",
    "AuthType",
    "AuthUnavailable",
    "BearerAuth",
    "NoAuth",
    "RequestAuth",
    "SigV4Auth",
    "create_auth",
    "silence_botocore_debug",
]

#: How requests to the API are authenticated (`api.auth.type`): the one list of the choices,
#: which config, the simulator and `create_auth` take from here.
AuthType = Literal["sigv4", "bearer", "none"]
AUTH_TYPES: tuple[str, ...] = get_args(AuthType)

#: The session name CloudTrail shows for the role this exporter assumes.
ROLE_SESSION_NAME = "catalog-upload-exporter"

#: A bearer token file is checked for a change at most this often (seconds).
TOKEN_RECHECK_SECONDS = 1.0

#: After a failed credential look-up, callers within this many seconds get the same error
#: without a new look-up: the chain may probe instance metadata, which takes seconds to fail.
_FAILURE_BACKOFF_SECONDS = 5.0

#: Only these headers of the caller's are signed: the HTTP client may add or rewrite others
#: (Accept-Encoding, Content-Length...) after we sign, which would break the signature.
_SIGNED_CALLER_HEADERS = frozenset({"host", "content-type"})

_NO_CREDENTIALS = (
    "no AWS credentials found in the default chain (environment variables, shared "
    "config/credentials files, web identity token, container credentials, instance metadata)"
)


class AuthUnavailable(Exception):
    """Credentials could not be obtained (no AWS credentials in the chain, token file
    unreadable...). The message never contains a secret; `kind` classifies it for a counter."""

    def __init__(self, message: str, kind: AuthProblem = AuthProblem.CREDENTIALS_ERROR) -> None:
        super().__init__(message)
        self.kind = kind


class RequestAuth(Protocol):
    """Something that authenticates one Catalog API request."""

    async def headers(
        self, method: str, url: str, body: bytes, headers: Mapping[str, str]
    ) -> dict[str, str]:
        """Headers to ADD to the request (e.g. Authorization, X-Amz-Date,
        X-Amz-Security-Token). Raises AuthUnavailable."""
        ...

    def held_secrets(self) -> tuple[str, ...]:
        """The secrets held right now, for the log mask: cheap, no I/O, never raises."""
        ...


class NoAuth:
    """No authentication: for a local simulator or an API behind an authenticating proxy."""

    async def headers(
        self, method: str, url: str, body: bytes, headers: Mapping[str, str]
    ) -> dict[str, str]:
        """Nothing to add."""
        return {}

    def held_secrets(self) -> tuple[str, ...]:
        """None."""
        return ()


class BearerAuth:
    """A static bearer token read from a file (re-read when it changes) or an env variable.

    The file is read by a `SecretFile` (regular files only, at most `MAX_SECRET_BYTES`, never
    waiting on a FIFO), in a thread, and at most once per `recheck_seconds` (by `clock`)
    whatever the answer: within that time every call gets the token, or the problem, found
    last, with no I/O at all. After it, one stat() (following links: Kubernetes rotates a
    mounted secret by swapping a symlink) tells whether the file changed; only a changed file
    is read again, so a rotated or fixed token is picked up within `recheck_seconds`, and an
    unusable file (a FIFO, 1 GiB) costs one stat() a second, not a read per request.
    """

    def __init__(
        self,
        *,
        token_file: str = "",
        token_env: str = "",
        header: str = "Authorization",
        scheme: str = "Bearer",
        environ: Mapping[str, str] | None = None,
        recheck_seconds: float = TOKEN_RECHECK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not token_file and not token_env:
            msg = "BearerAuth needs token_file or token_env"
            raise ValueError(msg)
        if not header:
            msg = "BearerAuth needs a header name"
            raise ValueError(msg)
        self._file = SecretFile(token_file, check=_token_problem) if token_file else None
        self._token_env = token_env
        self._header = header
        self._scheme = scheme
        self._environ: Mapping[str, str] = os.environ if environ is None else environ
        self._recheck = recheck_seconds
        self._clock = clock
        self._lock = asyncio.Lock()
        self._file_answer: str | SecretFileProblem | None = None  # the last read's, if any
        self._file_token = ""  # the last good token, masked in logs even once rotated out
        self._env_token = ""
        self._checked_at = 0.0  # by `clock`, when the file was last looked at

    @property
    def token_file(self) -> SecretFile | None:
        """The token file's reader (None with `token_env`)."""
        return self._file

    async def headers(
        self, method: str, url: str, body: bytes, headers: Mapping[str, str]
    ) -> dict[str, str]:
        """The token header, e.g. `Authorization: Bearer <token>`."""
        file = self._file
        token = await self._from_file(file) if file is not None else self._from_env()
        value = f"{self._scheme} {token}" if self._scheme else token
        return {self._header: value}

    def held_secrets(self) -> tuple[str, ...]:
        """The token last read (from the file or the environment)."""
        return tuple(t for t in (self._file_token, self._env_token) if t)

    async def _from_file(self, file: SecretFile) -> str:
        answer = self._recent_answer()
        if answer is None:
            async with self._lock:
                # Another caller may have looked at the file while this one waited.
                answer = self._recent_answer()
                if answer is None:
                    answer = await asyncio.to_thread(file.read)
                    self._file_answer = answer
                    self._checked_at = self._clock()
                    if isinstance(answer, str):
                        self._file_token = answer
        if isinstance(answer, SecretFileProblem):
            raise AuthUnavailable(answer.message, _AUTH_PROBLEMS[answer.reason])
        return answer

    def _recent_answer(self) -> str | SecretFileProblem | None:
        """The last answer if the file was looked at less than `recheck_seconds` ago."""
        if self._file_answer is None or self._clock() - self._checked_at >= self._recheck:
            return None
        return self._file_answer

    def _from_env(self) -> str:
        name = self._token_env
        token = self._environ.get(name, "").strip()
        if not token:
            msg = f"environment variable {name} is empty or unset"
            raise AuthUnavailable(msg, AuthProblem.TOKEN_INVALID)
        problem = _token_problem(token)
        if problem is not None:
            raise AuthUnavailable(
                f"environment variable {name} {problem}", AuthProblem.TOKEN_INVALID
            )
        self._env_token = token
        return token


#: How each problem of a token file is counted (`catalog_exporter_auth_errors_total{kind}`):
#: the file could not be used at all, or it was read and holds no usable token.
_AUTH_PROBLEMS: dict[SecretProblem, AuthProblem] = {
    SecretProblem.UNREADABLE: AuthProblem.TOKEN_UNREADABLE,
    SecretProblem.NOT_REGULAR: AuthProblem.TOKEN_UNREADABLE,
    SecretProblem.TOO_LARGE: AuthProblem.TOKEN_UNREADABLE,
    SecretProblem.NOT_UTF8: AuthProblem.TOKEN_INVALID,
    SecretProblem.EMPTY: AuthProblem.TOKEN_INVALID,
    SecretProblem.INVALID: AuthProblem.TOKEN_INVALID,
}


def _token_problem(token: str) -> str | None:
    """Why a (stripped, non-empty) token cannot be sent, or None. A newline or control
    character would let the token inject headers; the wording says where, never what."""
    if any(c.isspace() or not c.isprintable() for c in token):
        return "contains whitespace or control characters inside the token"
    return None


class SigV4Auth:
    """AWS Signature Version 4 for API Gateway (`execute-api`), signed by botocore.

    Credentials come from the standard botocore chain (environment, shared profile, web
    identity as in EKS IRSA, container credentials as in EKS Pod Identity, instance
    metadata), optionally through an assumed role. Look-ups and refreshes are network calls,
    so they run in a thread; the frozen credentials are cached and re-read every
    `refresh_interval` seconds, which lets botocore refresh them well before they expire.
    """

    def __init__(
        self,
        *,
        region: str,
        role_arn: str = "",
        service: str = "execute-api",
        credentials: botocore.credentials.Credentials | None = None,
        session: botocore.session.Session | None = None,
        refresh_interval: float = 60.0,
    ) -> None:
        if not region:
            msg = "SigV4Auth needs a region"
            raise ValueError(msg)
        if refresh_interval < 0:
            msg = "refresh_interval must be >= 0"
            raise ValueError(msg)
        self._region = region
        self._role_arn = role_arn
        self._service = service
        self._session = session
        self._refresh_interval = refresh_interval
        self._source: botocore.credentials.Credentials | None = credentials
        self._lock = asyncio.Lock()
        self._frozen: botocore.credentials.ReadOnlyCredentials | None = None
        self._fetched_at = 0.0
        self._failure: tuple[str, AuthProblem] | None = None
        self._failed_at = 0.0

    async def headers(
        self, method: str, url: str, body: bytes, headers: Mapping[str, str]
    ) -> dict[str, str]:
        """Authorization, X-Amz-Date, and X-Amz-Security-Token when there is a session token.

        The signature covers the method, the full URL, the exact body bytes and the caller's
        Host and Content-Type headers (Host is derived from the URL when absent).
        """
        creds = await self._credentials()
        to_sign = {k.lower(): v for k, v in headers.items() if k.lower() in _SIGNED_CALLER_HEADERS}
        request = AWSRequest(method=method.upper(), url=url, data=body, headers=to_sign)
        botocore.auth.SigV4Auth(creds, self._service, self._region).add_auth(request)
        signed = request.headers
        out = {"Authorization": signed["Authorization"], "X-Amz-Date": signed["X-Amz-Date"]}
        if creds.token:
            out["X-Amz-Security-Token"] = creds.token
        if "X-Amz-Content-SHA256" in signed:
            out["X-Amz-Content-Sha256"] = signed["X-Amz-Content-SHA256"]
        return out

    def held_secrets(self) -> tuple[str, ...]:
        """The secret access key and session token of the credentials in use."""
        frozen = self._frozen
        if frozen is None:
            return ()
        return tuple(s for s in (frozen.secret_key, frozen.token) if s)

    async def _credentials(self) -> botocore.credentials.ReadOnlyCredentials:
        frozen = self._fresh()
        if frozen is not None:
            return frozen
        async with self._lock:
            # Another caller may have refreshed while this one waited for the lock.
            frozen = self._fresh()
            if frozen is not None:
                return frozen
            backoff = min(_FAILURE_BACKOFF_SECONDS, self._refresh_interval)
            if self._failure is not None and time.monotonic() - self._failed_at < backoff:
                raise AuthUnavailable(*self._failure)
            try:
                frozen = await asyncio.to_thread(self._fetch)
            except AuthUnavailable as exc:
                self._frozen = None
                self._failure = (str(exc), exc.kind)
                self._failed_at = time.monotonic()
                raise
            self._frozen = frozen
            self._fetched_at = time.monotonic()
            self._failure = None
            return frozen

    def _fresh(self) -> botocore.credentials.ReadOnlyCredentials | None:
        if self._frozen is None:
            return None
        if time.monotonic() - self._fetched_at >= self._refresh_interval:
            return None
        return self._frozen

    def _fetch(self) -> botocore.credentials.ReadOnlyCredentials:
        """Resolve the chain once, then freeze (and maybe refresh) it. Runs in a thread."""
        source = self._source
        if source is None:
            session = self._session if self._session is not None else botocore.session.Session()
            try:
                base = session.get_credentials()
            except Exception as exc:  # botocore's providers raise many unrelated types
                msg = f"could not resolve AWS credentials: {describe_error(exc)}"
                raise AuthUnavailable(msg) from None
            if base is None:
                raise AuthUnavailable(_NO_CREDENTIALS, AuthProblem.NO_CREDENTIALS)
            if self._role_arn:
                fetcher = botocore.credentials.AssumeRoleCredentialFetcher(
                    client_creator=functools.partial(
                        session.create_client, region_name=self._region
                    ),
                    source_credentials=base,
                    role_arn=self._role_arn,
                    extra_args={"RoleSessionName": ROLE_SESSION_NAME},
                )
                source = botocore.credentials.DeferredRefreshableCredentials(
                    method="assume-role", refresh_using=fetcher.fetch_credentials
                )
            else:
                source = base
            # Kept only on success, so a chain that finds nothing is searched again later.
            self._source = source
        try:
            frozen = source.get_frozen_credentials()
        except Exception as exc:  # STS, IMDS or a credential process failing in any way
            what = f"assume role {self._role_arn}" if self._role_arn else "refresh AWS credentials"
            msg = f"could not {what}: {describe_error(exc)}"
            raise AuthUnavailable(msg) from None
        if not frozen.access_key or not frozen.secret_key:
            raise AuthUnavailable(_NO_CREDENTIALS, AuthProblem.NO_CREDENTIALS)
        return frozen


def create_auth(
    *,
    type: str,
    region: str = "",
    role_arn: str = "",
    token_file: str = "",
    token_env: str = "",
    header: str = "Authorization",
    scheme: str = "Bearer",
    credentials: botocore.credentials.Credentials | None = None,
) -> RequestAuth:
    """Build the authenticator an `AuthConfig` describes ("sigv4", "bearer" or "none")."""
    if type == "sigv4":
        return SigV4Auth(region=region, role_arn=role_arn, credentials=credentials)
    if type == "bearer":
        return BearerAuth(token_file=token_file, token_env=token_env, header=header, scheme=scheme)
    if type == "none":
        return NoAuth()
    msg = f"unknown auth type {type!r}: expected one of {', '.join(AUTH_TYPES)}"
    raise ValueError(msg)


def silence_botocore_debug() -> None:
    """Keep botocore below DEBUG: "botocore.auth" logs canonical requests and signatures."""
    logging.getLogger("botocore").setLevel(logging.WARNING)
