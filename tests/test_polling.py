"""The exporter polling a real simulator over loopback HTTP, seen through /metrics."""

from __future__ import annotations

import json

from exporter.simulator import Fault
from tests.conftest import (
    ExporterFactory,
    SimulatorFactory,
    fast_config,
    requests_seen,
    value,
    wait_for,
)


async def test_upload_moves_through_statuses_and_metrics_follow(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """INQUEUE → INPROGRESS → DONE shows as one-hot status, counts and transitions. The
    test moves the upload on only once the exporter shows its current status: no step is
    missed however slow the machine."""
    sim, url = await start_simulator()
    sim.add_upload("up-1", [("INQUEUE", float("inf"))])
    running = await start_exporter(fast_config(url, ["up-1"]))
    await wait_for(running.status_is("up-1", "INQUEUE"))
    sim.set_status("up-1", "INPROGRESS")
    await wait_for(running.status_is("up-1", "INPROGRESS"))
    sim.set_status("up-1", "DONE")
    await wait_for(running.status_is("up-1", "DONE"))
    samples = await running.scrape()
    one_hot = {
        dict(labels)["status"]: v
        for (name, labels), v in samples.items()
        if name == "catalog_upload_status"
    }
    assert sum(one_hot.values()) == 1.0
    assert set(one_hot) == {
        "INQUEUE",
        "INPROGRESS",
        "DONE",
        "CANCELLED",
        "FATAL",
        "INVALID",
        "UNKNOWN",
    }
    assert value(samples, "catalog_uploads", status="DONE") == 1.0
    assert value(samples, "catalog_uploads", status="INQUEUE") == 0.0
    assert value(samples, "catalog_upload_transitions_total", status="DONE") == 1.0
    assert value(samples, "catalog_upload_report_available", ingestion_id="up-1") == 1.0
    assert value(samples, "catalog_upload_last_success_timestamp_seconds", ingestion_id="up-1")
    assert value(samples, "catalog_api_requests_total", code="200")
    changes = [
        (e["ingestion_id"], e["from"], e["to"])
        for e in map(json.loads, running.logs.getvalue().splitlines())
        if e["event"] == "status_changed"
    ]
    assert changes[0] == ("up-1", "UNKNOWN", "INQUEUE")
    assert changes[-1][1:] == ("INPROGRESS", "DONE")


async def test_upload_is_unknown_before_its_first_successful_poll(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """A tracked id the API keeps failing for stays UNKNOWN, with no last-success series."""
    sim, url = await start_simulator()
    sim.add_upload("up-1", [("INPROGRESS", 0)])
    sim.inject(Fault("server_error_json"), ingestion_id="up-1")
    running = await start_exporter(fast_config(url, ["up-1"]))
    await wait_for(requests_seen(sim, "up-1", 2))
    assert await running.status_of("up-1") == "UNKNOWN"
    samples = await running.scrape()
    assert (
        value(samples, "catalog_upload_last_success_timestamp_seconds", ingestion_id="up-1") is None
    )


async def test_terminal_upload_is_not_polled_again(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """Once DONE, FATAL or CANCELLED, an id gets no more requests."""
    sim, url = await start_simulator()
    sim.add_upload("done", [("DONE", 0)])
    sim.add_upload("fatal", [("FATAL", 0)])
    sim.add_upload("cancelled", [("CANCELLED", 0)])
    sim.add_upload("busy", [("INPROGRESS", 0)])
    running = await start_exporter(fast_config(url, ["done", "fatal", "cancelled", "busy"]))
    for terminal in ("done", "fatal", "cancelled"):
        await wait_for(running.status_is(terminal, terminal.upper()))
    polled = sim.count(ingestion_id="busy")
    await wait_for(requests_seen(sim, "busy", polled + 5))  # five more polling intervals
    for terminal in ("done", "fatal", "cancelled"):
        assert sim.count(ingestion_id=terminal) == 1
        assert await running.status_of(terminal) == terminal.upper()


async def test_terminal_series_are_removed_after_retention(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """A terminal upload's series disappear after terminal_retention_seconds; others stay."""
    sim, url = await start_simulator()
    sim.add_upload("done", [("DONE", 0)])
    sim.add_upload("busy", [("INPROGRESS", 0)])
    config = fast_config(url, ["done", "busy"], polling={"terminal_retention_seconds": 0.5})
    running = await start_exporter(config)
    await wait_for(running.status_is("done", "DONE"))
    await wait_for(running.status_is("done", None), timeout=5)
    samples = await running.scrape()
    assert value(samples, "catalog_exporter_tracked_ingestions") == 1.0
    assert await running.status_of("busy") == "INPROGRESS"
    assert '"event": "retention_expired"' in running.logs.getvalue()


async def test_list_valued_status_is_reduced_to_the_most_advanced(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """["CANCELLED", "FATAL"] from the API is exposed as FATAL."""
    sim, url = await start_simulator()
    sim.add_upload("listy", [(["INQUEUE", "INPROGRESS"], 0.5), (["CANCELLED", "FATAL"], 0)])
    running = await start_exporter(fast_config(url, ["listy"]))
    await wait_for(running.status_is("listy", "INPROGRESS"))
    await wait_for(running.status_is("listy", "FATAL"))


async def test_unknown_status_values_are_exposed_as_other_or_unknown_and_logged_once(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """A sane new value is OTHER; a non-identifier becomes UNKNOWN; one log naming each."""
    sim, url = await start_simulator()
    sim.add_upload("new", [("PARTIALLY_DONE", 0)])
    sim.add_upload("odd", [("in progress (50%)", 0)])
    running = await start_exporter(fast_config(url, ["new", "odd"]))
    await wait_for(requests_seen(sim, "odd", 3))
    await wait_for(requests_seen(sim, "new", 3))
    assert await running.status_of("new") == "OTHER"
    assert await running.status_of("odd") == "UNKNOWN"
    samples = await running.scrape()
    assert value(samples, "catalog_uploads", status="OTHER") == 1.0
    assert value(samples, "catalog_uploads", status="PARTIALLY_DONE") is None
    assert value(samples, "catalog_upload_status", ingestion_id="new", status="UNKNOWN") == 0.0
    events = [json.loads(line) for line in running.logs.getvalue().splitlines()]
    unknown_logs = [e for e in events if e["event"] == "unknown_status_value"]
    assert sorted(e["value"] for e in unknown_logs) == ["PARTIALLY_DONE", "in progress (50%)"]


async def test_invalid_id_is_marked_invalid_and_polled_rarely(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """A 400 invalid-parameter answer makes the upload INVALID and stops frequent polls."""
    sim, url = await start_simulator()
    sim.add_upload("busy", [("INPROGRESS", 0)])
    running = await start_exporter(fast_config(url, ["nosuch", "busy"]))
    await wait_for(running.status_is("nosuch", "INVALID"))
    await wait_for(requests_seen(sim, "busy", 5))
    assert sim.count(ingestion_id="nosuch") == 1
    samples = await running.scrape()
    assert value(samples, "catalog_api_errors_total", kind="invalid_ingestion_id") == 1.0
    assert value(samples, "catalog_uploads", status="INVALID") == 1.0


async def test_poll_lag_shows_when_the_budget_is_too_small(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """With N/interval above the rate limit, catalog_exporter_poll_lag_seconds climbs."""
    sim, url = await start_simulator()
    ids = [f"up-{n}" for n in range(40)]
    for ingestion_id in ids:
        sim.add_upload(ingestion_id, [("INPROGRESS", 0)])
    config = fast_config(url, ids, api={"max_requests_per_second": 10})
    running = await start_exporter(config)

    async def lagging() -> bool:
        lag = value(await running.scrape(), "catalog_exporter_poll_lag_seconds")
        return lag is not None and lag > 1.0  # 40 uploads every 0.2 s need 200/s, not 10/s

    await wait_for(lagging, timeout=15)
