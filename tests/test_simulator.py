"""The fake Catalog API, exercised over real loopback HTTP."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from exporter.models import KNOWN_STATUSES, TERMINAL_STATUSES
from exporter.simulator import (
    API_PATH,
    DEMO_INVALID_IDS,
    TEST_ACCESS_KEY_ID,
    TEST_REGION,
    TEST_SECRET_ACCESS_KEY,
    UPLOAD_PATHS,
    Fault,
    FaultKind,
    SimulatedUpload,
    Simulator,
    create_app,
    demo_uploads,
    random_uploads,
)
from exporter.simulator.api import _parser as simulator_parser
from tests.conftest import requests_seen, wait_for

Response = tuple[int, "dict[str, str]", bytes]


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def serve(serve_simulator: Callable[[Simulator], Awaitable[str]]) -> Callable[[Simulator], Any]:
    """Serve simulators on loopback: `base_url = await serve(sim)`."""
    return serve_simulator


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain HTTP client that never follows redirects on its own."""
    async with aiohttp.ClientSession() as client:
        yield client


async def post(
    session: aiohttp.ClientSession,
    base_url: str,
    ingestion_id: str | None = None,
    *,
    body: bytes | None = None,
    path: str = API_PATH,
    client_timeout: float = 5.0,
) -> Response:
    """POST getCatalogUploadStatus and return (status, headers, body)."""
    if body is None:
        body = json.dumps({"ingestionId": ingestion_id}).encode()
    async with session.post(
        base_url + path,
        data=body,
        headers={"Content-Type": "application/json"},
        allow_redirects=False,
        timeout=aiohttp.ClientTimeout(total=client_timeout),
    ) as response:
        return response.status, dict(response.headers), await response.read()


async def test_an_upload_progresses_through_its_script(serve, session):
    """The answered status follows the script's steps on the injected clock, the last forever."""
    clock = FakeClock()
    sim = Simulator(rate_limit=None, clock=clock)
    sim.add_upload("up-1", [("INQUEUE", 10), ("INPROGRESS", 20), ("DONE", 0)])
    url = await serve(sim)
    seen = []
    for offset in (0, 9.9, 10, 29.9, 30, 10_000):
        clock.now = 1000.0 + offset
        status, headers, body = await post(session, url, "up-1")
        assert status == 200
        assert headers["Content-Type"].startswith("application/json")
        seen.append(json.loads(body)["processingStatus"])
    assert seen == ["INQUEUE", "INQUEUE", "INPROGRESS", "INPROGRESS", "DONE", "DONE"]


async def test_a_terminal_status_carries_a_presigned_report_link(serve, session):
    """DONE answers a presigned link to the simulator's own report endpoint; a running upload
    answers an empty link."""
    clock = FakeClock()
    sim = Simulator(rate_limit=None, clock=clock)
    sim.add_upload("up-1", [("INPROGRESS", 5), ("DONE", 0)])
    sim.add_upload("no-report", [("DONE", 0)], report=False)
    url = await serve(sim)
    running = json.loads((await post(session, url, "up-1"))[2])
    assert running == {"processingStatus": "INPROGRESS", "reportDownloadLink": ""}
    clock.now += 5
    done = json.loads((await post(session, url, "up-1"))[2])
    assert done["processingStatus"] == "DONE"
    assert done["reportDownloadLink"].startswith(f"{url}/reports/up-1.csv?")
    assert "X-Amz-Signature=" in done["reportDownloadLink"]
    assert json.loads((await post(session, url, "no-report"))[2])["reportDownloadLink"] == ""


async def test_list_valued_statuses_are_answered_as_lists(serve, session):
    """A scripted list status is sent as a JSON list, as in the spec's examples."""
    clock = FakeClock()
    sim = Simulator(rate_limit=None, clock=clock)
    sim.add_upload("listy", [(["INQUEUE", "INPROGRESS"], 5), (["CANCELLED", "FATAL"], 0)])
    url = await serve(sim)
    first = json.loads((await post(session, url, "listy"))[2])
    assert first == {"processingStatus": ["INQUEUE", "INPROGRESS"], "reportDownloadLink": ""}
    clock.now += 5
    last = json.loads((await post(session, url, "listy"))[2])
    assert last["processingStatus"] == ["CANCELLED", "FATAL"]
    assert last["reportDownloadLink"]


async def test_list_status_rate_turns_scalar_statuses_into_lists(serve, session):
    """With list_status_rate=1 every status comes as a list ending with the real status."""
    sim = Simulator(rate_limit=None, list_status_rate=1.0, seed=1)
    sim.add_upload("busy", [("INPROGRESS", 0)])
    url = await serve(sim)
    payload = json.loads((await post(session, url, "busy"))[2])
    assert payload["processingStatus"] == ["INQUEUE", "INPROGRESS"]


async def test_set_status_forces_a_status_and_remove_upload_makes_the_id_invalid(serve, session):
    """set_status overrides the script from now on; a removed upload answers 400."""
    sim = Simulator(rate_limit=None)
    sim.add_upload("up-1", [("INQUEUE", 0)])
    url = await serve(sim)
    sim.set_status("up-1", "FATAL")
    fatal = json.loads((await post(session, url, "up-1"))[2])
    assert fatal["processingStatus"] == "FATAL"
    assert fatal["reportDownloadLink"]
    sim.set_status("up-1", "DONE", report=False)
    assert json.loads((await post(session, url, "up-1"))[2])["reportDownloadLink"] == ""
    sim.remove_upload("up-1")
    assert (await post(session, url, "up-1"))[0] == 400


async def test_an_unknown_ingestion_id_is_a_400_with_errormsg(serve, session):
    """An id the simulator does not know gets the spec's InvalidRequestException answer."""
    url = await serve(Simulator(rate_limit=None))
    status, headers, body = await post(session, url, "nosuch")
    assert status == 400
    assert json.loads(body) == {"errorMsg": "API invoked with Invalid parameter"}
    assert headers["x-amzn-ErrorType"] == "InvalidRequestException"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"",
        b"[]",
        b'{"ingestion": "up-1"}',
        b'{"ingestionId": 42}',
        b'{"ingestionId": ""}',
        json.dumps({"ingestionId": "x" * 256}).encode(),
    ],
    ids=["not-json", "empty", "array", "no-id", "id-not-string", "id-empty", "id-too-long"],
)
async def test_a_bad_body_is_a_400_with_message(serve, session, body):
    """A body the API's model refuses gets the spec's BadRequestException answer."""
    url = await serve(Simulator(rate_limit=None))
    status, headers, answer = await post(session, url, body=body)
    assert status == 400
    assert json.loads(answer) == {"message": "Invalid request body"}
    assert headers["x-amzn-ErrorType"] == "BadRequestException"


async def test_an_id_of_255_characters_is_accepted(serve, session):
    """The spec's limit is inclusive."""
    sim = Simulator(rate_limit=None)
    sim.add_upload("y" * 255, [("INQUEUE", 0)])
    url = await serve(sim)
    assert (await post(session, url, "y" * 255))[0] == 200


async def test_an_oversized_body_is_refused_with_413(serve, session):
    """Request bodies are read with a size cap."""
    url = await serve(Simulator(rate_limit=None))
    status, _, _ = await post(session, url, body=b" " * 200_000)
    assert status == 413


async def test_the_rate_limit_answers_429_past_the_burst_and_recovers(serve, session):
    """A token bucket refuses requests beyond the burst until time refills it."""
    clock = FakeClock()
    sim = Simulator(rate_limit=2.0, burst=3, clock=clock)
    sim.add_upload("up-1", [("INQUEUE", 0)])
    url = await serve(sim)
    answers = [await post(session, url, "up-1") for _ in range(6)]
    assert [a[0] for a in answers] == [200, 200, 200, 429, 429, 429]
    throttled = [json.loads(a[2]) for a in answers[3:]]
    assert throttled[0] == {"message": "Too Many Requests"}
    assert throttled[1] == {"errorMsg": "Too Many Requests"}
    assert answers[3][1].get("Retry-After") == "1"
    assert "Retry-After" not in answers[4][1]
    clock.now += 0.5  # one token at 2/s
    assert (await post(session, url, "up-1"))[0] == 200
    assert (await post(session, url, "up-1"))[0] == 429
    assert sim.count(status=429) == 4


def _json_body(expected: object) -> Callable[[bytes, dict[str, str]], bool]:
    return lambda body, headers: json.loads(body) == expected


def _not_json(body: bytes, headers: dict[str, str]) -> bool:
    try:
        json.loads(body)
    except ValueError:
        return True
    return False


@pytest.mark.parametrize(
    ("fault", "status", "check"),
    [
        (
            Fault(FaultKind.SERVER_ERROR_JSON),
            500,
            _json_body({"errorMsg": "Exception encountered while processing the request"}),
        ),
        (
            Fault(FaultKind.SERVER_ERROR_HTML),
            502,
            lambda body, h: h["Content-Type"].startswith("text/html") and b"<html>" in body,
        ),
        (
            Fault(FaultKind.SERVER_ERROR_HTML, status=503),
            503,
            lambda body, h: b"503 Service Unavailable" in body,
        ),
        (Fault(FaultKind.THROTTLE), 429, _json_body({"message": "Too Many Requests"})),
        (
            Fault(FaultKind.THROTTLE, retry_after=7, key="errorMsg"),
            429,
            lambda body, h: (
                json.loads(body) == {"errorMsg": "Too Many Requests"} and h["Retry-After"] == "7"
            ),
        ),
        (Fault(FaultKind.MALFORMED_JSON), 200, _not_json),
        (
            Fault(FaultKind.NON_JSON),
            200,
            lambda body, h: h["Content-Type"].startswith("text/html") and _not_json(body, h),
        ),
        (Fault(FaultKind.EMPTY_BODY), 200, lambda body, h: body == b""),
        (
            Fault(FaultKind.WRONG_SHAPE),
            200,
            lambda body, h: "processingStatus" not in json.loads(body),
        ),
        (Fault(FaultKind.WRONG_SHAPE, body="42"), 200, _json_body(42)),
        (Fault(FaultKind.BAD_REQUEST), 400, _json_body({"message": "Invalid request body"})),
        (Fault(FaultKind.UNEXPECTED_STATUS), 418, lambda body, h: True),
        (Fault(FaultKind.UNEXPECTED_STATUS, status=302), 302, lambda body, h: "Location" in h),
        (
            Fault(FaultKind.UNAUTHORIZED),
            403,
            lambda body, h: "not authorized" in json.loads(body)["message"],
        ),
        (
            Fault(FaultKind.BIG_BODY, size=100_000),
            200,
            lambda body, h: len(body) == 100_000 and "processingStatus" in json.loads(body),
        ),
    ],
    ids=lambda v: (
        f"{v.kind}-{v.status or ''}{v.body or ''}{v.retry_after or ''}"
        if isinstance(v, Fault)
        else ""
    ),
)
async def test_each_fault_kind_answers_as_described(serve, session, fault, status, check):
    """An injected fault replaces the normal answer with its canned one and is logged."""
    sim = Simulator(rate_limit=None)
    sim.add_upload("up-1", [("INQUEUE", 0)])
    url = await serve(sim)
    sim.inject(fault, count=1)
    got_status, headers, body = await post(session, url, "up-1")
    assert got_status == status
    assert check(body, headers)
    assert sim.requests[-1].fault == fault.kind
    assert (await post(session, url, "up-1"))[0] == 200  # count=1: the next one is normal


async def test_the_default_big_body_is_five_megabytes_of_valid_json(serve, session):
    """big_body without a size sends 5 MiB that still parses."""
    sim = Simulator(rate_limit=None)
    url = await serve(sim)
    sim.inject(Fault("big_body"))
    status, _, body = await post(session, url, "anything")
    assert status == 200
    assert len(body) == 5 * 1024 * 1024
    assert json.loads(body)["processingStatus"] == "INPROGRESS"


async def test_a_hang_lasts_until_the_client_gives_up_while_other_requests_are_served(
    serve, session
):
    """A hanging request never answers, and a concurrent request is answered meanwhile."""
    sim = Simulator(rate_limit=None)
    sim.add_upload("stuck", [("INQUEUE", 0)])
    sim.add_upload("fine", [("DONE", 0)])
    url = await serve(sim)
    sim.inject(Fault(FaultKind.HANG), ingestion_id="stuck")
    hanging = asyncio.create_task(post(session, url, "stuck", client_timeout=0.5))
    await wait_for(requests_seen(sim, "stuck"))  # a hang is logged as it arrives
    status, _, _ = await post(session, url, "fine", client_timeout=0.3)
    assert status == 200
    assert not hanging.done()
    with pytest.raises(asyncio.TimeoutError):
        await hanging
    assert sim.count(ingestion_id="stuck", status=None) == 1
    assert sim.requests[0].fault == "hang"


async def test_in_flight_counts_a_hanging_request_until_its_client_leaves(serve, session):
    """A request counts in `in_flight` from its arrival until its handling ends: a hang the
    client gave up on ends when the simulator notices, and then nothing is in flight."""
    sim = Simulator(rate_limit=None)
    sim.add_upload("stuck", [("INQUEUE", 0)])
    url = await serve(sim)
    assert sim.in_flight == 0
    sim.inject(Fault(FaultKind.HANG), ingestion_id="stuck", count=1)
    hanging = asyncio.create_task(post(session, url, "stuck", client_timeout=0.5))
    await wait_for(requests_seen(sim, "stuck"))  # a hang is logged as it arrives
    assert sim.in_flight == 1
    with pytest.raises(asyncio.TimeoutError):
        await hanging

    async def ended() -> bool:
        return sim.in_flight == 0

    await wait_for(ended)
    assert (await post(session, url, "stuck"))[0] == 200
    assert sim.in_flight == 0


async def test_latency_delays_a_normal_answer(serve, session):
    """A latency fault sleeps, then answers the real status."""
    sim = Simulator(rate_limit=None)
    sim.add_upload("up-1", [("INPROGRESS", 0)])
    url = await serve(sim)
    sim.inject(Fault(FaultKind.LATENCY, seconds=0.2), count=1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, _, body = await post(session, url, "up-1")
    assert loop.time() - started >= 0.2
    assert status == 200
    assert json.loads(body)["processingStatus"] == "INPROGRESS"
    assert sim.requests[-1].fault == "latency"
    record = sim.requests[-1]
    assert record.received is not None
    assert record.time - record.received >= 0.2  # arrival and answer are both logged


async def test_a_drip_sends_headers_at_once_then_the_body_byte_by_byte(serve, session):
    """A drip answers 200 at once but takes len(body) * seconds to finish the body."""
    sim = Simulator(rate_limit=None)
    sim.add_upload("up-1", [("DONE", 0)])
    url = await serve(sim)
    sim.inject(Fault(FaultKind.DRIP, seconds=0.002), count=1)
    status, _, body = await post(session, url, "up-1")
    assert status == 200
    assert json.loads(body)["processingStatus"] == "DONE"
    assert len(body) > 100  # the link is in it: a drip of it takes a while
    assert sim.requests[-1].fault == "drip"
    assert sim.requests[-1].status == 200


async def test_a_drip_the_client_leaves_is_logged_unanswered(serve, session):
    """A client that gives up on a drip is logged with no status."""
    sim = Simulator(rate_limit=None)
    sim.add_upload("up-1", [("INQUEUE", 0)])
    url = await serve(sim)
    sim.inject(Fault(FaultKind.DRIP), count=1)
    with pytest.raises(asyncio.TimeoutError):
        await post(session, url, "up-1", client_timeout=0.3)

    async def logged() -> bool:
        return bool(sim.requests)

    await wait_for(logged, timeout=3)
    assert sim.requests[-1].status is None
    assert sim.requests[-1].fault == "drip"


async def test_chaos_gives_each_fault_about_its_share_and_clear_faults_ends_it(serve, session):
    """A chaos mix applies faults at the rates given, logs their labels, and stops on clear."""
    sim = Simulator(rate_limit=None, seed=7)
    sim.add_upload("up-1", [("INPROGRESS", 0)])
    url = await serve(sim)
    sim.set_chaos(
        [
            (Fault(FaultKind.THROTTLE, retry_after=1, label="throttle_retry_after"), 0.2),
            (Fault(FaultKind.SERVER_ERROR_JSON), 0.3),
        ]
    )
    statuses = [(await post(session, url, "up-1"))[0] for _ in range(400)]
    labels = [r.fault for r in sim.requests]
    assert 40 <= labels.count("throttle_retry_after") == statuses.count(429) <= 120
    assert 80 <= labels.count("server_error_json") == statuses.count(500) <= 160
    assert labels.count(None) == statuses.count(200)
    sim.clear_faults()
    assert [(await post(session, url, "up-1"))[0] for _ in range(20)] == [200] * 20


def test_a_chaos_mix_over_one_is_refused() -> None:
    sim = Simulator(rate_limit=None)
    with pytest.raises(ValueError, match="sum to at most 1"):
        sim.set_chaos([(Fault(FaultKind.RESET), 0.6), (Fault(FaultKind.HANG), 0.5)])


@pytest.mark.parametrize("cancel_handlers", [True, False], ids=["cancelling", "not-cancelling"])
async def test_a_slow_answer_ends_when_its_client_leaves(session, cancel_handlers):
    """A delayed request whose client gave up is logged unanswered at once, not after the delay.

    aiohttp's TestServer cancels the handler of a closed connection; AppRunner, as the CLI
    and the demo use it, does not, so the simulator has to notice by itself.
    """
    sim = Simulator(rate_limit=None, latency=30.0, seed=1)
    sim.add_upload("up-1", [("INPROGRESS", 0)])
    runner = web.AppRunner(create_app(sim), handler_cancellation=cancel_handlers)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        with pytest.raises(asyncio.TimeoutError):
            await post(session, url, "up-1", client_timeout=0.2)
        for _ in range(40):
            if sim.requests:
                break
            await asyncio.sleep(0.05)
        assert [(r.ingestion_id, r.status) for r in sim.requests] == [("up-1", None)]
    finally:
        await runner.cleanup()


async def test_stopping_the_server_ends_hanging_and_slow_requests_promptly(session):
    """Shutdown releases in-flight hangs and delays instead of waiting minutes for them."""
    sim = Simulator(rate_limit=None)
    sim.add_upload("up-1", [("INPROGRESS", 0)])
    server = TestServer(create_app(sim), host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    sim.inject(Fault(FaultKind.HANG), count=1)
    sim.inject(Fault(FaultKind.LATENCY, seconds=60), count=1)
    in_flight = [
        asyncio.create_task(post(session, url, "up-1", client_timeout=30)) for _ in range(2)
    ]
    await asyncio.sleep(0.2)  # both requests reach their handlers
    assert not any(task.done() for task in in_flight)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await server.close()
    assert loop.time() - started < 2
    await asyncio.gather(*in_flight, return_exceptions=True)


async def test_reset_closes_the_connection_without_an_answer(serve, session):
    """A reset fault drops the connection; the client sees a connection error."""
    sim = Simulator(rate_limit=None)
    sim.add_upload("up-1", [("INPROGRESS", 0)])
    url = await serve(sim)
    sim.inject(Fault(FaultKind.RESET), count=1)
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(session, url, "up-1")
    assert sim.requests[-1].status is None
    assert (await post(session, url, "up-1"))[0] == 200


async def test_a_fault_for_an_id_takes_precedence_and_count_limits_it(serve, session):
    """Id-specific faults win over global ones and expire after `count` requests."""
    sim = Simulator(rate_limit=None)
    sim.add_upload("a", [("INQUEUE", 0)])
    sim.add_upload("b", [("INQUEUE", 0)])
    url = await serve(sim)
    sim.inject(Fault(FaultKind.SERVER_ERROR_JSON))
    sim.inject(Fault(FaultKind.BAD_REQUEST), ingestion_id="a", count=2)
    assert [(await post(session, url, "a"))[0] for _ in range(3)] == [400, 400, 500]
    assert (await post(session, url, "b"))[0] == 500
    sim.clear_faults()
    assert (await post(session, url, "b"))[0] == 200


async def test_random_faults_follow_the_rates(serve, session):
    """error_rate=1 makes every answer a server error, malformed_rate=1 a broken 200."""
    errors = Simulator(rate_limit=None, error_rate=1.0, seed=7)
    errors.add_upload("up-1", [("INQUEUE", 0)])
    url = await serve(errors)
    statuses = {(await post(session, url, "up-1"))[0] for _ in range(10)}
    assert statuses <= {500, 502, 503}
    assert len(statuses) > 1

    broken = Simulator(rate_limit=None, malformed_rate=1.0, seed=7)
    broken.add_upload("up-1", [("INQUEUE", 0)])
    url = await serve(broken)
    for _ in range(10):
        status, _, body = await post(session, url, "up-1")
        assert status == 200
        assert _not_json(body, {}) or "processingStatus" not in json.loads(body)
    assert {r.fault for r in broken.requests} <= {
        "malformed_json",
        "non_json",
        "empty_body",
        "wrong_shape",
    }


async def test_the_request_log_counts_requests_by_id_and_status(serve, session):
    """Every request is logged with its id, status and fault; count() filters them."""
    sim = Simulator(rate_limit=None)
    sim.add_upload("up-1", [("INQUEUE", 0)])
    url = await serve(sim)
    await post(session, url, "up-1")
    await post(session, url, "up-1")
    await post(session, url, "nosuch")
    await post(session, url, body=b"{")
    assert len(sim.requests) == 4
    assert sim.count(ingestion_id="up-1") == 2
    assert sim.count(ingestion_id="nosuch", status=400) == 1
    assert sim.count(status=400) == 2
    assert sim.count(auth_ok=False) == 0
    assert all(r.fault is None for r in sim.requests)


async def test_the_api_is_served_under_a_stage_prefix(serve, session):
    """API Gateway stages put a prefix before the path, e.g. /prod/v1/catalog/..."""
    sim = Simulator(rate_limit=None)
    sim.add_upload("up-1", [("DONE", 0)])
    url = await serve(sim)
    assert (await post(session, url, "up-1", path="/prod" + API_PATH))[0] == 200


async def test_unknown_routes_answer_403_and_healthz_answers_200(serve, session):
    """Like API Gateway, an unknown route or method is a 403 Missing Authentication Token."""
    url = await serve(Simulator(rate_limit=None))
    status, _, body = await post(session, url, "up-1", path="/v1/catalog/nothing")
    assert status == 403
    assert json.loads(body) == {"message": "Missing Authentication Token"}
    async with session.get(url + API_PATH) as response:
        assert response.status == 403
    async with session.get(url + "/healthz") as response:
        assert response.status == 200


def test_demo_uploads_cover_every_exposed_status_within_forty_seconds():
    """Sampled every 2 s over 40 s the demo shows each API status, lists and odd values."""
    uploads = demo_uploads()
    ids = [u.ingestion_id for u in uploads]
    assert len(ids) == len(set(ids)) >= 10
    assert not set(ids) & set(DEMO_INVALID_IDS)
    seen: set[str] = set()
    lists_seen = []
    for upload in uploads:
        for t in range(0, 41, 2):
            status = upload.status_at(t)
            if isinstance(status, list):
                lists_seen.append(status)
                seen.update(status)
            else:
                seen.add(status)
    api_statuses = set(KNOWN_STATUSES) - {"INVALID", "UNKNOWN"}
    assert api_statuses <= seen
    assert {"PARTIALLY_DONE", "in progress (50%)"} <= seen
    assert ["INQUEUE", "INPROGRESS"] in lists_seen
    assert ["CANCELLED", "FATAL"] in lists_seen
    finals = {u.ingestion_id: u.status_at(math.inf) for u in uploads}
    assert finals["demo-stuck-inprogress"] == "INPROGRESS"
    assert finals["demo-stuck-inqueue"] == "INQUEUE"


def test_random_uploads_are_numbered_and_end_in_a_terminal_status():
    """--uploads N makes ids sim-000001.. whose scripts end DONE, FATAL or CANCELLED."""
    uploads = random_uploads(50, seed=3)
    assert uploads[0].ingestion_id == "sim-000001"
    assert uploads[-1].ingestion_id == "sim-000050"
    finals = [u.status_at(math.inf) for u in uploads]
    assert set(finals) <= TERMINAL_STATUSES
    assert finals.count("DONE") > len(finals) / 2
    assert random_uploads(50, seed=3) == uploads


def test_a_script_must_have_a_step_and_a_fault_a_known_kind():
    """Bad scripts and unknown fault kinds are refused when made, not mid-request."""
    with pytest.raises(ValueError, match="at least one step"):
        SimulatedUpload("x", [])
    with pytest.raises(ValueError, match="durations"):
        SimulatedUpload("x", [("INQUEUE", -1), ("DONE", 0)])
    with pytest.raises(ValueError, match="teapot"):
        Fault("teapot")


async def test_the_cli_starts_answers_and_exits_cleanly_on_sigterm(tmp_path: Path):
    """`python -m exporter.simulator --port 0` prints its URL, serves, and exits 0 on SIGTERM."""
    token_file = tmp_path / "tokens"
    token_file.write_text("cli-token\n")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "exporter.simulator",
        "--port",
        "0",
        "--auth",
        "bearer",
        "--token-file",
        str(token_file),
        "--log-requests",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        assert process.stderr is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 15)).decode()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert match, line
        url = match.group(0)
        async with aiohttp.ClientSession() as client:
            async with client.post(
                url + API_PATH,
                json={"ingestionId": demo_uploads()[0].ingestion_id},
                headers={"Authorization": "Bearer cli-token"},
            ) as response:
                assert response.status == 200
                assert "processingStatus" in await response.json()
            async with client.post(url + API_PATH, json={"ingestionId": "x"}) as response:
                assert response.status == 401
        logged = json.loads(await asyncio.wait_for(process.stderr.readline(), 5))
        assert logged["status"] == 200
        assert logged["auth_ok"] is True
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_every_simulator_option_has_help_text_and_the_help_names_the_test_key() -> None:
    """`python -m exporter.simulator --help` explains each option, the test key and the ids."""
    result = subprocess.run(
        [sys.executable, "-m", "exporter.simulator", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "1000"},  # no wrapping inside the names checked
    )
    options = [a for a in simulator_parser()._actions if a.option_strings]
    assert [a.dest for a in options if not a.help] == []
    for action in options:
        assert action.option_strings[-1] in result.stdout
    for fact in (TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY, TEST_REGION, "demo-done-fast"):
        assert fact in result.stdout, fact


@pytest.mark.parametrize("path", UPLOAD_PATHS)
async def test_an_upload_operation_answers_a_new_id_that_follows_the_upload_script(
    serve, session, path
):
    """Each asynchronous operation answers 200 {"ingestionId"} with a fresh id, polled as the
    script says; the body's size and hash are recorded, not the body."""
    clock = FakeClock()
    sim = Simulator(rate_limit=None, clock=clock)
    sim.upload_script = [("INQUEUE", 5), ("FATAL", 0)]
    url = await serve(sim)
    status, headers, body = await post(session, url, body=b'{"feed": "x"}', path=path)
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    (new_id,) = json.loads(body).values()
    assert new_id == "sim-upload-000001"
    assert [(u.path, u.ingestion_id, u.size) for u in sim.received_uploads] == [(path, new_id, 13)]
    assert json.loads((await post(session, url, new_id))[2])["processingStatus"] == "INQUEUE"
    clock.now += 5
    assert json.loads((await post(session, url, new_id))[2])["processingStatus"] == "FATAL"
    assert sim.requests[0].path == path


async def test_an_upload_operation_takes_faults_injected_for_its_path(serve, session):
    """A fault injected for an operation's path answers it instead; no id is created."""
    sim = Simulator(rate_limit=None)
    sim.inject(Fault("throttle", retry_after=3), ingestion_id=UPLOAD_PATHS[0], count=1)
    url = await serve(sim)
    status, headers, _ = await post(session, url, body=b"{}", path=UPLOAD_PATHS[0])
    assert (status, headers["Retry-After"]) == (429, "3")
    assert sim.received_uploads == []
    assert (await post(session, url, body=b"{}", path=UPLOAD_PATHS[0]))[0] == 200
