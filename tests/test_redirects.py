"""A redirecting API: never followed, counted as unexpected_status, credentials stay home."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from botocore.credentials import Credentials

from exporter import register
from exporter.auth import RequestAuth, SigV4Auth
from exporter.config import AuthConfig
from exporter.simulator import (
    API_PATH,
    TEST_ACCESS_KEY_ID,
    TEST_REGION,
    TEST_SECRET_ACCESS_KEY,
    Fault,
)
from tests.conftest import (
    ExporterFactory,
    RunningExporter,
    SimulatorFactory,
    fast_config,
    value,
    wait_for,
)

API_KEY = "key-3b9f0c1d-SECRET-api-key"
SESSION_TOKEN = "FwoGZXIvYXdzSESSION-TOKEN-3c1f9e"


def _session_token_auth(_: AuthConfig) -> RequestAuth:
    """SigV4 with temporary credentials: every request carries X-Amz-Security-Token."""
    return SigV4Auth(
        region=TEST_REGION,
        credentials=Credentials(TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY, SESSION_TOKEN),
    )


async def _redirect_run(
    start_simulator: SimulatorFactory,
    start_exporter: ExporterFactory,
    status: int,
    *,
    sim_options: dict[str, object],
    api: dict[str, object],
    auth_factory: object = None,
) -> tuple[RunningExporter, int]:
    """The API redirects every poll of up-1 to a second simulator that would answer DONE.

    Returns the running exporter and how many requests the second server received.
    """
    elsewhere, elsewhere_url = await start_simulator()
    elsewhere.add_upload("up-1", [("DONE", 0)])
    sim, url = await start_simulator(**sim_options)
    sim.add_upload("up-1", [("INPROGRESS", 0)])
    location = f"{elsewhere_url}{API_PATH}?X-Amz-Signature=feedface&next=/private-path"
    sim.inject(Fault("redirect", status=status, location=location), ingestion_id="up-1")
    kwargs = {} if auth_factory is None else {"auth_factory": auth_factory}
    running = await start_exporter(fast_config(url, ["up-1"], api=api), **kwargs)

    async def counted() -> bool:
        samples = await running.scrape()
        return (value(samples, "catalog_api_requests_total", code=str(status)) or 0) >= 3

    await wait_for(counted)
    return running, elsewhere.count()


def _assert_refused(running: RunningExporter, status: int, secrets: tuple[str, ...]) -> None:
    logs = running.logs.getvalue()
    failures = [e for e in map(json.loads, logs.splitlines()) if e["event"] == "poll_failed"]
    assert failures
    assert all(e["kind"] == "unexpected_status" for e in failures)
    assert all(e["http_status"] == status for e in failures)
    assert all(e["message"] == "redirect to host 127.0.0.1, not followed" for e in failures)
    for leaked in ("feedface", "private-path", API_PATH + "?", *secrets):
        assert leaked not in logs


@pytest.mark.parametrize("status", [302, 307])
async def test_redirect_with_a_custom_header_token_is_not_followed(
    start_simulator: SimulatorFactory,
    start_exporter: ExporterFactory,
    tmp_path: Path,
    status: int,
) -> None:
    """X-Api-Key never reaches the redirect's host; the upload's status is not taken from it."""
    token_file = tmp_path / "token"
    token_file.write_text(API_KEY)
    running, received_elsewhere = await _redirect_run(
        start_simulator,
        start_exporter,
        status,
        sim_options={"auth": "bearer", "tokens": [API_KEY], "token_header": "X-Api-Key"},
        api={
            "auth": {
                "type": "bearer",
                "token_file": str(token_file),
                "header": "X-Api-Key",
                "scheme": "",
            }
        },
    )
    assert received_elsewhere == 0
    assert await running.status_of("up-1") == "UNKNOWN"
    samples = await running.scrape()
    assert (value(samples, "catalog_api_errors_total", kind="unexpected_status") or 0) >= 3
    _assert_refused(running, status, (API_KEY,))


@pytest.mark.parametrize("status", [302, 307])
async def test_redirect_under_sigv4_with_a_session_token_is_not_followed(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory, status: int
) -> None:
    """X-Amz-Security-Token never reaches the redirect's host; the error is counted by code."""
    running, received_elsewhere = await _redirect_run(
        start_simulator,
        start_exporter,
        status,
        sim_options={"auth": "sigv4"},
        api={"auth": {"type": "sigv4", "region": TEST_REGION}},
        auth_factory=_session_token_auth,
    )
    assert received_elsewhere == 0
    assert await running.status_of("up-1") == "UNKNOWN"
    samples = await running.scrape()
    assert (value(samples, "catalog_api_errors_total", kind="unexpected_status") or 0) >= 3
    _assert_refused(running, status, (SESSION_TOKEN, TEST_SECRET_ACCESS_KEY))


@pytest.mark.parametrize("status", [302, 307])
async def test_register_command_does_not_follow_a_redirect_with_its_token(
    tmp_path: Path, status: int
) -> None:
    """catalog-upload-register refuses a 3xx: the admin token never reaches the other host."""
    received: list[web.Request] = []

    async def record(request: web.Request) -> web.Response:
        received.append(request)
        return web.json_response({"ingestionId": "x"}, status=201)

    elsewhere_app = web.Application()
    elsewhere_app.router.add_route("*", "/{tail:.*}", record)
    async with TestServer(elsewhere_app, host="127.0.0.1") as elsewhere:

        async def redirect(request: web.Request) -> web.Response:
            location = str(elsewhere.make_url(request.path))
            return web.Response(status=status, headers={"Location": location})

        admin_app = web.Application()
        admin_app.router.add_route("*", "/{tail:.*}", redirect)
        async with TestServer(admin_app, host="127.0.0.1") as admin:
            token_file = tmp_path / "admin-token"
            token_file.write_text("admin-SECRET-token-1")
            argv = ["up-1", "--url", str(admin.make_url("")), "--token-file", str(token_file)]
            code = await asyncio.to_thread(register.main, argv)
    assert code == register.EXIT_REFUSED
    assert received == []
