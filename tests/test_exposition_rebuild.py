"""Re-rendering every upload (a reload changing labels or status series) happens off the scrapes.

Until the rebuild swaps in, `/metrics` serves the body of the previous settings; no scrape
renders every upload. The rebuild is driven step by step here (`rebuild_step`), or through a
running exporter whose rebuild pauses on a gate the test opens.
"""

from __future__ import annotations

import asyncio
import gzip
import threading

import pytest
from prometheus_client import CollectorRegistry

from exporter import exposition as exposition_module
from exporter.exposition import FAMILIES, REBUILD_SLICE, UploadExposition
from exporter.models import StatusReport
from exporter.tracking import Source
from exporter.uploads import UploadStore
from tests.conftest import ExporterFactory, SimulatorFactory, fast_config, wait_for
from tests.scrape_body import scrape_body
from tests.test_exposition_cache import expected_samples, rendered_samples

REGISTRY = CollectorRegistry()
PER_UPLOAD = tuple(f"{name}{{" for name, _ in FAMILIES)
SLICE = 100


def extra_label_sets(body: bytes) -> set[frozenset[str]]:
    """The label names other than ingestion_id and status on the per-upload series (a line
    scan: label values here hold no quotes or commas)."""
    found = set()
    for line in body.decode().splitlines():
        if line.startswith(PER_UPLOAD):
            labels = line[line.index("{") + 1 : line.rindex("}")].split(",")
            found.add(frozenset(pair.split("=")[0] for pair in labels))
    return {names - {"ingestion_id", "status"} for names in found}


def store_of(n: int) -> UploadStore:
    store = UploadStore(clock=lambda: 1_700_000_000.0)
    for i in range(n):
        store.add(f"u{i:05d}", "api", {"team": "a", "catalog": "c"})
    return store


def test_scrapes_keep_the_old_labels_until_the_rebuild_swaps_in() -> None:
    """A label change shows in scrapes only once the rebuild is done, never half-applied."""
    store = store_of(3 * SLICE)
    settings: dict[str, tuple[str, ...]] = {"names": ("team",)}
    exposition = UploadExposition(
        store, label_names=lambda: settings["names"], active_status_only=lambda: False
    )
    before = b"".join(exposition.chunks(REGISTRY, openmetrics=False))
    assert extra_label_sets(before) == {frozenset({"team"})}
    settings["names"] = ("team", "catalog")
    assert b"".join(exposition.chunks(REGISTRY, openmetrics=False)) == before
    steps = 0
    while not exposition.rebuild_step(SLICE):
        steps += 1
        assert b"".join(exposition.chunks(REGISTRY, openmetrics=False)) == before
        assert exposition.rebuilds == 0
    assert steps >= 3  # it came in slices
    after = b"".join(exposition.chunks(REGISTRY, openmetrics=False))
    assert extra_label_sets(after) == {frozenset({"team", "catalog"})}
    assert rendered_samples(after, openmetrics=False) == expected_samples(
        store, ("team", "catalog"), active_only=False
    )
    assert exposition.rebuilds == 1


def test_changes_during_a_rebuild_all_show_after_the_swap() -> None:
    """Adds, removals, status changes and a second settings change mid-rebuild are kept."""
    store = store_of(2 * SLICE)
    settings: dict[str, object] = {"names": ("team",), "active": False}
    exposition = UploadExposition(
        store,
        label_names=lambda: settings["names"],  # type: ignore[arg-type,return-value]
        active_status_only=lambda: settings["active"],  # type: ignore[arg-type,return-value]
    )
    settings["names"] = ("catalog",)
    assert exposition.check_settings()
    assert not exposition.rebuild_step(SLICE)  # the first slice is placed
    store.record_report("u00003", StatusReport("DONE", True, "DONE"))  # already placed
    store.record_report("u00190", StatusReport("FATAL", False, "FATAL"))  # not yet placed
    store.remove("u00004")
    store.remove("u00191")
    store.add("late-1", "api", {"catalog": "x"})
    assert not exposition.rebuild_step(SLICE)
    settings["active"] = True  # a second reload: the rebuild starts over with both
    assert exposition.check_settings()
    store.add("late-2", "api", {"catalog": "y"})
    while not exposition.rebuild_step(SLICE):
        store.record_report("u00010", StatusReport("INPROGRESS", False, "INPROGRESS"))
    body = b"".join(exposition.chunks(REGISTRY, openmetrics=False))
    assert rendered_samples(body, openmetrics=False) == expected_samples(
        store, ("catalog",), active_only=True
    )
    assert exposition.rebuilds == 1
    # And the new blocks keep taking changes afterwards.
    store.record_report("u00011", StatusReport("DONE", False, "DONE"))
    store.remove("late-1")
    body = b"".join(exposition.chunks(REGISTRY, openmetrics=False))
    assert rendered_samples(body, openmetrics=False) == expected_samples(
        store, ("catalog",), active_only=True
    )


async def test_a_label_changing_reload_is_served_old_until_the_background_rebuild_is_done(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """Over HTTP: after the reload, scrapes show the old labels while the rebuild is held,
    no scrape rebuilds, and the new labels appear once it is let go."""
    _, url = await start_simulator()
    gate, held = asyncio.Event(), asyncio.Event()

    async def pause() -> None:
        held.set()
        await gate.wait()

    config = fast_config(
        url, [], ingestions={"labels": ["team"]}, polling={"interval_seconds": 300}
    )
    running = await start_exporter(config, rebuild_pause=pause)
    exporter = running.exporter
    for i in range(2 * REBUILD_SLICE + 10):
        registered = await exporter.tracker.register(f"up-{i}", Source.API, {"team": "t"})
        assert registered.accepted
    status, _, before = await running.get("/metrics", **{"Accept-Encoding": "identity"})
    assert status == 200 and extra_label_sets(before) == {frozenset({"team"})}

    exporter.apply(
        config.model_copy(
            update={
                "ingestions": config.ingestions.model_copy(update={"labels": ("team", "catalog")})
            }
        )
    )
    await asyncio.wait_for(held.wait(), 10)
    for encoding in ("identity", "gzip", "identity"):
        status, _, body = await running.get("/metrics", **{"Accept-Encoding": encoding})
        assert status == 200
        if encoding == "identity":
            assert extra_label_sets(body) == {frozenset({"team"})}
    assert exporter.exposition.rebuilds == 0

    gate.set()

    async def swapped() -> bool:
        return exporter.exposition.rebuilds == 1

    await wait_for(swapped)
    _, _, after = await running.get("/metrics", **{"Accept-Encoding": "identity"})
    assert extra_label_sets(after) == {frozenset({"team", "catalog"})}
    assert len(rendered_samples(after, openmetrics=False)) == len(
        rendered_samples(before, openmetrics=False)
    )


async def test_a_gzip_scrape_compresses_what_is_not_compressed_yet_in_a_worker_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a mass change every block needs compressing: done off the event loop's thread,
    cached for the next scrape, and the body is the identity body gzipped."""
    store = store_of(600)
    exposition = UploadExposition(store, label_names=lambda: ("team",), active_status_only=bool)
    threads: list[int] = []
    deflate = exposition_module._deflate

    def spy(data: bytes) -> bytes:
        threads.append(threading.get_ident())
        return deflate(data)

    monkeypatch.setattr(exposition_module, "_deflate", spy)
    pieces = await exposition.gzip_chunks_off_loop(REGISTRY, openmetrics=False)
    assert len(threads) > 4 * 2  # the registry's head and every block's four families
    assert threading.get_ident() not in threads
    assert gzip.decompress(b"".join(pieces)) == scrape_body(exposition, REGISTRY, openmetrics=False)

    threads.clear()
    store.record_report("u00007", StatusReport("DONE", True, "DONE"))
    pieces = await exposition.gzip_chunks_off_loop(REGISTRY, openmetrics=True)
    assert 1 < len(threads) <= 1 + 4  # the head, and the changed block's changed families
    assert gzip.decompress(b"".join(pieces)) == scrape_body(exposition, REGISTRY, openmetrics=True)
