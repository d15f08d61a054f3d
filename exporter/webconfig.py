"""The web config: exporter-toolkit's web-config.yml (TLS, client certificates, basic auth,
response headers) for the metrics listener, read with exporter-toolkit's semantics.

It owns the file's models (worded as our config is: `config_wording`), the server SSLContext
built from them, the watcher that rebuilds that context when the web config, certificate, key
or CA file changes (new connections get the new files; the listener stays open), and the
aiohttp middleware for basic auth, allowed client SANs and the configured headers.

It must not open listeners (that is `runtime`'s), log a password, a hash or a key, or run
bcrypt or a file read on the event loop. Where Python's ssl cannot do what Go's crypto/tls
does, the key is refused with a message that says so, never silently weakened
(docs/security.md, "TLS and authentication").
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import ssl
import tempfile
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import bcrypt
import structlog
from aiohttp import hdrs, web
from pydantic import Field, ValidationError, model_validator

from exporter.config import ConfigError
from exporter.config_models import Section
from exporter.config_wording import (
    SECRET,
    TOP_LEVEL,
    describe,
    did_you_mean,
    key_name,
    problem_line,
    refusal,
)
from exporter.metrics import WebConfigMetrics
from exporter.secretfile import FileVersion, file_version
from exporter.yamlfile import YamlFileError, read_yaml

__all__ = [
    "HEADER_VALUES",
    "BasicAuth",
    "HTTPServerConfig",
    "TLSServerConfig",
    "WebConfig",
    "WebConfigWatcher",
    "WebSettings",
    "build_server_context",
    "install",
    "load_web_config",
    "settings_from",
]

log = structlog.get_logger("exporter.webconfig")

ClientAuthType = Literal[
    "NoClientCert",
    "RequestClientCert",
    "RequireAnyClientCert",
    "VerifyClientCertIfGiven",
    "RequireAndVerifyClientCert",
]
TLSVersionName = Literal["TLS10", "TLS11", "TLS12", "TLS13"]

#: The versions offered. TLS 1.0 and 1.1 are refused even when asked for (RFC 8996).
TLS_VERSIONS: dict[str, ssl.TLSVersion] = {
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_VERIFY_MODES: dict[str, ssl.VerifyMode] = {
    "NoClientCert": ssl.CERT_NONE,
    # Python's ssl cannot ask for a certificate without verifying it; Go's RequestClientCert
    # never refuses a client for its certificate, and neither does asking for none.
    "RequestClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_NEEDS_CA = ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert")

#: The headers http_server_config.headers may set, and the only values some of them take:
#: exporter-toolkit's list, so a file valid for a Go exporter is valid here and the reverse.
HEADER_VALUES: dict[str, tuple[str, ...]] = {
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
    "Content-Security-Policy": (),
}
_HEADER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,63}")
# A bcrypt hash as htpasswd -B and Go's bcrypt write it: $2a$, $2b$ or $2y$, cost 04..31.
_BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")

REALM = "catalog-upload-exporter"
#: Verified credentials kept, most recently used first: a few Prometheus servers scrape.
MAX_CACHED_CREDENTIALS = 256
#: Requests that may wait for a bcrypt check at once; more are answered 429 at once, so a
#: flood of wrong passwords queues no more than this (each check costs tens of ms).
MAX_WAITING_CHECKS = 64
#: How often the watcher looks at the files (one stat() of each).
WATCH_INTERVAL_SECONDS = 1.0

Problems = list[tuple[tuple[str, ...], str]]


class TLSServerConfig(Section):
    """`tls_server_config`: TLS is on as soon as any certificate key or client_auth_type is set
    (exporter-toolkit's rule); relative paths are relative to the web config file."""

    cert_file: str = ""
    key_file: str = ""
    cert: str = ""
    key: Annotated[str, SECRET] = ""
    client_ca_file: str = ""
    client_ca: str = ""
    client_auth_type: ClientAuthType = "NoClientCert"
    client_allowed_sans: list[str] | None = None
    min_version: TLSVersionName = "TLS12"
    max_version: TLSVersionName = "TLS13"
    prefer_server_cipher_suites: bool = True
    # Accepted only empty: Go's names, which OpenSSL spells differently (see _check).
    cipher_suites: list[str] = Field(default_factory=list)
    curve_preferences: list[str] = Field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return bool(
            self.cert_file
            or self.cert
            or self.key_file
            or self.key
            or self.client_ca_file
            or self.client_ca
            or "client_auth_type" in self.model_fields_set
        )

    @property
    def files(self) -> tuple[str, ...]:
        """The files this config reads, watched for rotation."""
        return tuple(p for p in (self.cert_file, self.key_file, self.client_ca_file) if p)

    @model_validator(mode="after")
    def _check(self) -> TLSServerConfig:
        problems: Problems = []
        pairs = (("cert", "cert_file"), ("key", "key_file"), ("client_ca", "client_ca_file"))
        for inline, path in pairs:
            if getattr(self, inline) and getattr(self, path):
                problems.append(((inline,), f"give {inline} or {path}, not both"))
        old = "TLS 1.0 and 1.1 are not offered (deprecated, RFC 8996): use TLS12 or TLS13"
        problems.extend(
            ((key,), old)
            for key in ("min_version", "max_version")
            if getattr(self, key) not in TLS_VERSIONS
        )
        low, high = TLS_VERSIONS.get(self.min_version), TLS_VERSIONS.get(self.max_version)
        if low is not None and high is not None and low > high:
            above = f"{self.min_version} is above max_version {self.max_version}"
            problems.append((("min_version",), above))
        problems.extend(self._client_problems())
        for key, what in (("cipher_suites", "cipher suites"), ("curve_preferences", "curves")):
            if getattr(self, key):
                problems.append(
                    (
                        (key,),
                        f"not supported: these are Go's names for {what}, which Python's ssl "
                        "(OpenSSL) spells differently and cannot restrict for TLS 1.3; remove "
                        "the key to use OpenSSL's defaults, or set min_version: TLS13",
                    )
                )
        if self.enabled and not (self.cert_file or self.cert):
            problems.append(((), "TLS needs a certificate: give cert_file (or cert inline)"))
        if self.enabled and not (self.key_file or self.key):
            problems.append(((), "TLS needs a key: give key_file (or key inline)"))
        if problems:
            raise refusal(type(self).__name__, self, problems)
        return self

    def _client_problems(self) -> Problems:
        """client_auth_type, its CA and the allowed SANs, as far as Python's ssl can follow."""
        kind, has_ca = self.client_auth_type, bool(self.client_ca_file or self.client_ca)
        if kind == "RequireAnyClientCert":
            return [
                (
                    ("client_auth_type",),
                    "RequireAnyClientCert is not supported: Python's ssl cannot require a "
                    "certificate without verifying it; use RequireAndVerifyClientCert with "
                    "client_ca_file (a self-signed client certificate can be its own CA)",
                )
            ]
        problems: Problems = []
        if has_ca and kind == "NoClientCert":
            problems.append(
                (
                    ("client_ca_file" if self.client_ca_file else "client_ca",),
                    "a client CA is given but client_auth_type is NoClientCert; set "
                    "client_auth_type: RequireAndVerifyClientCert",
                )
            )
        if kind in _NEEDS_CA and not has_ca:
            problems.append(
                (
                    ("client_ca_file",),
                    f"required with client_auth_type {kind}: the CA that signs client certificates",
                )
            )
        if self.client_allowed_sans is not None:
            if kind != "RequireAndVerifyClientCert":
                problems.append(
                    (
                        ("client_allowed_sans",),
                        "needs client_auth_type: RequireAndVerifyClientCert (with any other, "
                        "a client may send no certificate, leaving no SAN to match)",
                    )
                )
            elif not self.client_allowed_sans:
                problems.append(
                    (
                        ("client_allowed_sans",),
                        "an empty list would refuse every client; remove the key to allow "
                        "every client the CA verifies",
                    )
                )
        return problems


class HTTPServerConfig(Section):
    """`http_server_config`: headers added to every response; http2 is accepted and noted."""

    http2: bool = True
    headers: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_headers(self) -> HTTPServerConfig:
        problems: Problems = []
        for name, value in self.headers.items():
            shown = name if _HEADER_NAME.fullmatch(name) else f"<a name of {len(name)} characters>"
            if name not in HEADER_VALUES:
                guess = did_you_mean(name, HEADER_VALUES)
                problems.append(
                    (
                        ("headers",),
                        f"{shown} cannot be configured; the headers are "
                        f"{', '.join(HEADER_VALUES)}{guess}",
                    )
                )
            elif HEADER_VALUES[name] and value and value not in HEADER_VALUES[name]:
                choices = ", ".join(HEADER_VALUES[name])
                problems.append(
                    ((("headers"),), f"{shown}: expected one of {choices}, got {describe(value)}")
                )
            elif any(c in value for c in "\r\n\0"):
                problems.append((("headers",), f"{shown}: a value holds a line break or NUL"))
        if problems:
            raise refusal(type(self).__name__, self, problems)
        return self


class WebConfig(Section):
    """The whole file. An empty file is valid: plain HTTP, no authentication."""

    tls_server_config: TLSServerConfig = Field(default_factory=TLSServerConfig)
    http_server_config: HTTPServerConfig = Field(default_factory=HTTPServerConfig)
    basic_auth_users: Annotated[dict[str, str], SECRET] = Field(default_factory=dict)
    rate_limit: Any = None

    @model_validator(mode="after")
    def _check(self) -> WebConfig:
        problems: Problems = []
        for user, hashed in self.basic_auth_users.items():
            name = key_name(user)
            if not user or ":" in user:
                problems.append(
                    (
                        ("basic_auth_users",),
                        f"user {name}: a user name must be non-empty and hold no ':' "
                        "(Basic auth splits on the first one)",
                    )
                )
            if not _BCRYPT_HASH.fullmatch(hashed):
                problems.append(
                    (
                        ("basic_auth_users",),
                        f"user {name}: expected a bcrypt hash ($2y$10$ and 53 more characters, "
                        f"from htpasswd -nBC 10 \"\" | tr -d ':\\n'), got "
                        f"{describe(hashed, secret=True)}",
                    )
                )
        if self.rate_limit is not None:
            problems.append(
                (
                    ("rate_limit",),
                    "not supported: the exporter's listener has no rate limiter; remove the key",
                )
            )
        if problems:
            raise refusal(type(self).__name__, self, problems)
        return self

    def warnings(self) -> list[str]:
        """What is accepted but not done as a Go exporter would: logged at each load."""
        found = []
        http = self.http_server_config
        if "http2" in http.model_fields_set and http.http2:
            found.append(
                "http_server_config.http2: ignored, the listener speaks HTTP/1.1 only "
                "(as Prometheus scrapes)"
            )
        if self.tls_server_config.client_auth_type == "RequestClientCert":
            found.append(
                "tls_server_config.client_auth_type: RequestClientCert requests no certificate "
                "here (Python's ssl cannot request one without verifying it); as with Go, no "
                "client is refused for its certificate"
            )
        if self.basic_auth_users and not self.tls_server_config.enabled:
            found.append(
                "basic_auth_users without tls_server_config: passwords cross the network "
                "in clear text"
            )
        return found

    def with_directory(self, directory: str) -> WebConfig:
        """The config with relative file names joined to `directory` (exporter-toolkit's
        SetDirectory: paths are relative to the web config file, not the working directory)."""
        tls = self.tls_server_config
        update = {
            key: os.path.join(directory, getattr(tls, key))
            for key in ("cert_file", "key_file", "client_ca_file")
            if getattr(tls, key) and not os.path.isabs(getattr(tls, key))
        }
        if not update:
            return self
        return self.model_copy(update={"tls_server_config": tls.model_copy(update=update)})


def load_web_config(path: str | os.PathLike[str]) -> WebConfig:
    """Read and validate the file (blocking: call it from a thread once the loop runs).

    Every failure is a ConfigError whose lines start with the file name."""
    name = os.fspath(path)
    try:
        data = read_yaml(name)
    except YamlFileError as error:
        raise ConfigError(error.problems) from None
    if data is None:
        data = {}  # an empty file, as exporter-toolkit reads it: nothing to do
    if not isinstance(data, dict):
        shown = describe(data, secret=True)
        raise ConfigError([f"{name}: {TOP_LEVEL}: expected a mapping, got {shown}"])
    try:
        config = WebConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(
            f"{name}: {problem_line(WebConfig, detail)}"
            for detail in error.errors(include_url=False)
        ) from None
    return config.with_directory(os.path.dirname(os.path.abspath(name)))


# The SSL context


def _refuse_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key's password.
    raise ValueError("the key is encrypted; give an unencrypted key (as exporter-toolkit needs)")


@contextlib.contextmanager
def _as_file(text: str) -> Iterator[str]:
    """Inline PEM as a path OpenSSL can read: an anonymous memory file where Linux has them
    (a key never reaches a disk), else a private temporary directory removed at once."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        fd = memfd_create("web-config-pem", os.MFD_CLOEXEC)
        try:
            os.write(fd, text.encode())
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory() as directory:  # pragma: no cover (not Linux)
        name = os.path.join(directory, "pem")
        with open(os.open(name, os.O_WRONLY | os.O_CREAT, 0o600), "w") as file:
            file.write(text)
        yield name


def _ssl_reason(error: BaseException) -> str:
    if isinstance(error, ssl.SSLError):
        return str(error.reason or error.strerror or "not PEM")
    if isinstance(error, OSError):
        return str(error.strerror)
    return str(error)


def build_server_context(tls: TLSServerConfig) -> ssl.SSLContext:
    """A server context from `tls`: its certificate, key and client CA loaded (blocking).

    Failures are ConfigErrors that name the key and file, never their content."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _configure(context, tls)
    with contextlib.ExitStack() as stack:
        cert = tls.cert_file or stack.enter_context(_as_file(tls.cert))
        key = tls.key_file or stack.enter_context(_as_file(tls.key))
        try:
            context.load_cert_chain(cert, key, password=_refuse_password)
        except (ssl.SSLError, OSError, ValueError) as error:
            where = f"{tls.cert_file or 'cert (inline)'} and {tls.key_file or 'key (inline)'}"
            raise ConfigError(
                [
                    f"tls_server_config.cert_file: cannot load the certificate and key "
                    f"({where}): {_ssl_reason(error)}"
                ]
            ) from None
    if tls.client_ca_file or tls.client_ca:
        try:
            if tls.client_ca_file:
                context.load_verify_locations(cafile=tls.client_ca_file)
            else:
                context.load_verify_locations(cadata=tls.client_ca)
        except (ssl.SSLError, OSError, ValueError) as error:
            where = tls.client_ca_file or "client_ca (inline)"
            raise ConfigError(
                [
                    f"tls_server_config.client_ca_file: cannot load the client CA ({where}): "
                    f"{_ssl_reason(error)}"
                ]
            ) from None
    return context


def _configure(context: ssl.SSLContext, tls: TLSServerConfig) -> None:
    """The settings a connection takes from the listener's own context when it starts (OpenSSL
    copies them into each connection, and swapping the context later does not change them)."""
    context.minimum_version = TLS_VERSIONS[tls.min_version]
    context.maximum_version = TLS_VERSIONS[tls.max_version]
    context.verify_mode = _VERIFY_MODES[tls.client_auth_type]
    if tls.prefer_server_cipher_suites:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE


# Basic auth


class BasicAuth:
    """Checks `Authorization: Basic` against bcrypt hashes, with a cache of verified ones.

    The cache (exporter-toolkit's advisory GHSA-7rg2-cxvp-9p7p, CVE-2022-46146, was a cache
    key an attacker could collide) holds only successes, under an HMAC with a key of this
    process of the user, the stored hash and the password, each length-prefixed: a wrong
    password, another user's hash or a changed hash never finds an entry. An unknown user is
    checked against a dummy hash of the same cost, so timing does not tell users apart.
    bcrypt runs in a thread, one check at a time.
    """

    def __init__(self, users: Mapping[str, str], *, max_cached: int = MAX_CACHED_CREDENTIALS):
        self._users = {user.encode(): hashed.encode() for user, hashed in users.items()}
        self._key = secrets.token_bytes(32)
        self._cache: OrderedDict[bytes, None] = OrderedDict()
        self._max_cached = max_cached
        cost = max((int(h[4:6]) for h in self._users.values()), default=4)
        # Made here, in the thread that builds the settings, never on the event loop.
        self._dummy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(rounds=cost))
        self._one_at_a_time = asyncio.Semaphore(1)
        self._waiting = 0
        self.bcrypt_runs = 0  # checks that missed the cache (tests read it)

    def __bool__(self) -> bool:
        return bool(self._users)

    def _cache_key(self, user: bytes, hashed: bytes, password: bytes) -> bytes:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in (user, hashed, password):
            mac.update(len(part).to_bytes(4, "big"))
            mac.update(part)
        return mac.digest()

    async def check(self, header: str | None) -> bool | None:
        """True for valid credentials, False for none or wrong ones, None when too many
        checks already wait (the caller answers 429)."""
        credentials = _basic_credentials(header)
        if credentials is None:
            return False
        user, password = credentials
        hashed = self._users.get(user)
        key = self._cache_key(user, hashed or self._dummy, password)
        if hashed is not None and key in self._cache:
            self._cache.move_to_end(key)
            return True
        if self._waiting >= MAX_WAITING_CHECKS:
            return None
        self._waiting += 1
        self.bcrypt_runs += 1
        try:
            async with self._one_at_a_time:
                ok = await asyncio.to_thread(_bcrypt_matches, password, hashed or self._dummy)
        finally:
            self._waiting -= 1
        if not (ok and hashed is not None):
            return False
        self._cache[key] = None
        if len(self._cache) > self._max_cached:
            self._cache.popitem(last=False)
        return True


def _bcrypt_matches(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:  # over 72 bytes (bcrypt >= 5 refuses rather than truncating)
        return False


def _basic_credentials(header: str | None) -> tuple[bytes, bytes] | None:
    """(user, password) from an Authorization header, or None when it holds no Basic ones."""
    if not header:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    return (user, password) if colon else None


# What is in force, and its rotation


@dataclass(frozen=True, slots=True)
class WebSettings:
    """One good web config in force: the file, the context built from it, its checker."""

    config: WebConfig
    ssl_context: ssl.SSLContext | None  # None without TLS
    auth: BasicAuth
    headers: tuple[tuple[str, str], ...]


def settings_from(config: WebConfig) -> WebSettings:
    """Build everything a config needs (blocking: reads files, makes the dummy hash)."""
    tls = config.tls_server_config
    return WebSettings(
        config=config,
        ssl_context=build_server_context(tls) if tls.enabled else None,
        auth=BasicAuth(config.basic_auth_users),
        headers=tuple((k, v) for k, v in config.http_server_config.headers.items() if v),
    )


Fingerprint = tuple[tuple[str, FileVersion | None], ...]


def _fingerprint(paths: Collection[str]) -> Fingerprint:
    """Each file's `file_version` (None when it cannot be stat'ed)."""
    found: list[tuple[str, FileVersion | None]] = []
    for path in paths:
        try:
            found.append((path, file_version(os.stat(path))))
        except (OSError, ValueError):
            found.append((path, None))
    return tuple(found)


class WebConfigWatcher:
    """The web config in force, and its rotation without a restart.

    The listener gets `listener_context` once. Each new connection takes its verify mode,
    versions and options from it (kept equal to the config in force), then, in the
    `sni_callback` that OpenSSL runs for every ClientHello (with or without SNI), switches to
    the context of the config in force, which holds the certificate, key and client CAs. A
    change of any of the files is noticed by `check` (a thread, one stat per file a second);
    a bad new file is logged and counted, and the last good settings stay.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        metrics: WebConfigMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = os.fspath(path)
        self._metrics = metrics
        self._clock = clock
        config = load_web_config(self.path)  # a bad file refuses to start: the caller's error
        watched = (self.path, *config.tls_server_config.files)
        seen = _fingerprint(watched)
        self._settings = settings_from(config)
        self._watched = watched
        self._seen = seen
        for warning in config.warnings():
            log.warning("web_config_warning", path=self.path, warning=warning)
        self._listener_context: ssl.SSLContext | None = None
        if self._settings.ssl_context is not None:
            front = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            _configure(front, config.tls_server_config)
            front.sni_callback = self._switch_context
            self._listener_context = front
        if metrics is not None:
            metrics.web_config_loaded(ok=True, now=clock())

    @property
    def settings(self) -> WebSettings:
        return self._settings

    @property
    def listener_context(self) -> ssl.SSLContext | None:
        """The context to give the listener (None: serve plain HTTP)."""
        return self._listener_context

    def _switch_context(
        self, connection: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _ctx: ssl.SSLContext
    ) -> None:
        current = self._settings.ssl_context
        if current is not None:
            connection.context = current

    def check(self) -> WebSettings | None:
        """New settings when a watched file changed and all of them are good, else None
        (blocking: run it in a thread, and hand what it returns to `apply` on the loop)."""
        seen = _fingerprint(self._watched)
        if seen == self._seen:
            return None
        try:
            config = load_web_config(self.path)
            watched = (self.path, *config.tls_server_config.files)
            seen = _fingerprint(watched)  # before the files are read: a later change shows
            self._watched = watched
            self._seen = seen
            if config.tls_server_config.enabled != (self._listener_context is not None):
                raise ConfigError(
                    [
                        f"{self.path}: turning TLS on or off needs a restart (the listener "
                        "serves HTTP or HTTPS from its start)"
                    ]
                )
            settings = settings_from(config)
        except ConfigError as error:
            self._seen = seen  # the same bad files are reported once, not every second
            log.error("web_config_reload_failed", path=self.path, problems=list(error.problems))
            if self._metrics is not None:
                self._metrics.web_config_loaded(ok=False, now=self._clock())
            return None
        for warning in config.warnings():
            log.warning("web_config_warning", path=self.path, warning=warning)
        return settings

    def apply(self, settings: WebSettings) -> None:
        """Put `settings` in force for the next connections and requests (on the loop)."""
        if self._listener_context is not None:
            _configure(self._listener_context, settings.config.tls_server_config)
        self._settings = settings
        log.info("web_config_reloaded", path=self.path, tls=settings.ssl_context is not None)
        if self._metrics is not None:
            self._metrics.web_config_loaded(ok=True, now=self._clock())

    async def watch(
        self,
        *,
        interval: float = WATCH_INTERVAL_SECONDS,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """Check every `interval` seconds until cancelled (for the runtime's supervisor)."""
        while True:
            await sleep(interval)
            settings = await asyncio.to_thread(self.check)
            if settings is not None:
                self.apply(settings)


# The HTTP side

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _peer_sans(request: web.Request) -> set[str]:
    """The client certificate's SANs as exporter-toolkit compares them (IPs normalised)."""
    transport = request.transport
    cert = transport.get_extra_info("peercert") if transport is not None else None
    found: set[str] = set()
    for kind, value in (cert or {}).get("subjectAltName", ()):
        name = value
        if kind == "IP Address":
            with contextlib.suppress(ValueError):
                name = str(ipaddress.ip_address(value.strip()))
        found.add(name)
    return found


def _allowed(sans: list[str]) -> set[str]:
    allowed = set()
    for san in sans:
        try:
            allowed.add(str(ipaddress.ip_address(san)))
        except ValueError:
            allowed.add(san)
    return allowed


def install(
    app: web.Application,
    settings: Callable[[], WebSettings],
    *,
    open_paths: Collection[str] = (),
) -> None:
    """Guard `app` with the settings in force at each request: the client certificate's
    SANs (403), basic auth (401, or 429 when too many checks wait), and the configured
    headers on every response, errors and streamed ones included. Paths in `open_paths`
    skip basic auth (the runtime decides, e.g. for probes)."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        current = settings()
        tls = current.config.tls_server_config
        if tls.client_allowed_sans and not (
            _peer_sans(request) & _allowed(tls.client_allowed_sans)
        ):
            raise web.HTTPForbidden(text="client certificate not allowed\n")
        if current.auth and request.path not in open_paths:
            verdict = await current.auth.check(request.headers.get(hdrs.AUTHORIZATION))
            if verdict is None:
                raise web.HTTPTooManyRequests(headers={hdrs.RETRY_AFTER: "1"})
            if not verdict:
                raise web.HTTPUnauthorized(
                    headers={hdrs.WWW_AUTHENTICATE: f'Basic realm="{REALM}", charset="UTF-8"'},
                    text="401: Unauthorized\n",
                )
        return await handler(request)

    async def add_headers(_request: web.Request, response: web.StreamResponse) -> None:
        for name, value in settings().headers:
            response.headers[name] = value

    app.middlewares.append(guard)
    app.on_response_prepare.append(add_headers)
