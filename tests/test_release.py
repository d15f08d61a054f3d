"""Released ids that wait for no status go at once; those with a real status keep retention."""

from __future__ import annotations

from pathlib import Path

from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from exporter.admin import create_admin_app
from exporter.models import ErrorKind, PollError, Status, StatusReport
from exporter.tracking import IngestionTracker, Source
from exporter.uploads import UploadStore
from tests.conftest import ExporterFactory, SimulatorFactory, fast_config, wait_for


def tracker_with(store: UploadStore, removed: list[str]) -> IngestionTracker:
    return IngestionTracker(
        store,
        max_tracked=100,
        label_names=(),
        on_added=lambda ids: None,
        on_removed=removed.extend,
        on_rejected=lambda reason: None,
    )


async def test_a_released_id_never_polled_successfully_is_removed_at_once() -> None:
    """UNKNOWN with no successful poll: nothing to wait for, so the release removes it."""
    store = UploadStore()
    removed: list[str] = []
    tracker = tracker_with(store, removed)
    await tracker.register("fresh", Source.DIRECTORY)
    assert await tracker.release("fresh", Source.DIRECTORY, immediate=False)
    assert "fresh" not in store
    assert removed == ["fresh"]


async def test_a_released_invalid_or_unknown_id_is_removed_at_once() -> None:
    """INVALID (the API refused the id) and UNKNOWN (a value it never explained) go at once."""
    store = UploadStore()
    removed: list[str] = []
    tracker = tracker_with(store, removed)
    for ingestion_id in ("invalid", "unknown"):
        await tracker.register(ingestion_id, Source.DIRECTORY)
    store.record_report("unknown", StatusReport(Status.UNKNOWN.value, False, "WEIRD", known=False))
    store.record_error("invalid", PollError(ErrorKind.INVALID_INGESTION_ID))
    for ingestion_id in ("invalid", "unknown"):
        await tracker.release(ingestion_id, Source.DIRECTORY, immediate=False)
    assert len(store) == 0
    assert removed == ["invalid", "unknown"]


async def test_a_released_id_with_a_real_status_keeps_its_retention() -> None:
    """INPROGRESS (a FATAL may still come) and DONE (retention) stay tracked once released."""
    store = UploadStore()
    removed: list[str] = []
    tracker = tracker_with(store, removed)
    for ingestion_id, status in (("running", Status.INPROGRESS), ("done", Status.DONE)):
        await tracker.register(ingestion_id, Source.DIRECTORY)
        store.record_report(ingestion_id, StatusReport(status.value, False, status.value))
        await tracker.release(ingestion_id, Source.DIRECTORY, immediate=False)
    assert {u.ingestion_id for u in store if u.released} == {"running", "done"}
    assert removed == []


async def test_a_released_id_that_turns_invalid_is_removed() -> None:
    """Kept for a terminal status, it goes once the API says the id is invalid."""
    store = UploadStore()
    tracker = tracker_with(store, [])
    await tracker.register("queued", Source.DIRECTORY)
    store.record_report("queued", StatusReport(Status.INQUEUE.value, False, "INQUEUE"))
    await tracker.release("queued", Source.DIRECTORY, immediate=False)
    assert "queued" in store
    store.record_error("queued", PollError(ErrorKind.INVALID_INGESTION_ID))
    assert "queued" not in store


async def test_deleting_the_file_of_an_invalid_id_removes_its_series_and_delete_is_not_409(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory, tmp_path: Path
) -> None:
    """The running exporter drops an INVALID id with its file; the admin API no longer 409s."""
    _, url = await start_simulator()  # knows no upload: every id is invalid
    drop = tmp_path / "ingestions"
    drop.mkdir()
    config = fast_config(
        url,
        [],
        ingestions={"directory": str(drop), "directory_poll_seconds": 0.05},
        polling={"terminal_retention_seconds": 3600},
    )
    running = await start_exporter(config)
    (drop / "typo").write_text("amzn1.ingestion.typo")
    await wait_for(running.status_is("amzn1.ingestion.typo", "INVALID"))
    (drop / "typo").unlink()
    await wait_for(running.status_is("amzn1.ingestion.typo", None), timeout=3)
    assert running.exporter.tracker.view("amzn1.ingestion.typo") is None

    server = TestServer(create_admin_app(running.exporter.tracker), host="127.0.0.1")
    await server.start_server()
    try:
        async with (
            ClientSession() as session,
            session.delete(server.make_url("/api/v1/ingestions/amzn1.ingestion.typo")) as answer,
        ):
            assert answer.status != 409
            assert answer.status == 404
    finally:
        await server.close()


async def test_a_released_upload_the_api_later_calls_invalid_disappears(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory, tmp_path: Path
) -> None:
    """Released while INQUEUE, then forgotten by the API: removed, not polled forever."""
    sim, url = await start_simulator()
    sim.add_upload("amzn1.ingestion.late", [("INQUEUE", 0)])
    drop = tmp_path / "ingestions"
    drop.mkdir()
    config = fast_config(
        url,
        [],
        ingestions={"directory": str(drop), "directory_poll_seconds": 0.05},
        polling={"terminal_retention_seconds": 3600},
    )
    running = await start_exporter(config)
    (drop / "late").write_text("amzn1.ingestion.late")
    await wait_for(running.status_is("amzn1.ingestion.late", "INQUEUE"))
    (drop / "late").unlink()

    async def released() -> bool:
        view = running.exporter.tracker.view("amzn1.ingestion.late")
        return view is not None and view.sources == ()

    await wait_for(released)
    sim.remove_upload("amzn1.ingestion.late")
    await wait_for(running.status_is("amzn1.ingestion.late", None), timeout=3)
