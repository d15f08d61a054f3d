"""The watched directory: file formats, registration, release, reconciliation, bad files."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import structlog
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs
from structlog.typing import EventDict

from exporter.boundedjson import MAX_JSON_DEPTH
from exporter.config import Config
from exporter.discovery import (
    BATCH_FILES,
    DirectoryWatcher,
    FileProblem,
)
from exporter.metrics import DirectoryMetrics
from exporter.models import MAX_REGISTRATION_BYTES
from exporter.tracking import IngestionTracker, Registration, RejectReason, Source, Tracker
from exporter.uploads import UploadStore
from tests.conftest import (
    ExporterFactory,
    SimulatorFactory,
    fast_config,
    value,
    wait_for,
)

#: The label names the tests' files use, allow-listed as `ingestions.labels` would.
LABEL_NAMES = ("team",)


class RecordingTracker:
    """The real `IngestionTracker` (its id and label validation, its sources), recording the
    calls the watcher makes; the ids given are held by the directory already."""

    def __init__(self, *held: str) -> None:
        self.store = UploadStore()
        self.registered: list[object] = []
        self.rejected: list[RejectReason] = []
        self.released: list[tuple[str, bool]] = []
        self.ids_from_calls = 0
        for ingestion_id in held:
            self.store.add(ingestion_id, Source.DIRECTORY.value, {})
        self._tracker = IngestionTracker(
            self.store,
            max_tracked=100_000,
            label_names=LABEL_NAMES,
            on_added=lambda ids: None,
            on_removed=lambda ids: None,
            on_rejected=self.rejected.append,
        )

    @property
    def labels(self) -> dict[str, dict[str, str]]:
        """Each tracked id's labels."""
        return {upload.ingestion_id: dict(upload.labels) for upload in self.store}

    async def register(
        self,
        ingestion_id: object,
        source: Source,
        labels: Mapping[str, object] | None = None,
        *,
        durable: bool = False,
    ) -> Registration:
        self.registered.append(ingestion_id)
        return await self._tracker.register(ingestion_id, source, labels, durable=durable)

    async def release(
        self, ingestion_id: str, source: Source, *, immediate: bool, durable: bool = False
    ) -> bool:
        self.released.append((ingestion_id, immediate))
        return await self._tracker.release(
            ingestion_id, source, immediate=immediate, durable=durable
        )

    def ids_from(self, source: Source) -> set[str]:
        self.ids_from_calls += 1
        return self._tracker.ids_from(source)

    def holds(self, ingestion_id: str, source: Source) -> bool:
        return self._tracker.holds(ingestion_id, source)

    def owns(self, ingestion_id: str) -> bool:
        return self._tracker.owns(ingestion_id)


class FlakyTracker(RecordingTracker):
    """A tracker whose next `failures` registrations raise, as a bug would."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def register(
        self,
        ingestion_id: object,
        source: Source,
        labels: Mapping[str, object] | None = None,
        *,
        durable: bool = False,
    ) -> Registration:
        if self.failures:
            self.failures -= 1
            msg = "tracker bug"
            raise RuntimeError(msg)
        return await super().register(ingestion_id, source, labels, durable=durable)


def watcher(directory: Path, tracker: Tracker, poll_seconds: float = 2.0) -> DirectoryWatcher:
    return DirectoryWatcher(directory, tracker, poll_seconds=poll_seconds)


def put(path: Path, content: str | bytes = "") -> Path:
    """Write a file and give it a later mtime, as a write a while after the last one would."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    after = max(path.stat().st_mtime_ns, before + 1_000_000)
    os.utime(path, ns=(after, after))
    return path


def events(logs: list[EventDict], name: str) -> list[EventDict]:
    return [entry for entry in logs if entry["event"] == name]


@pytest.fixture
def logs() -> Iterator[list[EventDict]]:
    """Every log event at every level, whatever level an earlier test configured."""
    wrapper_class = structlog.get_config()["wrapper_class"]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    with capture_logs() as entries:
        yield entries
    structlog.configure(wrapper_class=wrapper_class)


async def test_an_empty_file_names_the_id_that_is_its_file_name(tmp_path: Path) -> None:
    """`touch <dir>/<id>` tracks the id, with no labels."""
    (tmp_path / "amzn1.ingestion.a").touch()
    put(tmp_path / "blank", " \n\n ")
    tracker = RecordingTracker()
    await watcher(tmp_path, tracker).scan()
    assert tracker.ids_from(Source.DIRECTORY) == {"amzn1.ingestion.a", "blank"}
    assert tracker.labels["amzn1.ingestion.a"] == {}


async def test_the_first_non_empty_line_stripped_is_the_id(tmp_path: Path) -> None:
    """Leading blank lines, surrounding spaces, a BOM and later lines are not part of the id."""
    put(tmp_path / "upload-1", "\n\n  amzn1.ingestion.b  \r\nsecond line\n")
    put(tmp_path / "upload-2", "\ufeffamzn1.ingestion.c\n")
    tracker = RecordingTracker()
    await watcher(tmp_path, tracker).scan()
    assert tracker.registered == ["amzn1.ingestion.b", "amzn1.ingestion.c"]


async def test_a_json_object_gives_the_id_and_its_labels(tmp_path: Path) -> None:
    """`ingestionId` and `labels` are read; unknown keys are ignored; labels are optional."""
    document = {"ingestionId": "amzn1.ingestion.d", "labels": {"team": "pricing"}, "x": 1}
    put(tmp_path / "d.json", "  " + json.dumps(document))
    put(tmp_path / "e.json", json.dumps({"ingestionId": "amzn1.ingestion.e"}))
    tracker = RecordingTracker()
    await watcher(tmp_path, tracker).scan()
    assert tracker.labels == {"amzn1.ingestion.d": {"team": "pricing"}, "amzn1.ingestion.e": {}}


async def test_dot_files_are_ignored(tmp_path: Path, logs: list[EventDict]) -> None:
    """A file being written as `.tmp-x` is neither read nor warned about until renamed."""
    put(tmp_path / ".tmp-x", "amzn1.ingestion.f")
    tracker = RecordingTracker()
    directory = watcher(tmp_path, tracker)
    await directory.scan()
    assert tracker.registered == []
    assert logs == []
    (tmp_path / ".tmp-x").rename(tmp_path / "x")
    await directory.scan()
    assert tracker.registered == ["amzn1.ingestion.f"]


async def test_directories_fifos_and_symlinks_to_directories_are_ignored(
    tmp_path: Path, logs: list[EventDict]
) -> None:
    """Only regular files name ids; reading a FIFO would block, so it is never opened."""
    (tmp_path / "subdir").mkdir()
    put(tmp_path / "subdir" / "inner", "amzn1.ingestion.g")
    (tmp_path / "link-to-dir").symlink_to(tmp_path / "subdir")
    os.mkfifo(tmp_path / "pipe")
    tracker = RecordingTracker()
    await watcher(tmp_path, tracker).scan()
    assert tracker.registered == []
    assert logs == []


async def test_a_symlink_to_a_file_inside_the_directory_is_followed(tmp_path: Path) -> None:
    """A ConfigMap volume's layout (`key -> ..data/key`) works."""
    (tmp_path / "..data").mkdir()
    put(tmp_path / "..data" / "upload", "amzn1.ingestion.h")
    (tmp_path / "upload").symlink_to(Path("..data") / "upload")
    tracker = RecordingTracker()
    await watcher(tmp_path, tracker).scan()
    assert tracker.registered == ["amzn1.ingestion.h"]


async def test_a_symlink_out_of_the_directory_is_not_read(
    tmp_path: Path, logs: list[EventDict]
) -> None:
    """The shared volume cannot make the exporter read (and publish) a file of its own."""
    secret = put(tmp_path / "secret", "do-not-publish")
    watched = tmp_path / "watched"
    watched.mkdir()
    (watched / "upload").symlink_to(secret)
    tracker = RecordingTracker()
    await watcher(watched, tracker).scan()
    assert tracker.registered == []
    [warning] = events(logs, "ingestion_file_unreadable")
    assert warning["reason"] == "symlink_outside"
    assert "do-not-publish" not in repr(logs)


async def test_a_file_over_64_kib_is_skipped_with_one_warning(
    tmp_path: Path, logs: list[EventDict]
) -> None:
    """A large file is not read, and is warned about once per version, not once per scan."""
    big = put(tmp_path / "big", "amzn1.ingestion.i\n" + "x" * MAX_REGISTRATION_BYTES)
    put(tmp_path / "at-limit", "amzn1.ingestion.j".ljust(MAX_REGISTRATION_BYTES))
    tracker = RecordingTracker()
    directory = watcher(tmp_path, tracker)
    for _ in range(3):
        await directory.scan()
    assert tracker.registered == ["amzn1.ingestion.j"]
    [warning] = events(logs, "ingestion_file_unreadable")
    assert (warning["file"], warning["reason"], warning["log_level"]) == (
        "big",
        "too_large",
        "warning",
    )
    put(big, "amzn1.ingestion.i")
    await directory.scan()
    assert tracker.registered == ["amzn1.ingestion.j", "amzn1.ingestion.i"]


async def test_a_new_file_is_registered_by_the_next_scan_and_only_once(
    tmp_path: Path, logs: list[EventDict]
) -> None:
    """Unchanged files are not registered again on later scans."""
    tracker = RecordingTracker()
    directory = watcher(tmp_path, tracker)
    await directory.scan()
    put(tmp_path / "upload", "amzn1.ingestion.k")
    await directory.scan()
    await directory.scan()
    assert tracker.registered == ["amzn1.ingestion.k"]
    [registered] = events(logs, "ingestion_file_registered")
    assert registered["file"] == "upload"
    assert registered["ingestion_id"] == "amzn1.ingestion.k"
    assert registered["created"] is True


async def test_a_changed_file_is_registered_again(tmp_path: Path) -> None:
    """New labels for the same id reach the tracker, and the id is not released."""
    upload = put(tmp_path / "upload", json.dumps({"ingestionId": "amzn1.ingestion.l"}))
    tracker = RecordingTracker()
    directory = watcher(tmp_path, tracker)
    await directory.scan()
    put(upload, json.dumps({"ingestionId": "amzn1.ingestion.l", "labels": {"team": "ads"}}))
    await directory.scan()
    assert tracker.registered == ["amzn1.ingestion.l", "amzn1.ingestion.l"]
    assert tracker.labels["amzn1.ingestion.l"] == {"team": "ads"}
    assert tracker.released == []


async def test_a_file_renamed_into_place_with_the_same_size_and_mtime_is_seen(
    tmp_path: Path,
) -> None:
    """A new inode is a new version even within the file system's timestamp granularity."""
    upload = put(tmp_path / "upload", "amzn1.ingestion.m1")
    tracker = RecordingTracker()
    directory = watcher(tmp_path, tracker)
    await directory.scan()
    replacement = tmp_path / ".tmp-upload"
    replacement.write_text("amzn1.ingestion.m2")
    mtime = upload.stat().st_mtime_ns
    os.utime(replacement, ns=(mtime, mtime))
    replacement.rename(upload)
    await directory.scan()
    assert tracker.ids_from(Source.DIRECTORY) == {"amzn1.ingestion.m2"}


async def test_a_file_that_now_names_another_id_releases_the_old_one(tmp_path: Path) -> None:
    """The old id is released for removal once terminal, the new one registered."""
    upload = put(tmp_path / "upload", "amzn1.ingestion.n1")
    tracker = RecordingTracker()
    directory = watcher(tmp_path, tracker)
    await directory.scan()
    put(upload, "amzn1.ingestion.n2")
    await directory.scan()
    assert tracker.released == [("amzn1.ingestion.n1", False)]
    assert tracker.ids_from(Source.DIRECTORY) == {"amzn1.ingestion.n2"}


async def test_deleting_a_file_releases_its_id_not_immediately(
    tmp_path: Path, logs: list[EventDict]
) -> None:
    """A deleted file's id is released with immediate=False, so a final FATAL is still seen."""
    upload = put(tmp_path / "upload", "amzn1.ingestion.o")
    tracker = RecordingTracker()
    directory = watcher(tmp_path, tracker)
    await directory.scan()
    upload.unlink()
    await directory.scan()
    await directory.scan()
    assert tracker.released == [("amzn1.ingestion.o", False)]
    [removed] = events(logs, "ingestion_file_removed")
    assert (removed["file"], removed["ingestion_id"]) == ("upload", "amzn1.ingestion.o")


async def test_an_id_named_by_two_files_is_released_only_when_both_are_gone(
    tmp_path: Path,
) -> None:
    """Deleting one of two files naming the same id releases nothing."""
    first = put(tmp_path / "first", "amzn1.ingestion.p")
    second = put(tmp_path / "second", "amzn1.ingestion.p")
    tracker = RecordingTracker()
    directory = watcher(tmp_path, tracker)
    await directory.scan()
    first.unlink()
    await directory.scan()
    assert tracker.released == []
    second.unlink()
    await directory.scan()
    assert tracker.released == [("amzn1.ingestion.p", False)]


async def test_two_files_swapping_ids_in_one_scan_release_nothing(tmp_path: Path) -> None:
    """Releases wait for the whole scan, so an id that moves between files stays tracked."""
    first = put(tmp_path / "first", "amzn1.ingestion.q1")
    second = put(tmp_path / "second", "amzn1.ingestion.q2")
    tracker = RecordingTracker()
    directory = watcher(tmp_path, tracker)
    await directory.scan()
    put(first, "amzn1.ingestion.q2")
    put(second, "amzn1.ingestion.q1")
    await directory.scan()
    assert tracker.released == []


async def test_the_first_scan_releases_held_ids_that_no_file_names(tmp_path: Path) -> None:
    """Ids left from a previous run whose files are gone are released; the others kept."""
    put(tmp_path / "kept", "amzn1.ingestion.kept")
    tracker = RecordingTracker("amzn1.ingestion.kept", "amzn1.ingestion.gone")
    directory = watcher(tmp_path, tracker)
    await directory.scan()
    await directory.scan()
    assert tracker.released == [("amzn1.ingestion.gone", False)]
    assert tracker.ids_from(Source.DIRECTORY) == {"amzn1.ingestion.kept"}


async def test_a_missing_directory_is_warned_once_and_scanned_once_created(
    tmp_path: Path, logs: list[EventDict]
) -> None:
    """No error and no release while the directory is missing; its files count once it exists."""
    missing = tmp_path / "ingestions"
    tracker = RecordingTracker("amzn1.ingestion.r0")
    directory = watcher(missing, tracker)
    for _ in range(3):
        await directory.scan()
    [warning] = events(logs, "ingestion_directory_missing")
    assert warning["message"] == "directory does not exist yet"
    assert tracker.released == []
    missing.mkdir()
    put(missing / "upload", "amzn1.ingestion.r1")
    await directory.scan()
    assert tracker.ids_from(Source.DIRECTORY) == {"amzn1.ingestion.r1"}
    assert tracker.released == [("amzn1.ingestion.r0", False)]
    assert len(events(logs, "ingestion_directory_available")) == 1


async def test_an_unlistable_directory_is_warned_once_per_distinct_error(
    tmp_path: Path, logs: list[EventDict]
) -> None:
    """A path that is not a directory is an error listing it, logged once and retried."""
    not_a_directory = put(tmp_path / "ingestions", "")
    directory = watcher(not_a_directory, RecordingTracker())
    for _ in range(3):
        await directory.scan()
    [warning] = events(logs, "ingestion_directory_unreadable")
    assert "Not a directory" in warning["message"]
    not_a_directory.unlink()
    await directory.scan()
    assert len(events(logs, "ingestion_directory_missing")) == 1


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        pytest.param(b'{"ingestionId": "amzn1.ingestion.s",', "bad_json", id="truncated-json"),
        pytest.param(b'{"ingestionId": "a", "labels": ["x"]}', "bad_json", id="labels-a-list"),
        pytest.param(b"amzn1.ingestion.\xff\xfe", "not_utf8", id="invalid-utf8"),
        pytest.param(
            b'{"ingestionId": "a", "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
            "too_deep",
            id="nested-10000-deep",
        ),
        pytest.param(
            b'{"ingestionId": "a", "n": ' + b"1" * 5_000 + b"}",
            "bad_json",
            id="integer-of-5000-digits",
        ),
    ],
)
async def test_a_bad_file_is_warned_once_across_scans_and_read_again_when_fixed(
    tmp_path: Path, logs: list[EventDict], content: bytes, reason: str
) -> None:
    """Bad JSON or undecodable bytes: one warning per file version, no registration."""
    bad = put(tmp_path / "bad", content)
    tracker = RecordingTracker()
    directory = watcher(tmp_path, tracker)
    for _ in range(3):
        await directory.scan()
    assert tracker.registered == []
    [warning] = events(logs, "ingestion_file_unreadable")
    assert (warning["file"], warning["reason"]) == ("bad", reason)
    assert "amzn1.ingestion" not in warning["message"]
    put(bad, "amzn1.ingestion.s")
    await directory.scan()
    assert tracker.registered == ["amzn1.ingestion.s"]


async def test_a_file_turning_bad_releases_its_id(tmp_path: Path) -> None:
    """A file that no longer names any id no longer holds the one it named."""
    upload = put(tmp_path / "upload", "amzn1.ingestion.t")
    tracker = RecordingTracker()
    directory = watcher(tmp_path, tracker)
    await directory.scan()
    put(upload, "{not json")
    await directory.scan()
    assert tracker.released == [("amzn1.ingestion.t", False)]


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        pytest.param(
            "json-newline",
            json.dumps({"ingestionId": "amzn1.ingestion.u\nFAKE log line"}),
            RejectReason.CONTROL_CHARACTERS,
            id="newline",
        ),
        pytest.param("long", "u" * 300, RejectReason.TOO_LONG, id="300-chars"),
        pytest.param("bell", "amzn1\x07ingestion", RejectReason.CONTROL_CHARACTERS, id="bell"),
        pytest.param("amzn1\ningestion", "", RejectReason.CONTROL_CHARACTERS, id="file-name"),
        pytest.param("number", '{"ingestionId": 42}', RejectReason.NOT_A_STRING, id="number"),
        # The two the old fake tracker, with rules of its own, let through as valid ids:
        pytest.param(
            "rtl", "amzn1.\u202eingestion", RejectReason.FORMAT_CHARACTERS, id="rtl-override"
        ),
        pytest.param("nfd", "amzn1.ingestion.cafe\u0301", RejectReason.NOT_NFC, id="not-nfc"),
    ],
)
async def test_a_hostile_id_goes_to_the_tracker_and_its_rejection_is_warned_once(
    tmp_path: Path, logs: list[EventDict], name: str, content: str, reason: RejectReason
) -> None:
    """The tracker sees the id as written and refuses it; the warning never quotes it."""
    put(tmp_path / name, content)
    tracker = RecordingTracker()
    directory = watcher(tmp_path, tracker)
    for _ in range(3):
        await directory.scan()
    assert tracker.rejected == [reason]
    assert tracker.ids_from(Source.DIRECTORY) == set()
    [warning] = events(logs, "ingestion_file_rejected")
    assert (warning["file"], warning["reason"]) == (name, reason)
    assert "ingestion_id" not in warning
    assert events(logs, "ingestion_file_registered") == []


async def test_a_rejected_label_update_keeps_the_id_until_the_file_goes(tmp_path: Path) -> None:
    """Bad labels on a tracked id are refused, but the file still names the id it holds."""
    upload = put(tmp_path / "upload", "amzn1.ingestion.v")
    tracker = RecordingTracker()
    directory = watcher(tmp_path, tracker)
    await directory.scan()
    put(upload, json.dumps({"ingestionId": "amzn1.ingestion.v", "labels": {"Bad-Name": "x"}}))
    await directory.scan()
    assert tracker.rejected == [RejectReason.BAD_LABELS]
    assert tracker.released == []
    upload.unlink()
    await directory.scan()
    assert tracker.released == [("amzn1.ingestion.v", False)]


async def test_run_picks_up_a_file_within_a_few_polls_and_stops_on_cancel(
    tmp_path: Path,
) -> None:
    """The loop scans every poll_seconds until its task is cancelled."""
    tracker = RecordingTracker()
    task = asyncio.create_task(watcher(tmp_path, tracker, poll_seconds=0.05).run())
    await asyncio.sleep(0.06)
    put(tmp_path / "upload", "amzn1.ingestion.w")

    async def registered() -> bool:
        return tracker.registered == ["amzn1.ingestion.w"]

    await wait_for(registered, timeout=0.5, interval=0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_a_crash_registering_one_file_is_logged_once_and_retried_next_scan(
    tmp_path: Path, logs: list[EventDict]
) -> None:
    """A tracker exception stays with its file: the others register, the next scan retries it."""
    put(tmp_path / "a-upload", "amzn1.ingestion.x1")
    put(tmp_path / "b-upload", "amzn1.ingestion.x2")
    tracker = FlakyTracker(failures=2)
    registry = CollectorRegistry()
    directory = DirectoryWatcher(tmp_path, tracker, metrics=DirectoryMetrics(registry, FileProblem))
    await directory.scan()  # a-upload crashes; b-upload too (second failure)
    await directory.scan()
    assert tracker.ids_from(Source.DIRECTORY) == {"amzn1.ingestion.x1", "amzn1.ingestion.x2"}
    crashes = events(logs, "ingestion_file_crashed")
    assert [(c["file"], c["log_level"], c["exc_info"]) for c in crashes] == [
        ("a-upload", "error", True),
        ("b-upload", "error", True),
    ]
    assert events(logs, "ingestion_directory_scan_crashed") == []
    errors = registry.get_sample_value(
        "catalog_exporter_directory_file_errors_total", {"reason": "crashed"}
    )
    assert errors == 2


async def test_a_file_crashing_every_scan_is_logged_once_and_blocks_no_other_file(
    tmp_path: Path, logs: list[EventDict]
) -> None:
    """A file whose registration always crashes: one log line, and later files still register."""
    put(tmp_path / "a-upload", "amzn1.ingestion.y1")
    tracker = FlakyTracker(failures=3)
    directory = watcher(tmp_path, tracker)
    for _ in range(3):
        await directory.scan()
    put(tmp_path / "b-upload", "amzn1.ingestion.y2")
    await directory.scan()
    assert tracker.ids_from(Source.DIRECTORY) == {"amzn1.ingestion.y1", "amzn1.ingestion.y2"}
    assert len(events(logs, "ingestion_file_crashed")) == 1


async def test_run_logs_a_crashed_scan_and_goes_on(tmp_path: Path, logs: list[EventDict]) -> None:
    """An exception outside any one file (here, in a release) is logged; the loop goes on."""
    put(tmp_path / "upload", "amzn1.ingestion.x")
    tracker = RecordingTracker("amzn1.ingestion.gone")
    calls = 0
    release = tracker.release

    async def failing_once(
        ingestion_id: str, source: Source, *, immediate: bool, durable: bool = False
    ) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            msg = "tracker bug"
            raise RuntimeError(msg)
        return await release(ingestion_id, source, immediate=immediate, durable=durable)

    tracker.release = failing_once  # type: ignore[method-assign]
    task = asyncio.create_task(watcher(tmp_path, tracker, poll_seconds=0.05).run())

    async def released() -> bool:
        return tracker.released == [("amzn1.ingestion.gone", False)]

    await wait_for(released, timeout=0.5, interval=0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [crash] = events(logs, "ingestion_directory_scan_crashed")
    assert crash["log_level"] == "error"
    assert crash["exc_info"] is True


async def test_json_nested_to_the_limit_is_read_and_one_deeper_is_refused(
    tmp_path: Path, logs: list[EventDict]
) -> None:
    """MAX_JSON_DEPTH levels of nesting are read; brackets inside strings do not count."""

    def nested(depth: int) -> str:  # the document itself is the first level
        inner = "[" * (depth - 1) + "]" * (depth - 1)
        return f'{{"ingestionId": "{{[[", "x": {inner}}}'

    put(tmp_path / "at-limit", nested(MAX_JSON_DEPTH))
    put(tmp_path / "over-limit", nested(MAX_JSON_DEPTH + 1))
    tracker = RecordingTracker()
    await watcher(tmp_path, tracker).scan()
    assert tracker.registered == ["{[["]
    [warning] = events(logs, "ingestion_file_unreadable")
    assert (warning["file"], warning["reason"]) == ("over-limit", "too_deep")


async def test_a_hostile_file_does_not_stop_the_others_from_registering_or_releasing(
    tmp_path: Path, logs: list[EventDict]
) -> None:
    """Deep JSON beside good files: new ids register, deleted ones release, one count each."""
    gone = put(tmp_path / "gone", "amzn1.ingestion.z0")
    tracker = RecordingTracker()
    registry = CollectorRegistry()
    directory = DirectoryWatcher(tmp_path, tracker, metrics=DirectoryMetrics(registry, FileProblem))
    await directory.scan()
    put(tmp_path / "deep.json", '{"a": ' + "[" * 10_000 + "]" * 10_000 + "}")
    put(tmp_path / "digits.json", '{"ingestionId": "a", "n": ' + "9" * 5_000 + "}")
    put(tmp_path / "new", "amzn1.ingestion.z1")
    gone.unlink()
    for _ in range(3):
        await directory.scan()
    assert tracker.ids_from(Source.DIRECTORY) == {"amzn1.ingestion.z1"}
    assert tracker.released == [("amzn1.ingestion.z0", False)]
    assert events(logs, "ingestion_directory_scan_crashed") == []

    def count(reason: str) -> float | None:
        labels = {"reason": reason}
        return registry.get_sample_value("catalog_exporter_directory_file_errors_total", labels)

    assert (count("too_deep"), count("bad_json"), count("crashed")) == (1, 1, 0)
    assert registry.get_sample_value("catalog_exporter_directory_scan_failing") == 0


async def test_scan_failing_shows_a_directory_that_cannot_be_listed(tmp_path: Path) -> None:
    """The gauge is 1 while the directory cannot be listed and 0 again after a full scan."""
    missing = tmp_path / "ingestions"
    registry = CollectorRegistry()
    directory = DirectoryWatcher(
        missing, RecordingTracker(), metrics=DirectoryMetrics(registry, FileProblem)
    )
    await directory.scan()
    assert registry.get_sample_value("catalog_exporter_directory_scan_failing") == 1
    last = "catalog_exporter_directory_last_scan_success_timestamp_seconds"
    assert registry.get_sample_value(last) == 0
    missing.mkdir()
    await directory.scan()
    assert registry.get_sample_value("catalog_exporter_directory_scan_failing") == 0
    assert (registry.get_sample_value(last) or 0) > 0


async def test_the_running_exporter_keeps_discovering_beside_a_deeply_nested_file(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory, tmp_path: Path
) -> None:
    """The red-team file (10,000 levels deep) is counted; other files register and release."""
    sim, url = await start_simulator()
    sim.add_upload("file-ok", [("INPROGRESS", 0)])
    sim.add_upload("file-gone", [("INPROGRESS", 0)])
    drop = tmp_path / "ingestions"
    drop.mkdir()
    put(drop / "gone", "file-gone")
    config = fast_config(
        url, [], ingestions={"directory": str(drop), "directory_poll_seconds": 0.05}
    )
    running = await start_exporter(config)
    await wait_for(running.status_is("file-gone", "INPROGRESS"))
    put(drop / "deep.json", '{"ingestionId": "x", "a": ' + "[" * 10_000 + "]" * 10_000 + "}")

    async def counted_deep() -> bool:
        samples = await running.scrape()
        errors = "catalog_exporter_directory_file_errors_total"
        return value(samples, errors, reason="too_deep") == 1

    await wait_for(counted_deep)  # a scan has met the file
    put(drop / "ok", "file-ok")
    (drop / "gone").unlink()
    await wait_for(running.status_is("file-ok", "INPROGRESS"))

    async def released() -> bool:
        view = running.exporter.tracker.view("file-gone")
        return view is not None and view.sources == ()

    await wait_for(released)
    samples = await running.scrape()
    errors = "catalog_exporter_directory_file_errors_total"
    assert value(samples, errors, reason="too_deep") == 1
    assert value(samples, "catalog_exporter_directory_scan_failing") == 0
    assert "ingestion_directory_scan_crashed" not in running.logs.getvalue()


def test_poll_seconds_must_be_positive(tmp_path: Path) -> None:
    """A zero interval would spin the event loop; the constructor refuses it."""
    with pytest.raises(ValueError, match="poll_seconds"):
        DirectoryWatcher(tmp_path, RecordingTracker(), poll_seconds=0)


class TickingTracker(IngestionTracker):
    """A real tracker that notes how often the event loop ran before each registration."""

    def __init__(self, store: UploadStore) -> None:
        super().__init__(
            store,
            max_tracked=20_000,
            label_names=(),
            on_added=lambda ids: None,
            on_removed=lambda ids: None,
            on_rejected=lambda reason: None,
        )
        self.ticks = 0
        self.seen_at: list[int] = []
        self.first = asyncio.Event()

    async def tick(self) -> None:
        """Count loop iterations from the first registration on (not while files are read)."""
        await self.first.wait()
        while True:
            await asyncio.sleep(0)
            self.ticks += 1

    async def register(
        self,
        ingestion_id: object,
        source: Source,
        labels: Mapping[str, object] | None = None,
        *,
        durable: bool = False,
    ) -> Registration:
        self.first.set()
        self.seen_at.append(self.ticks)
        return await super().register(ingestion_id, source, labels, durable=durable)


@pytest.mark.slow
async def test_ten_thousand_files_dropped_at_once_are_all_tracked_without_holding_the_loop(
    tmp_path: Path,
) -> None:
    """One scan registers 10,000 new files with the real tracker, yielding to the loop."""
    for n in range(10_000):
        (tmp_path / f"amzn1.ingestion.{n:05d}").touch()
    store = UploadStore()
    tracker = TickingTracker(store)
    ticker = asyncio.create_task(tracker.tick())
    try:
        await watcher(tmp_path, tracker).scan()
    finally:
        ticker.cancel()
    assert len(store) == 10_000
    assert tracker.ids_from(Source.DIRECTORY) == {f"amzn1.ingestion.{n:05d}" for n in range(10_000)}
    # Other tasks ran between batches of registrations: no single long stall.
    assert tracker.seen_at[-1] - tracker.seen_at[0] >= 10_000 // BATCH_FILES // 2


async def test_unchanged_and_refused_files_cost_no_pass_over_the_tracked_ids(
    tmp_path: Path,
) -> None:
    """Only the first scan lists the tracker's directory ids; refusals ask about one id."""
    for n in range(20):
        put(tmp_path / f"good-{n}", f"amzn1.ingestion.{n}")
        put(tmp_path / f"bad-{n}", json.dumps({"ingestionId": f"id-{n}", "labels": {"X": "y"}}))
    tracker = RecordingTracker()
    directory = watcher(tmp_path, tracker)
    for _ in range(3):
        await directory.scan()
    put(tmp_path / "late", "amzn1.ingestion.late")
    await directory.scan()
    assert tracker.ids_from_calls == 1
    assert len(tracker.registered) == 41


async def test_two_quick_reloads_leave_one_watcher_on_the_newest_directory(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory, tmp_path: Path
) -> None:
    """Reloads A -> B -> C applied back to back: once the restarts end, exactly one
    directory watcher runs, and it watches C (two restart tasks used to overwrite each
    other by name, and both started a watcher)."""
    _, url = await start_simulator()
    dirs = [tmp_path / name for name in ("a", "b", "c")]
    for directory in dirs:
        directory.mkdir()

    def config(directory: Path) -> Config:
        ingestions = {"directory": str(directory), "directory_poll_seconds": 0.05}
        return fast_config(url, [], ingestions=ingestions)

    running = await start_exporter(config(dirs[0]))
    running.exporter.apply(config(dirs[1]))
    running.exporter.apply(config(dirs[2]))

    async def restarts_ended() -> bool:
        return not any(
            task.get_name().endswith("restart") and not task.done() for task in asyncio.all_tasks()
        )

    await wait_for(restarts_ended)
    watchers = [t for t in asyncio.all_tasks() if t.get_name() == "directory-watcher"]
    assert len(watchers) == 1
    put(dirs[2] / "newest", "in-the-newest")

    async def registered() -> bool:
        return running.exporter.tracker.view("in-the-newest") is not None

    await wait_for(registered)
