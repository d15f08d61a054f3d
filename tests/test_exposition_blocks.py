"""The per-upload lines kept in blocks: each scrape equals a from-scratch render, byte for byte.

`UploadExposition` keeps the lines of consecutive uploads joined per block and family and
splices changes in; these tests compare every scrape with the body a fresh store and
exposition render from the same uploads, and pin the pieces a server may stream and the
precompressed gzip body. Small blocks (monkeypatched) make a few dozen uploads span many.
"""

from __future__ import annotations

import dataclasses
import gzip
import random
import zlib

import pytest
from prometheus_client import CollectorRegistry

from exporter import exposition as exposition_module
from exporter.exposition import FAMILIES, UploadExposition
from exporter.models import ErrorKind, PollError, StatusReport
from exporter.uploads import UploadStore
from tests.scrape_body import gzip_scrape_body, scrape_body

REGISTRY = CollectorRegistry()


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> int:
    """Blocks of 8 uploads, refreshed eagerly at 2 pending lines."""
    monkeypatch.setattr(exposition_module, "BLOCK_SIZE", 8)
    monkeypatch.setattr(exposition_module, "_EAGER", 2)
    return 8


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 0.25
        return self.now


def new_exposition(
    store: UploadStore, names: tuple[str, ...] = (), active: bool = False
) -> UploadExposition:
    return UploadExposition(store, label_names=lambda: names, active_status_only=lambda: active)


def from_scratch(
    store: UploadStore, *, openmetrics: bool = False, names: tuple[str, ...] = ()
) -> bytes:
    """The body a fresh store and exposition render from copies of the same uploads."""
    fresh = UploadStore()
    for upload in store:
        fresh.restore(dataclasses.replace(upload, r_block=None, r_index=0))
    return scrape_body(new_exposition(fresh, names), REGISTRY, openmetrics=openmetrics)


def filled(n: int, clock: Clock) -> UploadStore:
    store = UploadStore(clock=clock)
    for i in range(n):
        store.add(f"u{i:04d}", "config", {})
    return store


def lines_of(body: bytes, ingestion_id: str) -> list[str]:
    return [line for line in body.decode().splitlines() if f'ingestion_id="{ingestion_id}"' in line]


def test_a_poll_changing_one_upload_shows_in_the_next_scrape(small_blocks: int) -> None:
    clock = Clock()
    store = filled(50, clock)
    exposition = new_exposition(store)
    before = scrape_body(exposition, REGISTRY, openmetrics=False)
    store.record_report("u0021", StatusReport("DONE", True, "DONE"))
    after = scrape_body(exposition, REGISTRY, openmetrics=False)
    assert after != before
    changed = lines_of(after, "u0021")
    assert 'catalog_upload_status{ingestion_id="u0021",status="DONE"} 1.0' in changed
    assert 'catalog_upload_report_available{ingestion_id="u0021"} 1.0' in changed
    assert any(line.startswith("catalog_upload_last_success_timestamp") for line in changed)
    assert lines_of(after, "u0020") == lines_of(before, "u0020")
    assert after == from_scratch(store)


def test_a_last_success_refresh_changes_only_that_line(small_blocks: int) -> None:
    clock = Clock()
    store = filled(30, clock)
    store.record_report("u0005", StatusReport("INPROGRESS", False, "INPROGRESS"))
    exposition = new_exposition(store)
    before = lines_of(scrape_body(exposition, REGISTRY, openmetrics=False), "u0005")
    store.record_report("u0005", StatusReport("INPROGRESS", False, "INPROGRESS"))
    after = lines_of(scrape_body(exposition, REGISTRY, openmetrics=False), "u0005")
    differing = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert len(differing) == 1
    assert differing[0][1].startswith("catalog_upload_last_success_timestamp_seconds{")


def test_removing_an_upload_removes_its_lines(small_blocks: int) -> None:
    clock = Clock()
    store = filled(40, clock)
    exposition = new_exposition(store)
    assert lines_of(scrape_body(exposition, REGISTRY, openmetrics=False), "u0013")
    store.remove("u0013")
    store.retire("u0014")
    body = scrape_body(exposition, REGISTRY, openmetrics=False)
    assert lines_of(body, "u0013") == [] and lines_of(body, "u0014") == []
    assert lines_of(body, "u0012") and lines_of(body, "u0015")
    assert body == from_scratch(store)


def test_removed_uploads_are_let_go_even_if_nobody_scrapes(small_blocks: int) -> None:
    """Churn with no scrape (Prometheus down) keeps at most a few removed uploads held."""
    clock = Clock()
    store = filled(16, clock)
    exposition = new_exposition(store)
    scrape_body(exposition, REGISTRY, openmetrics=False)
    for i in range(16, 400):
        store.add(f"u{i:04d}", "api", {})
        store.remove(f"u{i - 16:04d}")
    held = sum(len(block.order) for block in exposition._live.blocks)
    assert held <= len(store) + 2 * len(exposition._live.blocks)
    assert scrape_body(exposition, REGISTRY, openmetrics=False) == from_scratch(store)


def test_families_stay_grouped_under_their_headers(small_blocks: int) -> None:
    clock = Clock()
    store = filled(45, clock)
    exposition = new_exposition(store)
    for i in range(0, 45, 3):
        store.record_report(f"u{i:04d}", StatusReport("INPROGRESS", i % 2 == 0, "x"))
    store.remove("u0007")
    store.add("late", "api", {})
    body = scrape_body(exposition, REGISTRY, openmetrics=True).decode()
    order = [name for name, _ in FAMILIES]
    seen: list[str] = []
    for line in body.splitlines():
        if line.startswith("# TYPE catalog_upload_"):
            seen.append(line.split()[2])
        elif line.startswith("catalog_upload_") and "{ingestion_id" in line:
            family = line.split("{", 1)[0]
            assert family == seen[-1], line  # under its own family's header
    assert seen == order
    assert body.endswith("# EOF\n")


def test_readding_a_removed_upload_before_a_scrape_shows_it_once_at_the_end(
    small_blocks: int,
) -> None:
    clock = Clock()
    store = filled(20, clock)
    exposition = new_exposition(store)
    scrape_body(exposition, REGISTRY, openmetrics=False)
    upload = store.get("u0003")
    assert upload is not None
    store.remove("u0003")
    store.restore(upload)  # the same object back, as from the state file
    body = scrape_body(exposition, REGISTRY, openmetrics=False)
    status_ids = [
        line.split('"')[1]
        for line in body.decode().splitlines()
        if line.startswith("catalog_upload_status{")
    ]
    assert status_ids.count("u0003") == 7
    assert status_ids[-7:] == ["u0003"] * 7
    assert body == from_scratch(store)


def test_many_adds_and_removes_keep_the_output_equal_to_a_from_scratch_render(
    small_blocks: int,
) -> None:
    rng = random.Random(11)
    clock = Clock()
    store = filled(60, clock)
    settings = {"names": (), "active": False}
    exposition = UploadExposition(
        store, label_names=lambda: settings["names"], active_status_only=lambda: settings["active"]
    )
    next_id = 60
    for step in range(300):
        ids = [upload.ingestion_id for upload in store]
        action = rng.randrange(10)
        if action < 3 and ids:
            store.remove(rng.choice(ids))
        elif action < 5:
            store.add(f"u{next_id:04d}", "api", {"team": rng.choice("ab")})
            next_id += 1
        elif action < 8 and ids:
            status = rng.choice(["INPROGRESS", "DONE", "FATAL", "ODD (1%)"])
            store.record_report(rng.choice(ids), StatusReport(status, rng.random() < 0.3, status))
        elif action == 8 and ids:
            store.record_error(rng.choice(ids), PollError(ErrorKind.INVALID_INGESTION_ID))
        elif step % 60 == 0:
            settings["names"] = () if settings["names"] else ("team",)
        if step % 7 == 0:
            openmetrics = step % 2 == 0
            body = scrape_body(exposition, REGISTRY, openmetrics=openmetrics)
            assert body == from_scratch(store, openmetrics=openmetrics, names=settings["names"]), (
                step
            )


def test_sparse_blocks_are_merged_so_the_pieces_stay_few(small_blocks: int) -> None:
    clock = Clock()
    store = filled(400, clock)
    exposition = new_exposition(store)
    assert len(exposition.chunks(REGISTRY, openmetrics=False)) == 1 + 4 * (1 + 400 // small_blocks)
    for i in range(400):
        if i % 10:
            store.remove(f"u{i:04d}")
    pieces = exposition.chunks(REGISTRY, openmetrics=False)
    # 40 uploads left: merged into blocks of at least half a block, not 50 blocks of one.
    assert len(pieces) <= 1 + 4 * (1 + 40 // (small_blocks // 2) + 1)
    assert b"".join(pieces) == from_scratch(store)


@pytest.mark.parametrize("openmetrics", [False, True])
async def test_gzip_chunks_are_one_gzip_member_of_the_body(
    small_blocks: int, openmetrics: bool
) -> None:
    clock = Clock()
    store = filled(50, clock)
    exposition = new_exposition(store)
    for round_ in range(3):
        for i in range(round_, 50, 4):
            store.record_report(f"u{i:04d}", StatusReport("INPROGRESS", False, "INPROGRESS"))
        store.remove(f"u{round_:04d}")
        compressed = await gzip_scrape_body(exposition, REGISTRY, openmetrics=openmetrics)
        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
        plain = decompressor.decompress(compressed)
        # One member, read to its end by a decoder that does not handle concatenated ones.
        assert decompressor.eof and decompressor.unused_data == b""
        assert plain == gzip.decompress(compressed)
        assert plain == scrape_body(exposition, REGISTRY, openmetrics=openmetrics)


async def test_an_empty_store_renders_headers_only_and_valid_gzip() -> None:
    exposition = new_exposition(UploadStore())
    body = scrape_body(exposition, REGISTRY, openmetrics=False)
    assert body.count(b"# TYPE catalog_upload_") == 4
    assert gzip.decompress(await gzip_scrape_body(exposition, REGISTRY)) == body


async def test_precompressing_leaves_the_first_gzip_scrape_only_the_registry_to_compress(
    small_blocks: int,
) -> None:
    """After a start, `precompress` deflates every block in a worker thread: the first gzip
    scrape then compresses only the registry's own metrics, and its body is still the body."""
    clock = Clock()
    store = filled(50, clock)
    exposition = new_exposition(store)
    before = exposition._gzip_job(False, exposition.chunks(REGISTRY, openmetrics=False))
    await exposition.precompress()
    after = exposition._gzip_job(False, exposition.chunks(REGISTRY, openmetrics=False))
    assert len(before.todo) > 4 * (50 // small_blocks)
    assert [block for _, block, _, _ in after.todo] == [None]  # the registry's head only
    compressed = await gzip_scrape_body(exposition, REGISTRY)
    assert gzip.decompress(compressed) == scrape_body(exposition, REGISTRY, openmetrics=False)
