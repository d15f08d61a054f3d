"""Every failure the Catalog API can produce is classified, counted and survived."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from exporter.simulator import Fault
from tests.conftest import (
    ExporterFactory,
    RunningExporter,
    SimulatorFactory,
    fast_config,
    requests_seen,
    value,
    wait_for,
)


async def _errors(running: RunningExporter, kind: str) -> float:
    samples = await running.scrape()
    return value(samples, "catalog_api_errors_total", kind=kind) or 0.0


@pytest.mark.parametrize(
    ("fault", "kind", "code"),
    [
        (Fault("server_error_json"), "server_error", "500"),
        (Fault("server_error_html", status=502), "server_error", "502"),
        (Fault("malformed_json"), "malformed_response", "200"),
        (Fault("non_json"), "malformed_response", "200"),
        (Fault("empty_body"), "malformed_response", "200"),
        (Fault("wrong_shape"), "malformed_response", "200"),
        (Fault("big_body", size=2_000_000), "malformed_response", "200"),
        (Fault("bad_request"), "bad_request", "400"),
        (Fault("unexpected_status", status=418), "unexpected_status", "418"),
        (Fault("unauthorized"), "unauthorized", "403"),
        (Fault("reset"), "connection", "error"),
    ],
)
async def test_each_fault_is_counted_by_kind_and_code(
    start_simulator: SimulatorFactory,
    start_exporter: ExporterFactory,
    fault: Fault,
    kind: str,
    code: str,
) -> None:
    """The fault is counted in errors_total{kind} and requests_total{code}; polling goes on."""
    sim, url = await start_simulator()
    sim.add_upload("up-1", [("INPROGRESS", 0)])
    sim.inject(fault, ingestion_id="up-1", count=2)
    running = await start_exporter(fast_config(url, ["up-1"]))
    await wait_for(running.status_is("up-1", "INPROGRESS"))
    samples = await running.scrape()
    assert value(samples, "catalog_api_errors_total", kind=kind) == 2.0
    assert (value(samples, "catalog_api_requests_total", code=code) or 0) >= 2.0
    others = [
        v
        for (name, labels), v in samples.items()
        if name == "catalog_api_errors_total" and dict(labels)["kind"] != kind
    ]
    assert sum(others) == 0.0
    assert f'"kind": "{kind}"' in running.logs.getvalue()


async def test_timeout_is_counted_and_metrics_do_not_wait_for_the_api(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """A hanging API gives timeout errors; /metrics answers at once all the while."""
    sim, url = await start_simulator()
    sim.add_upload("up-1", [("INPROGRESS", 0)])
    sim.inject(Fault("hang", seconds=60), ingestion_id="up-1")
    running = await start_exporter(fast_config(url, ["up-1"], api={"timeout_seconds": 3}))
    await wait_for(requests_seen(sim, "up-1"))
    # The poll now hangs for 3 s; a scrape that waited for it could not finish within 1 s.
    await asyncio.wait_for(running.scrape(), timeout=1.0)
    await wait_for(lambda: _errors_at_least(running, "timeout", 1))
    assert await running.status_of("up-1") == "UNKNOWN"


@pytest.mark.parametrize(
    ("fault", "code"),
    [(Fault("hang", seconds=120), "error"), (Fault("drip", seconds=1.0), "200")],
    ids=["accepts-and-never-answers", "drips-a-byte-a-second"],
)
async def test_an_upstream_that_never_finishes_is_cut_off_at_the_timeout(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory, fault: Fault, code: str
) -> None:
    """A poll that would take minutes ends as a timeout after api.timeout_seconds.

    The code is the status line received, if any: a drip sent "200" before stalling.
    """
    sim, url = await start_simulator()
    sim.add_upload("up-1", [("INPROGRESS", 0)])
    sim.inject(fault, ingestion_id="up-1", count=1)
    running = await start_exporter(fast_config(url, ["up-1"], api={"timeout_seconds": 1}))
    await wait_for(lambda: _errors_at_least(running, "timeout", 1), timeout=5)
    samples = await running.scrape()
    longest = value(samples, "catalog_api_request_duration_seconds_sum") or 0.0
    # Only the stalled poll has taken any time worth counting: it took about the timeout.
    assert 0.9 <= longest <= 2.0
    assert value(samples, "catalog_api_errors_total", kind="timeout") == 1.0
    assert (value(samples, "catalog_api_requests_total", code=code) or 0) >= 1.0
    await wait_for(running.status_is("up-1", "INPROGRESS"))
    abandoned = [r for r in sim.requests if r.status is None]
    assert [r.fault for r in abandoned] == [fault.kind]  # the simulator saw it abandoned


async def _errors_at_least(running: RunningExporter, kind: str, n: float) -> bool:
    return await _errors(running, kind) >= n


async def test_connection_refused_is_counted_as_connection(
    start_exporter: ExporterFactory,
) -> None:
    """Nothing listening: kind connection, code error, exporter stays ready."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    running = await start_exporter(fast_config(f"http://127.0.0.1:{port}", ["up-1"]))
    await wait_for(lambda: _errors_at_least(running, "connection", 2))
    samples = await running.scrape()
    assert (value(samples, "catalog_api_requests_total", code="error") or 0) >= 2
    assert (await running.get("/readyz"))[0] == 200


async def test_429_is_counted_as_throttled_and_lowers_the_rate_limit(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """429s go to catalog_api_throttled_total (not errors) and the rate in force drops."""
    sim, url = await start_simulator()
    sim.add_upload("up-1", [("INPROGRESS", 0)])
    sim.inject(Fault("throttle"), ingestion_id="up-1", count=3)
    running = await start_exporter(fast_config(url, ["up-1"]))
    await wait_for(running.status_is("up-1", "INPROGRESS"))
    samples = await running.scrape()
    assert value(samples, "catalog_api_throttled_total") == 3.0
    assert value(samples, "catalog_api_requests_total", code="429") == 3.0
    assert sum(v for (n, _), v in samples.items() if n == "catalog_api_errors_total") == 0.0
    rate = value(samples, "catalog_api_rate_limit_requests_per_second")
    assert rate is not None and rate < 200.0


async def test_retry_after_is_honoured(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """After a 429 with Retry-After: 1, the next request comes no sooner than 1 s later."""
    sim, url = await start_simulator()
    sim.add_upload("up-1", [("INPROGRESS", 0)])
    sim.inject(Fault("throttle", retry_after=1), ingestion_id="up-1", count=1)
    # Retry-After is honoured up to max_backoff_seconds, so that must be longer than 1 s.
    running = await start_exporter(fast_config(url, ["up-1"], polling={"max_backoff_seconds": 5}))
    await wait_for(running.status_is("up-1", "INPROGRESS"))
    first, second = (r for r in sim.requests[:2])
    assert first.status == 429
    assert second.time - first.time >= 1.0


async def test_server_errors_back_off_exponentially(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """During an outage an upload is retried far less often than its poll interval."""
    sim, url = await start_simulator()
    sim.add_upload("up-1", [("INPROGRESS", 0)])
    sim.inject(Fault("server_error_json"), ingestion_id="up-1")
    config = fast_config(
        url,
        ["up-1"],
        polling={
            "interval_seconds": 0.05,
            "initial_backoff_seconds": 0.1,
            "max_backoff_seconds": 5,
        },
    )
    await start_exporter(config)
    started = time.monotonic()
    await asyncio.sleep(3.0)
    elapsed = time.monotonic() - started
    # Without backoff: ~60 requests (every 0.05 s). With it: the ceilings sum to 3 s by the
    # 5th retry, so full jitter gives well under 20.
    assert 1 <= sim.count(ingestion_id="up-1") < 20, (sim.count(ingestion_id="up-1"), elapsed)


async def test_upload_recovers_when_the_api_does(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """Once the outage ends, the status shows without any restart."""
    sim, url = await start_simulator()
    sim.add_upload("up-1", [("DONE", 0)])
    sim.inject(Fault("server_error_json"))
    running = await start_exporter(fast_config(url, ["up-1"]))
    await wait_for(lambda: _errors_at_least(running, "server_error", 3))
    sim.clear_faults()
    await wait_for(running.status_is("up-1", "DONE"))


async def test_a_far_future_retry_after_is_honoured_only_up_to_max_backoff(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """A 429 with Retry-After in 2099 parks neither everyone nor its upload past max_backoff."""
    sim, url = await start_simulator()
    sim.add_upload("up-1", [("INPROGRESS", 0)])
    sim.add_upload("up-2", [("INPROGRESS", 0)])
    far = "Wed, 01 Jan 2099 00:00:00 GMT"
    sim.inject(Fault("throttle", retry_after=far), ingestion_id="up-1", count=1)
    config = fast_config(url, ["up-1", "up-2"], polling={"max_backoff_seconds": 0.5})
    running = await start_exporter(config)
    await wait_for(running.status_is("up-1", "INPROGRESS"))
    await wait_for(running.status_is("up-2", "INPROGRESS"))
    throttled = [r for r in sim.requests if r.status == 429]
    assert len(throttled) == 1
    assert throttled[0].ingestion_id == "up-1"
