"""Spool mode of the watched directory: files consumed once their ids are durable."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs
from structlog.typing import EventDict

from exporter.config import ConfigError, parse_config
from exporter.discovery import RETRY_SECONDS, Deleted, DirectoryWatcher, FileProblem
from exporter.metrics import DirectoryMetrics
from exporter.models import RejectReason
from exporter.state import open_store
from exporter.state_writer import StateWriter, UnavailableState, open_state
from exporter.tracking import IngestionTracker, Source
from exporter.uploads import UploadStore
from tests.conftest import (
    Samples,
    SimulatorFactory,
    free_port,
    launch_exporter,
    parse_exposition,
    value,
    wait_for,
)


@dataclass
class Spool:
    """A real tracker persisting to a real state database, and a spool-mode watcher."""

    directory: Path
    state_path: Path
    store: UploadStore
    tracker: IngestionTracker
    watcher: DirectoryWatcher
    metrics: DirectoryMetrics
    now: list[float]
    rejected: list[RejectReason]

    def counted(self, problem: FileProblem) -> float:
        """How often the file-errors counter counted `problem`."""
        return self.metrics.file_errors.labels(problem.value)._value.get()

    def deleted(self, reason: Deleted) -> float:
        """How many files were deleted for `reason`."""
        return self.metrics.files_deleted.labels(reason.value)._value.get()

    def on_disk(self) -> dict[str, tuple[str, ...]]:
        """The rows the state database holds now: id -> sources (read by a fresh store)."""
        store, result = open_store(self.state_path)
        assert store is not None
        store.close()
        return {r.ingestion_id: r.sources for r in result.snapshot.uploads}


def put(path: Path, content: str = "") -> Path:
    """Write a registration file (empty: the name is the id)."""
    path.write_text(content)
    return path


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    """A spool over tmp_path/ingestions with a cap of 5 ids and a clock the test moves."""
    directory = tmp_path / "ingestions"
    directory.mkdir()
    store = UploadStore()
    rejected: list[RejectReason] = []
    tracker = IngestionTracker(
        store,
        max_tracked=5,
        label_names=("team",),
        on_added=lambda ids: None,
        on_removed=lambda ids: None,
        on_rejected=rejected.append,
    )
    writer, _ = await open_state(
        tmp_path / "state.db", record=tracker.record, retired_at=tracker.retired_at
    )
    assert writer is not None
    tracker.attach_state(writer)
    task = asyncio.create_task(writer.run())
    now = [0.0]
    metrics = DirectoryMetrics(CollectorRegistry(), FileProblem, Deleted)
    watcher = DirectoryWatcher(
        directory, tracker, metrics=metrics, consume=True, monotonic=lambda: now[0]
    )
    yield Spool(directory, tmp_path / "state.db", store, tracker, watcher, metrics, now, rejected)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.fixture
def logs() -> Iterator[list[EventDict]]:
    """What the code under test logged."""
    with capture_logs() as captured:
        yield captured


async def test_a_consumed_file_is_deleted_once_its_id_is_in_the_state_database(
    spool: Spool,
) -> None:
    """The id is committed (a fresh reader sees it, held by directory) and the file is gone."""
    put(spool.directory / "one", json.dumps({"ingestionId": "id-1", "labels": {"team": "a"}}))
    put(spool.directory / "id-2")
    await spool.watcher.scan()
    assert list(spool.directory.iterdir()) == []
    assert spool.on_disk() == {"id-1": ("directory",), "id-2": ("directory",)}
    assert spool.deleted(Deleted.REGISTERED) == 2


async def test_the_delete_releases_nothing_and_neither_does_a_new_watcher(spool: Spool) -> None:
    """Later scans, and a restarted watcher's first scan, leave consumed ids tracked."""
    put(spool.directory / "id-1")
    await spool.watcher.scan()
    await spool.watcher.scan()
    restarted = DirectoryWatcher(spool.directory, spool.tracker, consume=True)
    await restarted.scan()
    assert spool.tracker.holds("id-1", Source.DIRECTORY)


async def test_watch_mode_after_spool_releases_consumed_ids_only_once_terminal(
    spool: Spool,
) -> None:
    """Switching back to watch mode: consumed ids are released (not removed while a FATAL
    may still come), as if their files had been deleted."""
    put(spool.directory / "id-1")
    await spool.watcher.scan()
    upload = spool.store.get("id-1")
    assert upload is not None
    upload.last_success = 1.0  # the API gave it a status: a terminal one may still come
    upload.status = "PROCESSING"
    await DirectoryWatcher(spool.directory, spool.tracker).scan()
    assert "id-1" in spool.store and not spool.tracker.holds("id-1", Source.DIRECTORY)


async def test_a_refused_id_is_counted_logged_once_and_deleted(
    spool: Spool, logs: list[EventDict]
) -> None:
    """An id that can never be tracked (control characters, a label not allowed) goes."""
    put(spool.directory / "bad-id", "id\x07bell")
    put(spool.directory / "bad-label", json.dumps({"ingestionId": "x", "labels": {"nope": "1"}}))
    await spool.watcher.scan()
    assert list(spool.directory.iterdir()) == []
    assert spool.rejected == [RejectReason.CONTROL_CHARACTERS, RejectReason.BAD_LABELS]
    assert spool.deleted(Deleted.REFUSED) == 2
    assert len([e for e in logs if e["event"] == "ingestion_file_discarded"]) == 2
    assert "x" not in spool.store


async def test_a_file_naming_no_id_is_counted_and_deleted(spool: Spool) -> None:
    """Bad JSON can never be tracked: counted by reason, then deleted."""
    put(spool.directory / "broken", "{not json")
    await spool.watcher.scan()
    assert list(spool.directory.iterdir()) == []
    assert spool.counted(FileProblem.BAD_JSON) == 1
    assert spool.deleted(Deleted.UNUSABLE) == 1


async def test_files_over_the_cap_are_kept_and_retried_after_the_pause(
    spool: Spool, logs: list[EventDict]
) -> None:
    """cap_reached keeps the file; nothing is tried again for RETRY_SECONDS; then, with room,
    the file is consumed."""
    for n in range(7):
        put(spool.directory / f"id-{n}")
    await spool.watcher.scan()
    left = sorted(p.name for p in spool.directory.iterdir())
    assert left == ["id-5", "id-6"]
    assert spool.counted(FileProblem.CAP_REACHED) == 2  # each file kept, each try
    await spool.watcher.scan()  # paused: no registration tried, nothing counted or logged
    assert spool.rejected == [RejectReason.CAP_REACHED] * 2
    assert len([e for e in logs if e["event"] == "ingestion_file_kept"]) == 1
    await spool.tracker.release("id-0", Source.DIRECTORY, immediate=True)
    await spool.tracker.release("id-1", Source.DIRECTORY, immediate=True)
    spool.now[0] += RETRY_SECONDS
    await spool.watcher.scan()
    assert list(spool.directory.iterdir()) == []
    assert spool.tracker.holds("id-6", Source.DIRECTORY)


async def test_a_registration_that_cannot_be_made_durable_keeps_its_file(
    tmp_path: Path,
) -> None:
    """With the state unavailable, the file stays (counted not_durable) and the id is not
    tracked: the registration was rolled back."""
    store = UploadStore()
    tracker = IngestionTracker(
        store,
        max_tracked=5,
        label_names=(),
        on_added=lambda ids: None,
        on_removed=lambda ids: None,
        on_rejected=lambda reason: None,
        state=UnavailableState(tmp_path / "state.db", "a directory"),
    )
    metrics = DirectoryMetrics(CollectorRegistry(), FileProblem, Deleted)
    put(tmp_path / "id-1")
    await DirectoryWatcher(tmp_path, tracker, metrics=metrics, consume=True).scan()
    assert (tmp_path / "id-1").exists()
    assert "id-1" not in store
    assert metrics.file_errors.labels(FileProblem.NOT_DURABLE.value)._value.get() == 1


async def test_a_failed_commit_keeps_the_file_for_a_later_try(spool: Spool, tmp_path: Path) -> None:
    """The commit itself fails (the database file's directory turned read-only to SQLite):
    the file stays until a commit succeeds."""
    writer = spool.tracker._state
    assert isinstance(writer, StateWriter)
    put(spool.directory / "id-1")
    store = writer._store
    apply = store.apply

    def fail(*args: object) -> None:
        msg = "disk I/O error"
        raise OSError(msg)

    store.apply = fail  # type: ignore[method-assign]
    await spool.watcher.scan()
    assert (spool.directory / "id-1").exists()
    assert spool.counted(FileProblem.NOT_DURABLE) == 1
    store.apply = apply  # type: ignore[method-assign]
    spool.now[0] += RETRY_SECONDS
    await spool.watcher.scan()
    assert not (spool.directory / "id-1").exists()
    assert spool.on_disk() == {"id-1": ("directory",)}


async def test_the_gauges_count_every_file_and_its_allocated_blocks(spool: Spool) -> None:
    """Hidden files count too; bytes are allocated blocks, not sizes."""
    spool.watcher._consuming = False  # watch mode's scan sums the same way: nothing deleted
    spool.watcher._reconciled = True
    for n in range(3):
        put(spool.directory / f"id-{n}", "x")
    put(spool.directory / ".tmp-writing", "y" * 10_000)
    (spool.directory / "sub").mkdir()
    await spool.watcher.scan()
    expected = sum(p.lstat().st_blocks * 512 for p in spool.directory.iterdir() if p.is_file())
    assert spool.metrics.files._value.get() == 4
    assert spool.metrics.allocated_bytes._value.get() == expected
    assert expected > 3 + 10_000  # one block at least per file


def test_spool_mode_without_state_path_is_a_config_error_naming_the_key() -> None:
    """A consumed file's id lives only in the state: no state, no spool."""
    document = {
        "api": {"base_url": "https://catalog.example", "auth": {"type": "none"}},
        "ingestions": {"directory": "/var/run/catalog-ingestions", "directory_mode": "spool"},
    }
    with pytest.raises(ConfigError, match=r"ingestions\.directory_mode: spool needs state\.path"):
        parse_config(document)


# -- against the running exporter ---------------------------------------------------------------

#: The sidecar component's sizeLimit of the ingestions emptyDir (deploy/components/sidecar).
SIDECAR_SIZE_LIMIT = 16 * 1024 * 1024


def _usage(directory: Path) -> tuple[int, int]:
    """Entries in `directory` and their allocated bytes, as the kubelet counts them."""
    files = allocated = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            try:
                allocated += entry.stat(follow_symlinks=False).st_blocks * 512
            except FileNotFoundError:  # consumed since listed
                continue
            files += 1
    return files, allocated


def _write(directory: Path, count: int, rate: float, stop: threading.Event) -> float:
    """Write `count` files as the app would (a dot-name renamed into place), in batches of a
    tenth of a second at `rate` per second; the seconds taken."""
    per_batch = round(rate / 10)
    started = time.monotonic()
    for first in range(0, count, per_batch):
        for n in range(first, min(count, first + per_batch)):
            document = {"ingestionId": f"amzn1.ingestion.{n:06d}", "labels": {"team": "t"}}
            temporary = directory / f".tmp-{n:06d}"
            temporary.write_text(json.dumps(document))
            temporary.rename(directory / f"upload-{n:06d}")
        ahead = started + (first + per_batch) / rate - time.monotonic()
        if ahead > 0 and stop.wait(ahead):
            break
    return time.monotonic() - started


def _stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    """SIGTERM the exporter; it must exit 0 without a traceback."""
    proc.terminate()
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = None
    text = log.read_text()
    assert code == 0, f"the exporter did not stop on SIGTERM (exit {code}): {text[-3000:]}"
    assert "Traceback" not in text


def _scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        return parse_exposition(answer.read().decode())


def _spool_config(base_url: str, port: int, directory: Path, state: Path) -> dict[str, Any]:
    """The sidecar component's ingestions and state settings, in spool mode, on loopback."""
    return {
        "api": {"base_url": base_url, "auth": {"type": "none"}, "max_requests_per_second": 5},
        "polling": {"interval_seconds": 60},
        "ingestions": {
            "directory": str(directory),
            "directory_mode": "spool",
            "directory_poll_seconds": 2,
            "directory_size_limit_bytes": SIDECAR_SIZE_LIMIT,
            "labels": ["team"],
            "max_tracked": 100_000,
        },
        "state": {"path": str(state), "debounce_seconds": 0.5},
        "server": {"host": "127.0.0.1", "port": port},
        "admin": {"enabled": False},
        "reload": {"watch_interval_seconds": 0},
    }


@pytest.mark.slow
async def test_twenty_thousand_files_keep_the_volume_within_the_sidecars_size_limit(
    start_simulator: SimulatorFactory, tmp_path: Path
) -> None:
    """20,000 registration files at 500 a second (a wall-clock rate: the volume's peak is
    rate x the time a file waits, so the test must write at a rate) into a running exporter
    in spool mode with the component's settings: the directory's allocated bytes, sampled
    every 10 ms, stay within the 16 MiB sizeLimit, and every id ends up in the state."""
    _, base_url = await start_simulator()
    directory, state = tmp_path / "ingestions", tmp_path / "state" / "state.db"
    directory.mkdir()
    state.parent.mkdir()
    port = free_port()
    proc, log = launch_exporter(tmp_path, _spool_config(base_url, port, directory, state))
    files, rate = 20_000, 500.0
    peak = [0, 0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.01):
            found = _usage(directory)
            peak[:] = [max(peak[0], found[0]), max(peak[1], found[1])]

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        await wait_for(lambda: _healthy(proc, port, log), timeout=30)
        sampler.start()
        seconds = await asyncio.to_thread(_write, directory, files, rate, stop)

        async def consumed() -> bool:
            return _usage(directory)[0] == 0

        await wait_for(consumed, timeout=60)
        stop.set()
        sampler.join()
        samples = await asyncio.to_thread(_scrape, port)
    finally:
        stop.set()
        _stop(proc, log)
    print(  # the figures docs/deploying.md quotes; shown with -s
        f"\nspool: {files} files in {seconds:.1f} s ({files / seconds:.0f}/s); peak "
        f"{peak[0]} files, {peak[1] / 1024 / 1024:.2f} MiB of {SIDECAR_SIZE_LIMIT // 2**20} MiB "
        f"({100 * peak[1] / SIDECAR_SIZE_LIMIT:.0f}%)"
    )
    assert files / seconds >= rate * 0.9, "the writer fell behind: the rate was not tested"
    assert 0 < peak[1] <= SIDECAR_SIZE_LIMIT
    assert value(samples, "catalog_exporter_tracked_ingestions") == files
    assert value(samples, "catalog_exporter_directory_size_limit_bytes") == SIDECAR_SIZE_LIMIT
    assert value(samples, "catalog_exporter_directory_files_deleted_total", reason="registered")
    store, result = open_store(state)
    assert store is not None
    store.close()
    assert len(result.snapshot.uploads) == files
    assert {r.sources for r in result.snapshot.uploads} == {("directory",)}


async def _healthy(proc: subprocess.Popen[bytes], port: int, log: Path) -> bool:
    assert proc.poll() is None, log.read_text()

    def get() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    return await asyncio.to_thread(get)


@pytest.mark.slow
async def test_a_directory_the_exporter_cannot_write_keeps_files_and_says_so(
    start_simulator: SimulatorFactory, tmp_path: Path
) -> None:
    """Mounted read-only (here: a directory its owner may not write), spool mode registers
    the file, counts delete_failed, logs it once, and keeps running."""
    _, base_url = await start_simulator()
    directory = tmp_path / "ingestions"
    directory.mkdir()
    put(directory / "amzn1.ingestion.kept")
    directory.chmod(0o555)
    port = free_port()
    config = _spool_config(base_url, port, directory, tmp_path / "state.db")
    # Root writes anywhere: without its capabilities (setpriv) the mode bits apply to it too.
    drop = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"] if os.geteuid() == 0 else []
    try:
        proc, log = launch_exporter(tmp_path, config, prefix=drop)
        try:
            await wait_for(lambda: _healthy(proc, port, log), timeout=30)

            async def counted() -> bool:
                samples = await asyncio.to_thread(_scrape, port)
                failed = value(
                    samples, "catalog_exporter_directory_file_errors_total", reason="delete_failed"
                )
                return bool(failed)

            await wait_for(counted, timeout=30)
            samples = await asyncio.to_thread(_scrape, port)
        finally:
            _stop(proc, log)
    finally:
        directory.chmod(0o755)
    assert (directory / "amzn1.ingestion.kept").exists()
    assert value(samples, "catalog_exporter_tracked_ingestions") == 1
    kept = [line for line in log.read_text().splitlines() if "ingestion_file_kept" in line]
    assert len(kept) == 1 and "delete_failed" in kept[0]
