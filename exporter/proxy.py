"""The signing proxy: the app's own Catalog API calls, signed with our credentials, forwarded to
`api.base_url`, and every ingestionId they are answered with tracked (docs/proxy.md).

It owns the proxy listener's one handler: which requests are forwarded (exactly POST to four
paths), what of them is forwarded (the body up to `proxy.max_body_bytes`, the headers minus the
app's credentials and hop-by-hop ones), the signing (the same `RequestAuth` code as the polls),
the app's place in the rate budget (the limiter's priority lane), and what the answers teach the
exporter (a new id registered, a status applied). It never follows a redirect, never sends to
another host, and never logs a body, a header value or a signature. The runtime opens its
listener: `create_proxy_app` builds the application, `ProxyDeps` is what it needs of the
running exporter.
"""

from __future__ import annotations

import asyncio
import enum
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry

from exporter.auth import AuthUnavailable, RequestAuth
from exporter.client import STATUS_PATH, BodyTooLarge, read_capped
from exporter.config import ApiConfig, ProxyConfig, is_loopback_host
from exporter.metrics import ProxyMetrics
from exporter.models import StatusReport
from exporter.ratelimit import AdaptiveRateLimiter
from exporter.responses import classify_response, parse_retry_after
from exporter.tracking import Registration, Source

__all__ = [
    "ASYNC_PATHS",
    "FORWARDED_PATHS",
    "Learned",
    "ProxyDeps",
    "Refusal",
    "create_proxy_app",
    "upstream_session",
]

log = structlog.get_logger("exporter.proxy")

#: The asynchronous operations: each 2xx answer names the ingestionId to track.
ASYNC_PATHS: Final = ("/v1/catalog/upload", "/v1/catalog/cart/upload", "/v1/catalog/archive")
#: Every request target forwarded, compared byte for byte with the request line's.
FORWARDED_PATHS: Final = (*ASYNC_PATHS, STATUS_PATH)

#: The app's headers never forwarded: its own credentials (ours replace them), the
#: connection's (hop-by-hop, RFC 9110 7.6.1), what the client recomputes (Host, length), and
#: Accept-Encoding (the answer is passed back decoded, so the upstream may as well not encode).
_DROPPED_HEADERS: Final = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "host",
        "content-length",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
        "accept-encoding",
        "cookie",
    }
)
#: The upstream's headers passed back besides Content-Type and the API Gateway's x-amzn-*
#: (its request id, its error type): what the app needs to act on an answer.
_ANSWER_HEADERS: Final = ("Retry-After",)


class Refusal(enum.StrEnum):
    """Why a request was answered by the proxy itself and not forwarded."""

    METHOD = "method"  # not POST (CONNECT included): 405
    ABSOLUTE_FORM = "absolute_form"  # a request target naming a host: 400
    QUERY = "query"  # a query string: 400
    PATH = "path"  # not exactly one of FORWARDED_PATHS (//, %2F, .., a trailing /): 404
    HOST = "host"  # a Host header that is not a loopback name (DNS rebinding): 421
    BROWSER = "browser"  # an Origin header: a web page's request (cross-site forgery): 403
    BODY_TOO_LARGE = "body_too_large"  # past proxy.max_body_bytes: 413
    BODY_TIMEOUT = "body_timeout"  # the body not received within the idle timeout: 408
    RATE_BUDGET = "rate_budget"  # no token within api.timeout_seconds: 429
    CREDENTIALS = "credentials"  # no credentials to sign with: 503


class Learned(enum.StrEnum):
    """What an answer taught the exporter (`catalog_exporter_proxy_answers_total{outcome}`)."""

    REGISTERED = "registered"  # an upload's ingestionId, now tracked
    REJECTED = "rejected"  # an ingestionId the tracker refused (validation, caps)
    UNEXPECTED_SHAPE = "unexpected_shape"  # a 2xx without the documented fields
    STATUS_APPLIED = "status_applied"  # a status the app fetched, for a tracked id
    STATUS_UNTRACKED = "status_untracked"  # a status for an id we do not track
    FAILED = "failed"  # registering raised (the state file could not be written)


#: The answer and status code of each refusal.
_REFUSALS: Final[dict[Refusal, tuple[int, str]]] = {
    Refusal.METHOD: (405, "only POST is forwarded"),
    Refusal.ABSOLUTE_FORM: (400, "the request target must be a path, not a URL"),
    Refusal.QUERY: (400, "a query string is not forwarded"),
    Refusal.PATH: (404, "only " + ", ".join(FORWARDED_PATHS) + " are forwarded"),
    Refusal.HOST: (421, "this proxy answers only requests for a loopback host"),
    Refusal.BROWSER: (403, "requests from web pages (with an Origin header) are not forwarded"),
    Refusal.BODY_TOO_LARGE: (413, "request body larger than proxy.max_body_bytes"),
    Refusal.BODY_TIMEOUT: (408, "request body not received in time"),
    Refusal.RATE_BUDGET: (429, "Too Many Requests"),
    Refusal.CREDENTIALS: (503, "no credentials to sign the request with"),
}


@dataclass(frozen=True, slots=True)
class ProxyDeps:
    """What the proxy needs of the running exporter; the runtime fills it in.

    `api` and `auth` are read per request, so a reload's base URL, timeout and credentials
    apply at once; `auth` is the signer the polls use (None before the exporter started), so
    the proxy resolves no credentials of its own.
    `register` is the tracker's one entry point; `observe_status` applies a status the app
    fetched as a poll's would be (False when the id is not tracked).
    """

    api: Callable[[], ApiConfig]
    auth: Callable[[], RequestAuth | None]
    limiter: AdaptiveRateLimiter
    register: Callable[..., Awaitable[Registration]]
    observe_status: Callable[[str, StatusReport], bool]
    registry: CollectorRegistry
    body_timeout: float = 75.0
    clock: Callable[[], float] = time.perf_counter


def create_proxy_app(deps: ProxyDeps, config: ProxyConfig) -> web.Application:
    """The proxy as an aiohttp application: every request goes through one handler.

    A middleware, not a route, takes each request, so that what the router would never match
    (CONNECT's authority form, `*`) is refused and counted the same way as the rest.
    """
    proxy = _Proxy(deps, config)
    app = web.Application(middlewares=[proxy.middleware], client_max_size=config.max_body_bytes)
    app[_PROXY] = proxy
    return app


async def upstream_session(app: web.Application) -> AsyncIterator[None]:
    """The proxy's own keep-alive session to the API, open while its listener is: the
    composition root hangs it on the listener's lifecycle (`runtime.proxy_listener`)."""
    async for _ in app[_PROXY].session_context():
        yield


class _Proxy:
    """One proxy listener's state: its session to the API, its signer, its metrics."""

    def __init__(self, deps: ProxyDeps, config: ProxyConfig) -> None:
        self._deps = deps
        self._max_body = config.max_body_bytes
        self._metrics = ProxyMetrics(
            deps.registry, FORWARDED_PATHS, [r.value for r in Refusal], [x.value for x in Learned]
        )
        self._session: aiohttp.ClientSession | None = None

    async def session_context(self) -> AsyncIterator[None]:
        """The proxy's own keep-alive session to the API, open while the listener is."""
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
            raise_for_status=False,
        )
        yield
        await self._session.close()

    @web.middleware
    async def middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """Every request, whatever the router made of it."""
        return await self.handle(request)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Refuse, or forward and pass the answer back; never raises for what the app or
        the API do."""
        started = self._deps.clock()
        refusal = _refusal(request)
        if refusal is not None:
            return self._refuse(refusal, request)
        path = request.raw_path
        try:
            async with asyncio.timeout(self._deps.body_timeout):
                body = await read_capped(request.content, request.content_length, self._max_body)
        except BodyTooLarge:
            return self._refuse(Refusal.BODY_TOO_LARGE, request)
        except TimeoutError:
            return self._refuse(Refusal.BODY_TIMEOUT, request)
        api = self._deps.api()
        try:
            async with asyncio.timeout(api.timeout_seconds):
                await self._deps.limiter.acquire(priority=True)
        except TimeoutError:
            return self._refuse(Refusal.RATE_BUDGET, request)
        url = api.base_url + path
        headers = _forwarded_headers(request.headers)
        if not await self._sign(url, body, headers):
            return self._refuse(Refusal.CREDENTIALS, request)
        response, code = await self._forward(api, path, url, body, headers)
        self._metrics.observe(path, code, self._deps.clock() - started)
        return response

    async def _sign(self, url: str, body: bytes, headers: CIMultiDict[str]) -> bool:
        """Add the polls' signature to `headers`; False when there are no credentials (the
        exporter has not started polling, or the chain has none now)."""
        auth = self._deps.auth()
        if auth is None:
            return False
        try:
            headers.update(await auth.headers("POST", url, body, headers))
        except AuthUnavailable as exc:
            log.warning("proxy_credentials_unavailable", kind=exc.kind.value)
            return False
        return True

    async def _forward(
        self, api: ApiConfig, path: str, url: str, body: bytes, headers: CIMultiDict[str]
    ) -> tuple[web.Response, str]:
        """The answer for the app, and the code counted: the API's, `error` without one."""
        assert self._session is not None, "upstream_session opens the session"
        try:
            # Never follow a redirect: the next hop would get the body and our signature.
            async with self._session.post(
                url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=api.timeout_seconds),
            ) as upstream:
                status = upstream.status
                payload = await read_capped(
                    upstream.content, upstream.content_length, api.max_response_bytes
                )
                answer_headers = upstream.headers.copy()
        except BodyTooLarge:
            message = "answer larger than api.max_response_bytes"
            return _upstream_failed(502, "bad_gateway", message), "error"
        except TimeoutError:
            return _upstream_failed(504, "gateway_timeout", "no complete answer in time"), "error"
        except aiohttp.ClientError as exc:
            log.warning("proxy_upstream_failed", path=path, error=type(exc).__name__)
            message = "the Catalog API could not be reached"
            return _upstream_failed(502, "bad_gateway", message), "error"
        if 300 <= status <= 399:
            # Not followed, and not passed on: the app's own client would follow it, sending
            # the body to a host that is not the API's. The Location is not logged.
            log.warning("proxy_redirect_not_followed", path=path, http_status=status)
            message = f"the Catalog API answered {status}, not followed"
            return _upstream_failed(502, "redirect_not_followed", message), str(status)
        if status == 429:
            # The app's 429 is the polls' too: one budget.
            self._deps.limiter.on_throttled(parse_retry_after(answer_headers.get("Retry-After")))
        await self._learn(path, body, status, payload, answer_headers)
        passed = {name: answer_headers[name] for name in _ANSWER_HEADERS if name in answer_headers}
        passed.update((k, v) for k, v in answer_headers.items() if k.lower().startswith("x-amzn-"))
        response = web.Response(status=status, body=payload, headers=passed)
        content_type = answer_headers.get("Content-Type")
        if content_type is not None:
            response.headers["Content-Type"] = content_type
        return response, str(status)

    async def _learn(
        self, path: str, sent: bytes, status: int, payload: bytes, headers: Mapping[str, str]
    ) -> None:
        """Register an upload's id, or apply a status the app fetched, before the app has the
        answer. Nothing here may break the forwarding: every failure is counted."""
        if not 200 <= status <= 299:
            return
        try:
            if path == STATUS_PATH:
                learned = self._learn_status(sent, status, payload, headers)
            else:
                learned = await self._learn_upload(payload)
        except Exception as exc:  # a state write that failed, or a bug of ours
            log.error("proxy_registration_failed", path=path, error=type(exc).__name__)
            learned = Learned.FAILED
        self._metrics.learned(learned.value)

    async def _learn_upload(self, payload: bytes) -> Learned:
        ingestion_id = _json_field(payload, "ingestionId")
        if not isinstance(ingestion_id, str):
            return Learned.UNEXPECTED_SHAPE
        # Durable: once the app has its id, a crash of ours cannot lose it.
        registration = await self._deps.register(ingestion_id, Source.PROXY, durable=True)
        return Learned.REGISTERED if registration.accepted else Learned.REJECTED

    def _learn_status(
        self, sent: bytes, status: int, payload: bytes, headers: Mapping[str, str]
    ) -> Learned:
        ingestion_id = _json_field(sent, "ingestionId")
        outcome = classify_response(status, payload, headers)
        if not isinstance(ingestion_id, str) or not isinstance(outcome, StatusReport):
            return Learned.UNEXPECTED_SHAPE
        if self._deps.observe_status(ingestion_id, outcome):
            return Learned.STATUS_APPLIED
        return Learned.STATUS_UNTRACKED

    def _refuse(self, refusal: Refusal, request: web.Request) -> web.Response:
        """Answer without forwarding; logged at debug with the method only (the target and
        the headers are the client's, maybe hostile)."""
        self._metrics.refused(refusal.value)
        log.debug("proxy_refused", reason=refusal.value, method=request.method[:16])
        status, message = _REFUSALS[refusal]
        headers = {"X-Catalog-Exporter-Refusal": refusal.value}
        if refusal is Refusal.METHOD:
            headers["Allow"] = "POST"
        if refusal is Refusal.RATE_BUDGET:
            headers["Retry-After"] = "1"
        response = web.json_response({"message": message}, status=status, headers=headers)
        if refusal in (Refusal.BODY_TOO_LARGE, Refusal.BODY_TIMEOUT):
            response.force_close()  # the rest of the body is not read
        return response


def _refusal(request: web.Request) -> Refusal | None:
    """Why this request is not forwarded, or None. The request target is compared as sent,
    byte for byte: no decoding, no normalising, so no spelling of a path can mean another."""
    target = request.raw_path
    host = _host_of(request.headers.get("Host", ""))
    checks = (
        (request.method != "POST", Refusal.METHOD),
        (not target.startswith("/"), Refusal.ABSOLUTE_FORM),
        ("?" in target, Refusal.QUERY),
        (target not in FORWARDED_PATHS, Refusal.PATH),
        (host is None or not is_loopback_host(host), Refusal.HOST),
        ("Origin" in request.headers, Refusal.BROWSER),
    )
    return next((refusal for failed, refusal in checks if failed), None)


def _host_of(header: str) -> str | None:
    """The host part of a Host header ("[::1]:10186" -> "::1"), or None if malformed."""
    value = header.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1 :]
    else:
        host, colon, port = value.partition(":")
        rest = colon + port
    if rest and not (rest.startswith(":") and rest[1:].isdigit()):
        return None
    return host.removesuffix(".") or None


def _forwarded_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """The app's headers minus its credentials, X-Amz-*, hop-by-hop and those named in its
    Connection header; ours are added by the signer."""
    named = {
        name.strip().lower() for name in headers.get("Connection", "").split(",") if name.strip()
    }
    kept: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in _DROPPED_HEADERS or lowered in named or lowered.startswith("x-amz-"):
            continue
        kept.add(name, value)
    return kept


def _json_field(body: bytes, name: str) -> object:
    """A top-level field of a JSON object body, or None."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return document.get(name) if isinstance(document, dict) else None


def _upstream_failed(status: int, error: str, message: str) -> web.Response:
    """The proxy's own answer when the API's cannot be passed on; marked so that the app can
    tell it from the API's."""
    return web.json_response(
        {"message": message},
        status=status,
        headers={"X-Catalog-Exporter-Error": error},
    )


_PROXY = web.AppKey("proxy", _Proxy)
