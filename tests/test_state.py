"""The state file: its format, loading untrusted content, atomic saves and the debounced writer."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from exporter.state import (
    STATE_VERSION,
    StateError,
    StateSnapshot,
    StateWriter,
    UploadRecord,
    load_state,
    save_state,
)

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_718_000_000.0


def full_record() -> UploadRecord:
    """A record with every field set away from its default."""
    return UploadRecord(
        ingestion_id="amzn1.ingestion.1",
        sources=("config", "directory"),
        labels={"team": "books", "env": "prod"},
        status="DONE",
        first_seen=NOW - 100.0,
        status_changed=NOW - 10.5,
        last_success=NOW - 1.25,
        terminal_at=NOW - 10.5,
        report_available=True,
        queue_observed=True,
        released=True,
    )


def minimal_record(ingestion_id: str = "amzn1.ingestion.2") -> UploadRecord:
    """A record with only the required fields."""
    return UploadRecord(ingestion_id, ("api",), {}, "INQUEUE", NOW, NOW)


def valid_document() -> dict[str, object]:
    """A valid state document, as JSON types, to break in one place."""
    return {
        "version": STATE_VERSION,
        "written_at": NOW,
        "uploads": [
            {
                "ingestion_id": "a",
                "sources": ["api"],
                "labels": {"team": "books"},
                "status": "INQUEUE",
                "first_seen": NOW,
                "status_changed": NOW,
                "last_success": None,
                "terminal_at": None,
                "report_available": False,
                "queue_observed": False,
                "released": False,
            }
        ],
        "retired": {"old": NOW},
    }


def temp_files(directory: Path) -> list[str]:
    """Names of leftover temp files from saves in `directory`."""
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


# -- save and load ------------------------------------------------------------------------------


def test_save_then_load_round_trips_every_field(tmp_path: Path) -> None:
    """Every field of every record, and the retired ids, come back exactly as saved."""
    path = tmp_path / "state.json"
    snapshot = StateSnapshot((full_record(), minimal_record()), {"gone": NOW - 5.0})
    save_state(path, snapshot)
    result = load_state(path)
    assert result.problem is None and result.moved_to is None
    assert result.snapshot == snapshot
    assert isinstance(result.snapshot.uploads[0].sources, tuple)


def test_saved_file_is_compact_json_in_the_documented_format(tmp_path: Path) -> None:
    """The file is one unindented JSON object with version, written_at, uploads and retired."""
    path = tmp_path / "state.json"
    save_state(path, StateSnapshot((minimal_record("x"),), {"y": NOW}))
    text = path.read_text()
    assert "\n" not in text and ": " not in text
    document = json.loads(text)
    assert set(document) == {"version", "written_at", "uploads", "retired"}
    assert document["version"] == 1 and document["retired"] == {"y": NOW}
    assert document["uploads"][0]["ingestion_id"] == "x"


def test_missing_file_loads_as_an_empty_snapshot_without_a_problem(tmp_path: Path) -> None:
    """No state file yet is the normal first start, not a problem."""
    result = load_state(tmp_path / "state.json")
    assert result.snapshot == StateSnapshot()
    assert result.problem is None and result.moved_to is None


def test_record_without_defaulted_fields_loads_with_defaults(tmp_path: Path) -> None:
    """Fields that have defaults may be absent from a record."""
    document = valid_document()
    document["uploads"] = [
        {
            "ingestion_id": "a",
            "sources": [],
            "labels": {},
            "status": "INQUEUE",
            "first_seen": 1,
            "status_changed": 2,
        }
    ]
    path = tmp_path / "state.json"
    path.write_text(json.dumps(document))
    result = load_state(path)
    assert result.problem is None
    assert result.snapshot.uploads == (UploadRecord("a", (), {}, "INQUEUE", 1.0, 2.0),)
    assert type(result.snapshot.uploads[0].first_seen) is float


def _with(path: tuple[str | int, ...], value: object) -> dict[str, object]:
    document: dict[str, object] = valid_document()
    target: object = document
    for key in path[:-1]:
        target = target[key]  # type: ignore[index]
    target[path[-1]] = value  # type: ignore[index]
    return document


CORRUPT_FILES = {
    "not JSON": "{not json",
    "empty file": "",
    "invalid UTF-8": b"\xff\xfe{}",
    "top-level list": "[]",
    "top-level string": '"state"',
    "deeply nested": "[" * 100_000,
    "wrong version": json.dumps(_with(("version",), 2)),
    "version as bool": json.dumps(_with(("version",), True)),
    "version missing": json.dumps({"written_at": NOW, "uploads": [], "retired": {}}),
    "uploads an object": json.dumps(_with(("uploads",), {})),
    "retired a list": json.dumps(_with(("retired",), [])),
}

BAD_ENTRIES = {
    "retired time a string": _with(("retired", "old"), "yesterday"),
    "record a string": _with(("uploads", 0), "a"),
    "id a number": _with(("uploads", 0, "ingestion_id"), 7),
    "status a number": _with(("uploads", 0, "status"), 3),
    "status null": _with(("uploads", 0, "status"), None),
    "first_seen a string": _with(("uploads", 0, "first_seen"), "now"),
    "first_seen a bool": _with(("uploads", 0, "first_seen"), True),
    "first_seen infinite": _with(("uploads", 0, "first_seen"), float("inf")),
    "first_seen NaN": _with(("uploads", 0, "first_seen"), float("nan")),
    "first_seen huge int": _with(("uploads", 0, "first_seen"), 10**400),
    "last_success a string": _with(("uploads", 0, "last_success"), "x"),
    "sources a string": _with(("uploads", 0, "sources"), "api"),
    "sources holding a number": _with(("uploads", 0, "sources"), ["api", 1]),
    "labels a list": _with(("uploads", 0, "labels"), ["team"]),
    "label value a number": _with(("uploads", 0, "labels", "team"), 1),
    "flag a string": _with(("uploads", 0, "released"), "yes"),
    "flag a number": _with(("uploads", 0, "report_available"), 1),
}


@pytest.mark.parametrize("content", CORRUPT_FILES.values(), ids=CORRUPT_FILES.keys())
def test_unusable_file_is_moved_aside_and_loads_as_empty(
    tmp_path: Path, content: str | bytes
) -> None:
    """A file that is not valid state is renamed with a timestamp suffix, never half-used."""
    path = tmp_path / "state.json"
    data = content.encode() if isinstance(content, str) else content
    path.write_bytes(data)

    result = load_state(path, now=lambda: NOW + 0.9)

    assert result.snapshot == StateSnapshot()
    assert result.problem is not None and result.problem.startswith("state file ")
    assert result.moved_to == tmp_path / "state.json.corrupt-1718000000"
    assert result.moved_to.read_bytes() == data
    assert not path.exists()
    assert result.available


@pytest.mark.parametrize("document", BAD_ENTRIES.values(), ids=BAD_ENTRIES.keys())
def test_a_bad_entry_is_skipped_and_counted_and_the_good_ones_load(
    tmp_path: Path, document: dict[str, object]
) -> None:
    """One entry that fails its checks is skipped and counted; the file and the rest stay."""
    uploads = document["uploads"]
    assert isinstance(uploads, list)
    good = {**valid_document()["uploads"][0], "ingestion_id": "good"}  # type: ignore[index]
    document = {
        **document,
        "uploads": [*uploads, good],
        "retired": {**document["retired"], "kept": NOW},
    }  # type: ignore[dict-item]
    path = tmp_path / "state.json"
    data = json.dumps(document).encode()
    path.write_bytes(data)

    result = load_state(path)

    assert result.skipped == 1
    assert result.problem is not None and "skipped 1 invalid entries" in result.problem
    assert "good" in [r.ingestion_id for r in result.snapshot.uploads]
    assert "kept" in result.snapshot.retired
    assert result.moved_to is None and path.read_bytes() == data and result.available


def test_truncated_file_is_moved_aside(tmp_path: Path) -> None:
    """The first half of a valid file (a non-atomic write cut short) is not half-loaded."""
    path = tmp_path / "state.json"
    save_state(path, StateSnapshot((full_record(), minimal_record())))
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])

    result = load_state(path, now=lambda: NOW)

    assert result.snapshot == StateSnapshot()
    assert result.problem is not None and "not valid JSON" in result.problem
    assert result.moved_to == tmp_path / "state.json.corrupt-1718000000"
    assert result.moved_to.read_bytes() == whole[: len(whole) // 2]


def test_a_directory_at_the_state_path_is_unavailable_and_left_alone(tmp_path: Path) -> None:
    """A directory where the file should be is not moved: persistence is unavailable."""
    path = tmp_path / "state.json"
    path.mkdir()
    (path / "inside").write_text("kept")
    result = load_state(path, now=lambda: NOW)
    assert result.snapshot == StateSnapshot() and not result.available
    assert result.problem is not None and "could not be read" in result.problem
    assert "directory" in result.problem
    assert result.moved_to is None and (path / "inside").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_fifo_at_the_state_path_is_unavailable_without_blocking(tmp_path: Path) -> None:
    """A FIFO (no writer) is neither opened for a blocking read nor moved."""
    path = tmp_path / "state.json"
    os.mkfifo(path)
    result = load_state(path, now=lambda: NOW)
    assert not result.available and result.moved_to is None
    assert result.problem is not None and "not a regular file" in result.problem
    assert path.exists()


def test_corrupt_file_that_cannot_be_moved_is_reported_without_moved_to(tmp_path: Path) -> None:
    """When even the rename fails, the problem says so and moved_to stays None."""
    path = tmp_path / "state.json"
    path.write_text("{")
    blocker = tmp_path / "state.json.corrupt-1718000000"
    blocker.mkdir()
    (blocker / "keep").write_text("")  # a non-empty directory cannot be replaced by a file

    result = load_state(path, now=lambda: NOW)

    assert result.snapshot == StateSnapshot() and result.moved_to is None
    assert result.problem is not None and "could not move it aside" in result.problem
    assert path.read_text() == "{"


def test_records_with_invalid_ids_are_skipped_and_the_rest_loads(tmp_path: Path) -> None:
    """Bad ids (empty, too long, control characters, duplicates) are skipped and counted only."""
    good = minimal_record("good")
    bad = [minimal_record(""), minimal_record("x" * 256), minimal_record("a\nb")]
    path = tmp_path / "state.json"
    save_state(path, StateSnapshot((*bad, good, minimal_record("good")), {"\x1b[31m": NOW}))

    result = load_state(path)

    assert result.snapshot.uploads == (good,)
    assert result.snapshot.retired == {}
    assert result.problem is not None and "skipped 5 invalid entries" in result.problem
    assert result.skipped == 5
    assert result.moved_to is None and path.exists()


def test_an_id_of_255_characters_is_kept(tmp_path: Path) -> None:
    """The API's limit is inclusive."""
    record = minimal_record("x" * 255)
    path = tmp_path / "state.json"
    save_state(path, StateSnapshot((record,)))
    assert load_state(path).snapshot.uploads == (record,)


def test_save_leaves_no_temp_files_behind(tmp_path: Path) -> None:
    """After saves, the directory holds only the state file."""
    path = tmp_path / "state.json"
    for i in range(3):
        save_state(path, StateSnapshot((minimal_record(f"id-{i}"),)))
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_save_replaces_the_file_instead_of_rewriting_it(tmp_path: Path) -> None:
    """A save swaps in a new inode, so a reader of the old file never sees a partial write."""
    path = tmp_path / "state.json"
    save_state(path, StateSnapshot((minimal_record("old"),)))
    old_content = path.read_bytes()
    os.link(path, tmp_path / "old-inode")

    save_state(path, StateSnapshot((minimal_record("new"),)))

    assert (tmp_path / "old-inode").read_bytes() == old_content
    assert load_state(path).snapshot.uploads == (minimal_record("new"),)


def test_failed_save_removes_its_temp_file_and_raises(tmp_path: Path) -> None:
    """When the rename fails, the OSError propagates and no temp file is left."""
    path = tmp_path / "state.json"
    path.mkdir()
    with pytest.raises(OSError, match="directory"):
        save_state(path, StateSnapshot((minimal_record(),)))
    assert temp_files(tmp_path) == []


def test_load_removes_temp_files_left_by_an_interrupted_save(tmp_path: Path) -> None:
    """Temp files from a save killed before its rename are cleaned at the next start."""
    path = tmp_path / "state.json"
    save_state(path, StateSnapshot((minimal_record(),)))
    (tmp_path / ".state.json.abc123.tmp").write_text('{"half')
    (tmp_path / "unrelated.tmp").write_text("")
    assert load_state(path).problem is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "unrelated.tmp"]


CRASH_LOOP = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from exporter.state import StateSnapshot, UploadRecord, save_state

    path = Path(sys.argv[1])
    generation = 0
    while True:
        generation += 1
        uploads = tuple(
            UploadRecord(f"id-{generation}-{k}", ("api",), {"pad": "x" * k}, "INQUEUE", 1.0, 2.0)
            for k in range(generation % 60 + 1)
        )
        save_state(path, StateSnapshot(uploads, {f"gen-{generation}": 3.0}))
        if generation == 1:
            print("saved", flush=True)
    """
)


def test_state_file_survives_sigkill_at_random_moments(tmp_path: Path) -> None:
    """A writer killed mid-save 20 times never leaves a file that fails to load."""
    path = tmp_path / "state.json"
    rng = random.Random(20240611)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(20):
        child = subprocess.Popen(
            [sys.executable, "-c", CRASH_LOOP, str(path)],
            stdout=subprocess.PIPE,
            env=env,
            cwd=ROOT,
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == b"saved\n"
            time.sleep(rng.uniform(0.0, 0.03))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            if child.stdout is not None:
                child.stdout.close()
        assert child.returncode == -signal.SIGKILL

        result = load_state(path)

        assert result.problem is None and result.moved_to is None
        uploads = result.snapshot.uploads
        (generation,) = {u.ingestion_id.split("-")[1] for u in uploads}
        assert len(uploads) == int(generation) % 60 + 1
        assert result.snapshot.retired == {f"gen-{generation}": 3.0}
    assert temp_files(tmp_path) == []


# -- the writer ---------------------------------------------------------------------------------


class Counted:
    """A snapshot callable over a mutable list of records that counts its calls."""

    def __init__(self) -> None:
        self.records: list[UploadRecord] = []
        self.calls = 0
        self.called = asyncio.Event()

    def __call__(self) -> StateSnapshot:
        self.calls += 1
        self.called.set()
        return StateSnapshot(tuple(self.records))


async def stop(task: asyncio.Task[None]) -> None:
    """Cancel the writer's run() and wait for its final write."""
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_writer_coalesces_many_changes_into_few_writes(tmp_path: Path) -> None:
    """A burst of mark_dirty calls within the debounce becomes one write."""
    path = tmp_path / "state.json"
    state = Counted()
    writer = StateWriter(path, state, debounce_seconds=0.1)
    task = asyncio.create_task(writer.run())
    for i in range(100):
        state.records.append(minimal_record(f"id-{i}"))
        writer.mark_dirty()
        if i % 20 == 0:
            await asyncio.sleep(0)
    await asyncio.sleep(0.3)
    assert state.calls == 1
    assert len(load_state(path).snapshot.uploads) == 100
    await stop(task)
    assert state.calls == 1  # nothing changed since, so no final write


async def test_writer_writes_within_the_debounce_when_changes_keep_coming(tmp_path: Path) -> None:
    """A steady stream of changes does not postpone writing forever."""
    path = tmp_path / "state.json"
    state = Counted()
    writer = StateWriter(path, state, debounce_seconds=0.05)
    task = asyncio.create_task(writer.run())
    for i in range(30):
        state.records = [minimal_record(f"id-{i}")]
        writer.mark_dirty()
        await asyncio.sleep(0.01)
    assert 2 <= state.calls < 30
    await stop(task)
    assert load_state(path).snapshot.uploads == (minimal_record("id-29"),)


async def test_flush_returns_after_the_file_holds_a_change_made_before_it(tmp_path: Path) -> None:
    """flush() does not wait the debounce, and the file has the change when it returns."""
    path = tmp_path / "state.json"
    state = Counted()
    writer = StateWriter(path, state, debounce_seconds=60.0)
    task = asyncio.create_task(writer.run())
    await asyncio.sleep(0)
    state.records.append(minimal_record("first"))
    writer.mark_dirty()

    await asyncio.wait_for(writer.flush(), timeout=2.0)

    assert load_state(path).snapshot.uploads == (minimal_record("first"),)
    await stop(task)
    assert state.calls == 1


async def test_flush_works_without_the_background_loop(tmp_path: Path) -> None:
    """flush() writes by itself, so it is usable before run() starts or after it stopped."""
    path = tmp_path / "state.json"
    state = Counted()
    state.records.append(minimal_record())
    await StateWriter(path, state).flush()
    assert load_state(path).snapshot.uploads == (minimal_record(),)


async def test_concurrent_flushes_share_one_write(tmp_path: Path) -> None:
    """Flushes asked for before a write takes its snapshot are answered by that one write."""
    state = Counted()
    writer = StateWriter(tmp_path / "state.json", state)
    await asyncio.gather(*(writer.flush() for _ in range(5)))
    assert state.calls == 1


async def test_flush_during_a_write_waits_for_the_next_one(tmp_path: Path) -> None:
    """A change made while a write is in progress is not acknowledged by that write."""
    path = tmp_path / "state.json"
    state = Counted()
    writer = StateWriter(path, state)
    first = asyncio.create_task(writer.flush())
    await state.called.wait()
    state.records.append(minimal_record("late"))
    writer.mark_dirty()
    await asyncio.gather(*(writer.flush() for _ in range(3)), first)
    assert state.calls == 2
    assert load_state(path).snapshot.uploads == (minimal_record("late"),)


async def test_failed_write_reports_and_a_later_flush_succeeds(tmp_path: Path) -> None:
    """A failing write calls on_error and fails its flush; once fixed, the next flush writes."""
    path = tmp_path / "state.json"
    path.mkdir()  # os.replace cannot put a file over a directory
    errors: list[Exception] = []
    state = Counted()
    state.records.append(minimal_record())
    writer = StateWriter(path, state, on_error=errors.append)

    with pytest.raises(StateError, match="could not write the state file") as raised:
        await writer.flush()

    assert len(errors) == 1 and isinstance(errors[0], OSError)
    assert raised.value.__cause__ is errors[0]
    assert temp_files(tmp_path) == []
    path.rmdir()
    await writer.flush()
    assert load_state(path).snapshot.uploads == (minimal_record(),)


async def test_background_loop_retries_a_failed_write(tmp_path: Path) -> None:
    """run() keeps failed state dirty and writes it once the fault is gone, not in a hot loop."""
    path = tmp_path / "state.json"
    path.mkdir()
    errors: list[Exception] = []
    state = Counted()
    state.records.append(minimal_record())
    writer = StateWriter(
        path, state, debounce_seconds=0.01, on_error=errors.append, min_retry_seconds=0.1
    )
    task = asyncio.create_task(writer.run())
    writer.mark_dirty()
    await asyncio.sleep(0.35)
    assert 2 <= len(errors) <= 4  # retried, at most once per 0.1 s
    path.rmdir()
    await asyncio.sleep(0.2)
    assert load_state(path).snapshot.uploads == (minimal_record(),)
    calls = state.calls
    await asyncio.sleep(0.15)
    assert state.calls == calls  # clean again: no more writes
    await stop(task)


async def test_failing_snapshot_and_failing_callback_do_not_stop_the_writer(
    tmp_path: Path,
) -> None:
    """An exception from the snapshot callable or from on_error is reported, not raised."""
    path = tmp_path / "state.json"
    fail = True

    def snapshot() -> StateSnapshot:
        if fail:
            raise RuntimeError("store is broken")
        return StateSnapshot((minimal_record(),))

    def on_error(exc: Exception) -> None:
        raise ValueError("callback is broken too")

    writer = StateWriter(path, snapshot, on_error=on_error)
    with pytest.raises(StateError, match="store is broken"):
        await writer.flush()
    fail = False
    await writer.flush()
    assert load_state(path).snapshot.uploads == (minimal_record(),)


async def test_cancelled_flush_does_not_cancel_the_write(tmp_path: Path) -> None:
    """A caller that gives up waiting leaves the shared write to finish for everyone else."""
    path = tmp_path / "state.json"
    state = Counted()
    state.records.append(minimal_record())
    writer = StateWriter(path, state)
    impatient = asyncio.create_task(writer.flush())
    patient = asyncio.create_task(writer.flush())
    await asyncio.sleep(0)
    impatient.cancel()
    await patient
    assert impatient.cancelled()
    assert load_state(path).snapshot.uploads == (minimal_record(),)


async def test_cancelling_run_writes_the_final_dirty_state(tmp_path: Path) -> None:
    """Stopping the writer before the debounce ends still saves the last change."""
    path = tmp_path / "state.json"
    state = Counted()
    writer = StateWriter(path, state, debounce_seconds=60.0)
    task = asyncio.create_task(writer.run())
    await asyncio.sleep(0)
    state.records.append(minimal_record("last"))
    writer.mark_dirty()
    await asyncio.sleep(0.01)
    assert not path.exists()

    await stop(task)

    assert load_state(path).snapshot.uploads == (minimal_record("last"),)


async def test_a_failed_write_is_undone_before_the_next_write_takes_its_snapshot(
    tmp_path: Path,
) -> None:
    """A flush that fails runs its undo first: a write queued meanwhile never holds the change."""
    path = tmp_path / "state.json"
    path.mkdir()  # the first write fails: os.replace cannot put a file over a directory
    state = Counted()
    state.records.append(minimal_record("unacknowledged"))
    writer = StateWriter(path, state, on_error=lambda exc: path.rmdir())
    first = asyncio.create_task(writer.flush(undo=state.records.clear))
    await state.called.wait()  # the first write has taken its snapshot
    second = asyncio.create_task(writer.flush())  # joins the next write

    with pytest.raises(StateError):
        await first
    await second

    assert state.calls == 2
    assert load_state(path).snapshot.uploads == ()
