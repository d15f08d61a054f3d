"""Upload lifecycle: registration by every source, state across restarts, durations, labels."""

from __future__ import annotations

import json
from pathlib import Path

from exporter.tracking import Source
from tests.conftest import (
    ExporterFactory,
    SimulatorFactory,
    fast_config,
    requests_seen,
    value,
    wait_for,
)


async def test_registered_ids_survive_a_restart_with_their_state(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory, tmp_path: Path
) -> None:
    """After a restart, runtime-registered ids are back and terminal ones are not re-polled."""
    sim, url = await start_simulator()
    sim.add_upload("api-done", [("DONE", 0)])
    sim.add_upload("api-busy", [("INPROGRESS", 0)])
    state = {"path": str(tmp_path / "state.json"), "debounce_seconds": 0.05}
    config = fast_config(url, ["cfg-1"], state=state)
    sim.add_upload("cfg-1", [("INQUEUE", 0)])
    first = await start_exporter(config)
    for ingestion_id in ("api-done", "api-busy"):
        registration = await first.exporter.tracker.register(ingestion_id, Source.API, durable=True)
        assert registration.accepted and registration.created
    await wait_for(first.status_is("api-done", "DONE"))
    await wait_for(first.status_is("api-busy", "INPROGRESS"))
    done_before = first.exporter.store.get("api-done")
    assert done_before is not None and done_before.terminal_at is not None
    await first.stop()  # a clean stop writes the state a last time
    polls_of_done = sim.count(ingestion_id="api-done")

    second = await start_exporter(config)
    assert await second.status_of("api-done") == "DONE"
    assert await second.status_of("api-busy") == "INPROGRESS"
    await wait_for(requests_seen(sim, "api-busy", sim.count(ingestion_id="api-busy") + 2))
    assert sim.count(ingestion_id="api-done") == polls_of_done
    done_after = second.exporter.store.get("api-done")
    assert done_after is not None
    assert done_after.terminal_at == done_before.terminal_at
    assert done_after.first_seen == done_before.first_seen
    assert done_after.sources == {"api"}


async def test_an_id_dropped_from_the_config_while_stopped_is_gone_after_restart(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory, tmp_path: Path
) -> None:
    """State does not resurrect a config id that the config no longer lists."""
    sim, url = await start_simulator()
    sim.add_upload("keep", [("INPROGRESS", 0)])
    sim.add_upload("drop", [("INPROGRESS", 0)])
    state = {"path": str(tmp_path / "state.json"), "debounce_seconds": 0.05}
    first = await start_exporter(fast_config(url, ["keep", "drop"], state=state))
    await wait_for(first.status_is("drop", "INPROGRESS"))
    await wait_for(first.status_is("keep", "INPROGRESS"))
    await first.stop()
    second = await start_exporter(fast_config(url, ["keep"], state=state))
    assert await second.status_of("drop") is None
    assert await second.status_of("keep") == "INPROGRESS"


async def test_a_corrupt_state_file_is_moved_aside_counted_and_the_config_used(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory, tmp_path: Path
) -> None:
    """An unreadable state file never stops start-up: it is set aside and counted."""
    sim, url = await start_simulator()
    sim.add_upload("cfg-1", [("INPROGRESS", 0)])
    path = tmp_path / "state.json"
    path.write_text('{"version": 1, "uploads": [{"ingestion')
    running = await start_exporter(fast_config(url, ["cfg-1"], state={"path": str(path)}))
    await wait_for(running.status_is("cfg-1", "INPROGRESS"))
    samples = await running.scrape()
    assert value(samples, "catalog_exporter_state_load_errors_total") == 1.0
    assert [p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert '"event": "state_file_unusable"' in running.logs.getvalue()


async def test_durations_are_observed_once_per_upload_by_final_status(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """Queue time and total duration land in their histograms exactly once."""
    sim, url = await start_simulator()
    sim.add_upload("slow", [("INQUEUE", 0.5), ("INPROGRESS", 0.5), ("FATAL", 0)])
    running = await start_exporter(fast_config(url, ["slow"]))
    await wait_for(running.status_is("slow", "FATAL"))
    samples = await running.scrape()
    assert value(samples, "catalog_upload_queue_seconds_count") == 1.0
    queued = value(samples, "catalog_upload_queue_seconds_sum")
    assert queued is not None and 0.3 < queued < 5
    assert value(samples, "catalog_upload_duration_seconds_count", final_status="FATAL") == 1.0
    assert value(samples, "catalog_upload_duration_seconds_count", final_status="DONE") == 0.0
    total = value(samples, "catalog_upload_duration_seconds_sum", final_status="FATAL")
    assert total is not None and queued < total < 10


async def test_allow_listed_labels_are_attached_and_others_rejected(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """Only label names listed in ingestions.labels reach the upload metrics."""
    sim, url = await start_simulator()
    sim.add_upload("up-1", [("FATAL", 0)])
    config = fast_config(url, [], ingestions={"labels": ["team", "catalog"]})
    running = await start_exporter(config)
    tracker = running.exporter.tracker
    ok = await tracker.register("up-1", Source.API, {"team": "pricing"})
    assert ok.accepted
    refused = await tracker.register("up-2", Source.API, {"owner": "x"})
    assert not refused.accepted and refused.reason == "bad_labels"
    await wait_for(running.status_is("up-1", "FATAL"))
    samples = await running.scrape()
    fatal = value(
        samples,
        "catalog_upload_status",
        ingestion_id="up-1",
        status="FATAL",
        team="pricing",
        catalog="",
    )
    assert fatal == 1.0
    assert value(samples, "catalog_exporter_rejected_ingestions_total", reason="bad_labels") == 1


async def test_hostile_ids_are_rejected_counted_and_never_reach_the_exposition(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """Too long, empty, control characters, not a string: each refused with its reason."""
    _, url = await start_simulator()
    running = await start_exporter(fast_config(url, []))
    tracker = running.exporter.tracker
    for bad, reason in [
        ("x" * 256, "too_long"),
        ("", "empty"),
        ("a\nb", "control_characters"),
        ("tab\there", "control_characters"),
        (42, "not_a_string"),
    ]:
        registration = await tracker.register(bad, Source.API)
        assert (registration.accepted, registration.reason) == (False, reason)
    assert (await tracker.register("x" * 255, Source.API)).accepted
    samples = await running.scrape()
    assert value(samples, "catalog_exporter_rejected_ingestions_total", reason="too_long") == 1
    assert value(samples, "catalog_exporter_rejected_ingestions_total", reason="empty") == 1
    assert (
        value(samples, "catalog_exporter_rejected_ingestions_total", reason="control_characters")
        == 2
    )
    assert value(samples, "catalog_exporter_tracked_ingestions") == 1


async def test_the_cap_on_tracked_ids_rejects_new_ones_with_a_clear_error(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """Past ingestions.max_tracked, a new id is refused; a known one is still accepted."""
    _, url = await start_simulator()
    running = await start_exporter(fast_config(url, ["a", "b"], ingestions={"max_tracked": 2}))
    tracker = running.exporter.tracker
    refused = await tracker.register("c", Source.API)
    assert (refused.accepted, refused.reason) == (False, "cap_reached")
    assert "max_tracked=2" in refused.message
    assert (await tracker.register("a", Source.API)).accepted
    samples = await running.scrape()
    assert value(samples, "catalog_exporter_rejected_ingestions_total", reason="cap_reached") == 1


async def test_a_file_dropped_in_the_directory_is_polled_and_released_when_deleted(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory, tmp_path: Path
) -> None:
    """The app drops a file: the id is polled; deleting it lets it retire after retention."""
    sim, url = await start_simulator()
    sim.add_upload("file-up", [("INPROGRESS", 0.6), ("DONE", 0)])
    drop = tmp_path / "ingestions"
    drop.mkdir()
    config = fast_config(
        url,
        [],
        ingestions={"directory": str(drop), "directory_poll_seconds": 0.1, "labels": ["team"]},
        polling={"terminal_retention_seconds": 1.0},
    )
    running = await start_exporter(config)
    (drop / "upload-1.json").write_text(
        json.dumps({"ingestionId": "file-up", "labels": {"team": "pricing"}})
    )
    await wait_for(running.status_is("file-up", "INPROGRESS"))
    view = running.exporter.tracker.view("file-up")
    assert (
        view is not None and view.sources == ("directory",) and view.labels == {"team": "pricing"}
    )
    (drop / "upload-1.json").unlink()
    await wait_for(running.status_is("file-up", "DONE"))  # still polled to its end
    await wait_for(running.status_is("file-up", None), timeout=5)


async def test_a_shard_tracks_only_the_ids_it_owns_and_refuses_misdirected_registrations(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """With sharding.total 3, each replica polls its own third; the API names the owner."""
    from exporter.sharding import shard_of

    _, url = await start_simulator()
    ids = [f"id-{n}" for n in range(30)]
    owned = [i for i in ids if shard_of(i, 3) == 1]
    foreign = next(i for i in ids if shard_of(i, 3) != 1)
    config = fast_config(url, ids, sharding={"total": 3, "index": 1})
    running = await start_exporter(config)
    assert {upload.ingestion_id for upload in running.exporter.store} == set(owned)
    refused = await running.exporter.tracker.register(foreign, Source.API)
    assert (refused.accepted, refused.reason) == (False, "not_owned")
    assert f"owned by shard {shard_of(foreign, 3)} of 3" in refused.message


async def test_done_uploads_can_retire_sooner_than_failed_ones(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """With done_retention_seconds shorter, DONE series go first and FATAL stays."""
    sim, url = await start_simulator()
    sim.add_upload("ok", [("DONE", 0)])
    sim.add_upload("bad", [("FATAL", 0)])
    config = fast_config(
        url,
        ["ok", "bad"],
        polling={"terminal_retention_seconds": 60, "done_retention_seconds": 0.3},
    )
    running = await start_exporter(config)
    await wait_for(running.status_is("bad", "FATAL"))
    await wait_for(running.status_is("ok", None), timeout=5)
    assert await running.status_of("bad") == "FATAL"
    samples = await running.scrape()
    assert value(samples, "catalog_uploads", status="DONE") == 0
    assert value(samples, "catalog_uploads", status="FATAL") == 1


async def test_active_only_mode_exposes_one_status_series_per_upload(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """metrics.status_series: active keeps only the series valued 1; aggregates stay exact."""
    sim, url = await start_simulator()
    sim.add_upload("a", [("INPROGRESS", 0)])
    sim.add_upload("b", [("DONE", 0)])
    running = await start_exporter(
        fast_config(url, ["a", "b"], metrics={"status_series": "active"})
    )
    await wait_for(running.status_is("b", "DONE"))
    await wait_for(running.status_is("a", "INPROGRESS"))
    samples = await running.scrape()
    status = [(labels, v) for (n, labels), v in samples.items() if n == "catalog_upload_status"]
    assert len(status) == 2
    assert all(v == 1.0 for _, v in status)
    assert value(samples, "catalog_uploads", status="DONE") == 1
    assert value(samples, "catalog_uploads", status="INQUEUE") == 0
