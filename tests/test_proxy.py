"""The signing proxy against the simulator checking SigV4 for real, over loopback.

The app's side is a plain aiohttp client (or a raw socket, for request lines no client would
write); a canary server stands for every other host, and counts what reaches it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from exporter.config import Config
from exporter.simulator import (
    TEST_REGION,
    TEST_SECRET_ACCESS_KEY,
    UPLOAD_PATHS,
    Fault,
    Simulator,
)
from exporter.tracking import Source
from tests.conftest import (
    ExporterFactory,
    RunningExporter,
    SimulatorFactory,
    fast_config,
    simulator_sigv4_auth,
    value,
    wait_for,
)

UPLOAD = UPLOAD_PATHS[0]
STATUS = "/v1/catalog/getCatalogUploadStatus"
BODY_MARKER = "feed-body-7d3e-NEVER-LOGGED"
BOGUS_SIGNATURE = "0badc0ffee0badc0ffee0badc0ffee0badc0ffee0badc0ffee0badc0ffee0bad"
BOGUS_AUTHORIZATION = (
    "AWS4-HMAC-SHA256 Credential=AKIDAPPOWNKEY/20200101/us-east-1/execute-api/aws4_request, "
    f"SignedHeaders=host;x-amz-date, Signature={BOGUS_SIGNATURE}"
)
MIB = 1024 * 1024


@dataclass
class Setup:
    sim: Simulator
    running: RunningExporter
    proxy_url: str
    canary: list[str]
    canary_url: str

    async def post(
        self, path: str, body: bytes, headers: dict[str, str] | None = None, **options: Any
    ) -> tuple[int, dict[str, str], bytes]:
        """POST through the proxy as an app would: aiohttp's defaults (redirects followed)."""
        async with (
            aiohttp.ClientSession() as session,
            session.post(self.proxy_url + path, data=body, headers=headers, **options) as answer,
        ):
            return answer.status, dict(answer.headers), await answer.read()


ProxyFactory = Callable[..., Awaitable[Setup]]


@pytest.fixture
async def canary() -> AsyncIterator[tuple[list[str], str]]:
    """A server standing for any other host: it records every request that reaches it."""
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.raw_path}")
        return web.json_response({"ingestionId": "canary-got-it"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield seen, str(server.make_url("")).rstrip("/")
    await server.close()


@pytest.fixture
async def start_proxy(
    start_simulator: SimulatorFactory,
    start_exporter: ExporterFactory,
    canary: tuple[list[str], str],
) -> ProxyFactory:
    """Simulator (SigV4), and the exporter with its proxy listener, built by `runtime.build`."""

    async def start(*, proxy: dict[str, Any] | None = None, **overrides: Any) -> Setup:
        sim, url = await start_simulator(auth="sigv4")
        config: Config = fast_config(
            url,
            [],
            api={"auth": {"type": "sigv4", "region": TEST_REGION}},
            proxy={"enabled": True, "port": 0, **(proxy or {})},
            **overrides,
        )
        running = await start_exporter(config, auth_factory=simulator_sigv4_auth)
        assert running.proxy_url is not None, "proxy.enabled opens the proxy's listener"
        seen, canary_url = canary
        return Setup(sim, running, running.proxy_url, seen, canary_url)

    return start


async def raw_request(url: str, request: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (request lines no HTTP client would write): (status, body)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def test_an_unsigned_upload_reaches_the_api_signed_and_the_app_gets_its_exact_answer(
    start_proxy: ProxyFactory,
) -> None:
    """A bogus client signature is replaced by ours, which the simulator verifies; the app
    gets the simulator's status, body and Content-Type as they were sent."""
    setup = await start_proxy()
    body = json.dumps({"feed": BODY_MARKER}).encode()
    headers = {
        "Authorization": BOGUS_AUTHORIZATION,
        "X-Amz-Date": "20200101T000000Z",
        "X-Amz-Security-Token": "app-session-token",
        "Content-Type": "application/json",
    }
    status, answer_headers, answer = await setup.post(UPLOAD, body, headers)

    assert status == 200
    assert answer == json.dumps({"ingestionId": "sim-upload-000001"}).encode()
    assert answer_headers["Content-Type"] == "application/json"  # as the simulator sends it
    (record,) = setup.sim.requests
    assert (record.path, record.status, record.auth_ok) == (UPLOAD, 200, True)
    (received,) = setup.sim.received_uploads
    assert received.sha256 == hashlib.sha256(body).hexdigest()


async def test_without_the_proxy_the_same_unsigned_upload_is_refused(
    start_proxy: ProxyFactory,
) -> None:
    """The control: the simulator does check signatures, so the proxy's signing is what
    made the upload above pass."""
    setup = await start_proxy()
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{setup.running.exporter.config.api.base_url}{UPLOAD}",
            data=b"{}",
            headers={"Authorization": BOGUS_AUTHORIZATION, "X-Amz-Date": "20200101T000000Z"},
        ) as answer,
    ):
        assert answer.status == 403
    assert setup.sim.received_uploads == []


async def test_an_uploads_id_is_tracked_when_the_app_has_its_answer_and_its_fatal_shows(
    start_proxy: ProxyFactory,
) -> None:
    """Registered (source proxy) before the answer leaves, on /metrics at once; the status
    the simulator turns FATAL then shows there too."""
    setup = await start_proxy()
    setup.sim.upload_script = [("INPROGRESS", 0)]
    status, _, answer = await setup.post(UPLOAD_PATHS[1], b"{}")
    assert status == 200
    ingestion_id = json.loads(answer)["ingestionId"]

    assert setup.running.exporter.tracker.holds(ingestion_id, Source.PROXY)
    assert await setup.running.status_of(ingestion_id) is not None  # no waiting at all
    samples = await setup.running.scrape()
    assert value(samples, "catalog_exporter_proxy_answers_total", outcome="registered") == 1
    code = {"path": UPLOAD_PATHS[1], "code": "200"}
    assert value(samples, "catalog_exporter_proxy_requests_total", **code) == 1

    setup.sim.set_status(ingestion_id, "FATAL")
    await wait_for(setup.running.status_is(ingestion_id, "FATAL"))


async def test_a_status_the_app_fetches_updates_the_upload_without_a_poll_of_ours(
    start_proxy: ProxyFactory,
) -> None:
    """After one poll of ours, the app's own getCatalogUploadStatus call carries the FATAL
    to /metrics at once, and our next poll is a full (long) interval away."""
    setup = await start_proxy(polling={"interval_seconds": 3600})
    setup.sim.upload_script = [("INQUEUE", 0)]
    _, _, answer = await setup.post(UPLOAD, b"{}")
    ingestion_id = json.loads(answer)["ingestionId"]
    await wait_for(setup.running.status_is(ingestion_id, "INQUEUE"))
    ours = setup.sim.count(ingestion_id=ingestion_id)

    setup.sim.set_status(ingestion_id, "FATAL")
    body = json.dumps({"ingestionId": ingestion_id}).encode()
    status, _, answer = await setup.post(STATUS, body)

    assert (status, json.loads(answer)["processingStatus"]) == (200, "FATAL")
    assert await setup.running.status_of(ingestion_id) == "FATAL"
    assert setup.sim.count(ingestion_id=ingestion_id) == ours + 1  # the app's call only
    samples = await setup.running.scrape()
    assert value(samples, "catalog_exporter_proxy_answers_total", outcome="status_applied") == 1


async def test_an_unexpected_answer_is_passed_on_and_counted(start_proxy: ProxyFactory) -> None:
    """A 2xx without an ingestionId reaches the app unchanged; it is counted, not tracked."""
    setup = await start_proxy()
    shape = '{"uploadId": 42}'
    setup.sim.inject(Fault("wrong_shape", body=shape), ingestion_id=UPLOAD, count=1)
    status, _, answer = await setup.post(UPLOAD, b"{}")
    assert (status, answer) == (200, shape.encode())
    samples = await setup.running.scrape()
    assert value(samples, "catalog_exporter_proxy_answers_total", outcome="unexpected_shape") == 1
    assert len(setup.running.exporter.store) == 0


@pytest.mark.parametrize(
    ("request_line", "expected"),
    [
        ("GET /v1/catalog/upload", 405),
        ("PUT /v1/catalog/upload", 405),
        ("DELETE /v1/catalog/upload", 405),
        ("CONNECT {canary_host}", 405),
        ("POST {canary}/v1/catalog/upload", 400),
        ("POST {api}/v1/catalog/upload", 400),
        ("POST /v1/catalog/upload?target={canary}", 400),
        ("POST //v1/catalog/upload", 404),
        ("POST /v1/catalog/upload/", 404),
        ("POST /v1/catalog/%75pload", 404),
        ("POST /v1/catalog%2Fupload", 404),
        ("POST /v1/catalog/x/../upload", 404),
        ("POST /v1/catalog/./upload", 404),
        ("POST /V1/catalog/upload", 404),
        ("POST /v1/catalog/deleteAll", 404),
        ("POST /", 404),
    ],
)
async def test_requests_not_allowed_are_refused_and_reach_no_host(
    start_proxy: ProxyFactory, request_line: str, expected: int
) -> None:
    """Other methods, paths, spellings of a path, query strings and absolute-form targets get
    a 4xx from the proxy itself: neither the API nor the canary sees a request."""
    setup = await start_proxy()
    line = request_line.format(
        canary=setup.canary_url,
        canary_host=setup.canary_url.removeprefix("http://"),
        api=setup.running.exporter.config.api.base_url,
    )
    request = (
        f"{line} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    ).encode()
    status, _ = await raw_request(setup.proxy_url, request)
    assert status == expected
    assert setup.sim.requests == []
    assert setup.canary == []


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Host": "evil.example"}, 421),
        ({"Host": "127.0.0.1.evil.example:80"}, 421),
        ({"Origin": "https://evil.example"}, 403),
    ],
)
async def test_a_web_pages_request_is_refused(
    start_proxy: ProxyFactory, headers: dict[str, str], expected: int
) -> None:
    """A DNS-rebound name or a browser's Origin: a web page cannot upload with our role."""
    setup = await start_proxy()
    status, answer_headers, _ = await setup.post(UPLOAD, b"{}", headers)
    assert status == expected
    assert "X-Catalog-Exporter-Refusal" in answer_headers
    assert setup.sim.requests == []


async def test_a_redirect_is_never_followed_to_another_host(start_proxy: ProxyFactory) -> None:
    """The API answering 307 to the canary: the app (whose client would follow) gets 502,
    and the canary sees nothing, neither from the proxy nor from the app."""
    setup = await start_proxy()
    redirect = Fault("redirect", status=307, location=setup.canary_url + UPLOAD)
    setup.sim.inject(redirect, ingestion_id=UPLOAD, count=1)
    status, headers, _ = await setup.post(UPLOAD, b'{"feed": 1}')
    assert status == 502
    assert headers["X-Catalog-Exporter-Error"] == "redirect_not_followed"
    assert "Location" not in headers
    assert setup.canary == []
    samples = await setup.running.scrape()
    code = {"path": UPLOAD, "code": "307"}
    assert value(samples, "catalog_exporter_proxy_requests_total", **code) == 1


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_over_the_limit_gets_413_and_nothing_is_forwarded(
    start_proxy: ProxyFactory, chunked: bool
) -> None:
    """2 MiB against a 1 MiB limit, announced or streamed: 413, and the API sees nothing."""
    setup = await start_proxy(proxy={"max_body_bytes": MIB})
    body = b"x" * (2 * MIB)

    async def stream() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    try:
        status, _, _ = await setup.post(UPLOAD, stream() if chunked else body)  # type: ignore[arg-type]
    except aiohttp.ClientOSError:
        status = 413  # the proxy closed while the rest was still being sent: fine either way
    assert status == 413
    assert setup.sim.requests == []
    samples = await setup.running.scrape()
    refused = value(samples, "catalog_exporter_proxy_refused_total", reason="body_too_large")
    assert refused == 1
    # A body within the limit still goes through afterwards.
    assert (await setup.post(UPLOAD, b"y" * (MIB - 1)))[0] == 200


async def test_a_429_reaches_the_app_unchanged_and_slows_the_polls(
    start_proxy: ProxyFactory,
) -> None:
    """The API's 429 to an upload: the app gets its status, body and Retry-After; the
    limiter the polls share halves its rate."""
    setup = await start_proxy()
    limiter = setup.running.exporter.limiter
    before = limiter.rate
    throttle = Fault("throttle", retry_after=1, key="message")
    setup.sim.inject(throttle, ingestion_id=UPLOAD, count=1)
    status, headers, answer = await setup.post(UPLOAD, b"{}")

    assert (status, headers["Retry-After"], answer) == (
        429,
        "1",
        json.dumps({"message": "Too Many Requests"}).encode(),
    )
    assert headers["x-amzn-ErrorType"] == "TooManyRequestsException"
    assert limiter.rate == pytest.approx(before / 2, rel=0.05)
    samples = await setup.running.scrape()
    assert value(samples, "catalog_api_rate_limit_requests_per_second") < before * 0.6
    code = {"path": UPLOAD, "code": "429"}
    assert value(samples, "catalog_exporter_proxy_requests_total", **code) == 1


async def test_no_body_and_no_signature_reach_the_logs(start_proxy: ProxyFactory) -> None:
    """At debug level, through uploads, a status call, refusals and a 429: no body content,
    no signature (the app's or ours), no secret key in the log."""
    setup = await start_proxy()
    setup.sim.upload_script = [("FATAL", 0)]
    headers = {"Authorization": BOGUS_AUTHORIZATION, "Content-Type": "application/json"}
    body = json.dumps({"feed": BODY_MARKER}).encode()
    _, _, answer = await setup.post(UPLOAD, body, headers)
    ingestion_id = json.loads(answer)["ingestionId"]
    await setup.post(STATUS, json.dumps({"ingestionId": ingestion_id}).encode(), headers)
    await setup.post("/v1/catalog/other", body, headers)
    setup.sim.inject(Fault("throttle"), ingestion_id=UPLOAD, count=1)
    await setup.post(UPLOAD, body, headers)
    await wait_for(setup.running.status_is(ingestion_id, "FATAL"))

    logs = setup.running.logs.getvalue()
    assert "ingestion_registered" in logs  # the log is being written
    for secret in (BODY_MARKER, BOGUS_SIGNATURE, "Signature=", "AWS4-HMAC", TEST_SECRET_ACCESS_KEY):
        assert secret not in logs
