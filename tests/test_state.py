"""The state store: schema, untrusted content, migration, and the group-committing writer."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from exporter.state import (
    APPLICATION_ID,
    SCHEMA_VERSION,
    StateError,
    StateSnapshot,
    StateStore,
    UploadRecord,
    open_store,
)
from exporter.state_writer import StateWriter, UnavailableState, open_state
from exporter.tracking import (
    RETIRED_MEMORY_SECONDS,
    RETIRED_PRUNE_SECONDS,
    IngestionTracker,
    Source,
)
from exporter.uploads import UploadStore
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
V1_FILE = ROOT / "tests" / "data" / "state-v1.json"
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


def opened(path: Path) -> tuple[StateStore, StateSnapshot]:
    """Open the store, asserting it is available and was found without a problem."""
    store, result = open_store(path, now=lambda: NOW)
    assert store is not None, result.problem
    assert result.problem is None, result.problem
    return store, result.snapshot


def reopened(path: Path) -> StateSnapshot:
    """What a fresh start reads from `path`."""
    store, snapshot = opened(path)
    store.close()
    return snapshot


def saved(path: Path, *records: UploadRecord, retired: dict[str, float] | None = None) -> None:
    """A database at `path` holding exactly these records and retired ids."""
    store, _ = opened(path)
    store.apply([(r.ingestion_id, r) for r in records], list((retired or {}).items()))
    store.close()


def valid_document() -> dict[str, object]:
    """A valid release-1 JSON document, as JSON types, to break in one place."""
    return {
        "version": 1,
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


# -- the database -------------------------------------------------------------------------------


def test_a_new_store_has_the_documented_schema_in_wal_mode(tmp_path: Path) -> None:
    """application_id, user_version, WAL journal and both tables, as the docstring says."""
    path = tmp_path / "state.db"
    store, snapshot = opened(path)
    assert snapshot == StateSnapshot()
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA application_id").fetchone() == (APPLICATION_ID,)
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        tables = {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"uploads", "retired"}


def test_an_empty_file_is_taken_as_a_new_database(tmp_path: Path) -> None:
    """Zero bytes is what SQLite itself takes as an empty database: nothing is moved aside."""
    path = tmp_path / "state.db"
    path.touch()
    assert reopened(path) == StateSnapshot()
    assert [p.name for p in tmp_path.iterdir()] == ["state.db"]


def test_apply_then_reopen_round_trips_every_field_in_registration_order(tmp_path: Path) -> None:
    """Every field of every record and the retired ids come back; rows keep their first order."""
    path = tmp_path / "state.db"
    later = minimal_record("b-registered-first")
    saved(path, later, full_record(), retired={"gone": NOW - 5.0})
    saved(path, UploadRecord("b-registered-first", ("api",), {}, "DONE", NOW, NOW + 1))

    snapshot = reopened(path)

    assert [r.ingestion_id for r in snapshot.uploads] == [
        "b-registered-first",
        full_record().ingestion_id,
    ]
    assert snapshot.uploads[0].status == "DONE"  # an upsert, not a second row
    assert snapshot.uploads[1] == full_record()
    assert isinstance(snapshot.uploads[1].sources, tuple)
    assert snapshot.retired == {"gone": NOW - 5.0}


def test_apply_deletes_rows_and_retired_ids_given_as_none(tmp_path: Path) -> None:
    """A change to None deletes the row (or forgets the retired id)."""
    path = tmp_path / "state.db"
    saved(path, minimal_record("a"), minimal_record("b"), retired={"r1": NOW, "r2": NOW})
    store, _ = opened(path)
    store.apply([("a", None), ("never-there", None)], [("r1", None)])
    store.close()
    snapshot = reopened(path)
    assert [r.ingestion_id for r in snapshot.uploads] == ["b"]
    assert snapshot.retired == {"r2": NOW}


def test_a_batch_that_fails_leaves_nothing_of_itself_on_disk(tmp_path: Path) -> None:
    """A transaction refused (the database locked by another process) is rolled back whole."""
    path = tmp_path / "state.db"
    saved(path, minimal_record("before"))
    store, _ = open_store(path, busy_timeout_seconds=0.05)
    assert store is not None
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        store.apply([("new", minimal_record("new")), ("before", None)])
    lock.execute("ROLLBACK")
    lock.close()
    store.apply([("after", minimal_record("after"))])  # the store is usable again
    store.close()
    assert [r.ingestion_id for r in reopened(path).uploads] == ["before", "after"]


def test_an_id_of_255_characters_and_a_hostile_one_are_kept(tmp_path: Path) -> None:
    """The API's limit is inclusive, and ids are data, never SQL."""
    records = (minimal_record("x" * 255), minimal_record("'); DROP TABLE uploads; --"))
    path = tmp_path / "state.db"
    saved(path, *records)
    assert reopened(path).uploads == records


BAD_ROWS = {
    "id empty": ("ingestion_id", ""),
    "id with a control character": ("ingestion_id", "a\nb"),
    "id a blob": ("ingestion_id", b"id"),
    "sources not JSON": ("sources", "[api"),
    "sources an object": ("sources", "{}"),
    "sources holding a number": ("sources", '["api", 1]'),
    "labels a list": ("labels", '["team"]'),
    "label value a number": ("labels", '{"team": 1}'),
    "status a blob": ("status", b"DONE"),
    "first_seen text": ("first_seen", "now"),
    "first_seen infinite": ("first_seen", float("inf")),
    "last_success text": ("last_success", "x"),
    "flag 2": ("released", 2),
    "flag text": ("report_available", "yes"),
}


@pytest.mark.parametrize(("column", "bad"), BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_a_bad_row_is_skipped_and_counted_and_the_others_load(
    tmp_path: Path, column: str, bad: object
) -> None:
    """One row that fails its checks costs that row only; the file stays where it is."""
    path = tmp_path / "state.db"
    saved(path, minimal_record("good-1"), minimal_record("bad"), minimal_record("good-2"))
    with sqlite3.connect(path) as db:
        # The column name comes from the table above, never from data.
        db.execute(f"UPDATE uploads SET {column} = ? WHERE ingestion_id = 'bad'", (bad,))  # noqa: S608

    store, result = open_store(path)

    assert store is not None and result.available and result.moved_to is None
    assert [r.ingestion_id for r in result.snapshot.uploads] == ["good-1", "good-2"]
    assert result.skipped == 1
    assert result.problem is not None and "skipped 1 invalid rows" in result.problem
    store.close()


def test_a_bad_retired_row_is_skipped_and_counted(tmp_path: Path) -> None:
    """A retired id that is not a valid id, or whose time is not a number, is skipped."""
    path = tmp_path / "state.db"
    saved(path, retired={"kept": NOW, "x": NOW, "\x1b[31m": NOW})
    with sqlite3.connect(path) as db:
        db.execute("UPDATE retired SET retired_at = 'yesterday' WHERE ingestion_id = 'x'")
    store, result = open_store(path)
    assert store is not None
    assert result.snapshot.retired == {"kept": NOW} and result.skipped == 2
    store.close()


# -- what is at the path ------------------------------------------------------------------------


def _damaged_database(path: Path) -> bytes:
    saved(path, *(minimal_record(f"id-{i}") for i in range(300)))
    data = bytearray(path.read_bytes())
    data[100:4096] = b"\xa5" * (4096 - 100)  # the header page's b-tree, trampled
    data[4096 * 2 : 4096 * 3] = b"\x5a" * 4096
    return bytes(data)


CORRUPT_FILES: dict[str, Callable[[Path], bytes]] = {
    "not JSON": lambda _: b"{not json",
    "invalid UTF-8": lambda _: b"\xff\xfe{}",
    "top-level list": lambda _: b"[]",
    "deeply nested": lambda _: b"[" * 100_000,
    "JSON of another version": lambda _: json.dumps({**valid_document(), "version": 2}).encode(),
    "JSON uploads an object": lambda _: json.dumps({**valid_document(), "uploads": {}}).encode(),
    "JSON retired a list": lambda _: json.dumps({**valid_document(), "retired": []}).encode(),
    "SQLite header then garbage": lambda _: b"SQLite format 3\x00" + b"\x01" * 5000,
    "damaged database": _damaged_database,
}


@pytest.mark.parametrize("make", CORRUPT_FILES.values(), ids=CORRUPT_FILES.keys())
def test_a_corrupt_file_is_moved_aside_and_a_new_database_made(
    tmp_path: Path, make: Callable[[Path], bytes]
) -> None:
    """A file that is neither sound state nor release-1 JSON is renamed, never half-used."""
    path = tmp_path / "state.db"
    data = make(path)
    path.write_bytes(data)
    for stale in tmp_path.glob("state.db-*"):
        stale.unlink()

    store, result = open_store(path, now=lambda: NOW + 0.9)

    assert store is not None and result.available
    assert result.snapshot == StateSnapshot()
    assert result.moved_to == tmp_path / "state.db.corrupt-1718000000"
    assert result.moved_to.read_bytes() == data
    assert result.problem is not None and "moved it to" in result.problem
    store.apply([("new", minimal_record("new"))])
    store.close()
    assert [r.ingestion_id for r in reopened(path).uploads] == ["new"]


def test_a_database_of_another_application_is_moved_aside(tmp_path: Path) -> None:
    """A sound SQLite file that is not ours is not written into: it is set aside whole."""
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
        db.execute("INSERT INTO notes VALUES ('mine')")
    store, result = open_store(path, now=lambda: NOW)
    assert store is not None and result.moved_to is not None
    with sqlite3.connect(result.moved_to) as db:
        assert db.execute("SELECT text FROM notes").fetchall() == [("mine",)]
    store.close()


def _ours_but(schema_sql: str) -> Callable[[Path], None]:
    """A database with our application_id and version, but this schema."""

    def make(path: Path) -> None:
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
            db.executescript(schema_sql)
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute(
                "INSERT INTO uploads VALUES ('kept', '[\"api\"]', '{}', 'INQUEUE', 1, 1, "
                "NULL, NULL, 0, 0, 0)"
            )

    return make


_UPLOADS_WITHOUT_UNIQUE = """
CREATE TABLE uploads (ingestion_id TEXT NOT NULL, sources TEXT NOT NULL, labels TEXT NOT NULL,
    status TEXT NOT NULL, first_seen REAL NOT NULL, status_changed REAL NOT NULL,
    last_success REAL, terminal_at REAL, report_available INTEGER NOT NULL,
    queue_observed INTEGER NOT NULL, released INTEGER NOT NULL);
"""
_RETIRED = "CREATE TABLE retired (ingestion_id TEXT PRIMARY KEY, retired_at REAL NOT NULL) "
_UPLOADS = _UPLOADS_WITHOUT_UNIQUE.replace(
    "ingestion_id TEXT NOT NULL,", "ingestion_id TEXT NOT NULL UNIQUE,"
)
FOREIGN_SCHEMAS = {
    "uploads without UNIQUE": _ours_but(_UPLOADS_WITHOUT_UNIQUE + _RETIRED + "WITHOUT ROWID;"),
    "retired with rowid": _ours_but(_UPLOADS + _RETIRED + ";"),
    "an extra trigger": _ours_but(
        _UPLOADS
        + _RETIRED
        + "WITHOUT ROWID; CREATE TRIGGER keep BEFORE DELETE ON uploads "
        + "BEGIN SELECT RAISE(FAIL, 'no'); END;"
    ),
}


@pytest.mark.parametrize("make", FOREIGN_SCHEMAS.values(), ids=FOREIGN_SCHEMAS.keys())
def test_a_database_of_ours_with_another_schema_is_moved_aside_not_used(
    tmp_path: Path, make: Callable[[Path], None]
) -> None:
    """application_id and version are not enough: a schema that differs, constraints
    included, is set aside like a corrupt file, and the new database takes commits."""
    path = tmp_path / "state.db"
    make(path)

    store, result = open_store(path, now=lambda: NOW)

    assert store is not None and result.moved_to == tmp_path / "state.db.corrupt-1718000000"
    assert result.problem is not None and "not this exporter's" in result.problem
    with contextlib.closing(sqlite3.connect(result.moved_to)) as db:
        assert db.execute("SELECT ingestion_id FROM uploads").fetchall() == [("kept",)]
    store.apply([("new", minimal_record("new"))])
    store.apply([("new", minimal_record("new"))])  # an upsert: needs the UNIQUE constraint
    store.close()
    assert [r.ingestion_id for r in reopened(path).uploads] == ["new"]


def test_the_schema_check_accepts_our_own_database_whatever_its_statistics(tmp_path: Path) -> None:
    """An ANALYZE run by hand adds sqlite_stat tables: the database is still ours."""
    path = tmp_path / "state.db"
    saved(path, minimal_record("kept"))
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("ANALYZE")

    assert [r.ingestion_id for r in reopened(path).uploads] == ["kept"]


def _delete(path: Path) -> None:
    path.unlink()


def _delete_with_wal(path: Path) -> None:
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        name.unlink()


def _replace(path: Path) -> None:
    Path(f"{path}.other").write_text("someone else's")
    os.replace(f"{path}.other", path)


def _delete_wal(path: Path) -> None:
    Path(f"{path}-wal").unlink()


SWAPS: dict[str, Callable[[Path], None]] = {
    "deleted": _delete,
    "deleted with its WAL": _delete_with_wal,
    "replaced": _replace,
    "WAL deleted": _delete_wal,
}


@pytest.mark.parametrize("swap", SWAPS.values(), ids=SWAPS.keys())
def test_a_state_file_deleted_or_replaced_while_open_gets_every_commit_anew(
    tmp_path: Path, swap: Callable[[Path], None]
) -> None:
    """The next commit notices, writes the open database to the path and commits there:
    a restart finds every row committed before and after; a file found there is kept."""
    path = tmp_path / "state.db"
    store, _ = opened(path)
    store.apply([(f"before-{n}", minimal_record(f"before-{n}")) for n in range(5)])

    swap(path)
    note = store.apply([(f"after-{n}", minimal_record(f"after-{n}")) for n in range(20)])
    again = store.apply([("later", minimal_record("later"))])
    store.close()

    expected = {f"before-{n}" for n in range(5)} | {f"after-{n}" for n in range(20)} | {"later"}
    assert {r.ingestion_id for r in reopened(path).uploads} == expected
    assert note is not None and "written anew" in note
    assert again is None  # checked, and the same file: nothing to do
    kept = list(tmp_path.glob("state.db.replaced-*"))
    if swap is _replace:
        assert [k.read_text() for k in kept] == ["someone else's"]
        assert "moved to" in note
    else:
        assert kept == []
    assert not Path(f"{path}.reopening").exists()


def test_a_state_file_deleted_after_the_last_commit_is_written_anew_by_check_file(
    tmp_path: Path,
) -> None:
    """check_file (the idle writer's check) finds the deletion without any commit."""
    path = tmp_path / "state.db"
    store, _ = opened(path)
    store.apply([("kept", minimal_record("kept"))])
    assert store.check_file() is None

    path.unlink()
    note = store.check_file()
    store.close()

    assert note is not None and "deleted" in note
    assert [r.ingestion_id for r in reopened(path).uploads] == ["kept"]


def test_a_copy_left_by_a_death_before_it_took_the_path_becomes_the_state(tmp_path: Path) -> None:
    """`<path>.reopening` with nothing at the path is the whole state: the start uses it."""
    path = tmp_path / "state.db"
    saved(Path(f"{path}.reopening"), minimal_record("only-here"))

    assert [r.ingestion_id for r in reopened(path).uploads] == ["only-here"]
    assert not Path(f"{path}.reopening").exists()


def test_quick_check_finds_pages_damaged_while_open(tmp_path: Path) -> None:
    """Damage written to the file under an open store is found by quick_check, not only
    at the next start (pages already read are not checked from the page cache)."""
    path = tmp_path / "state.db"
    store, _ = opened(path)
    store.apply([(f"id-{n}", minimal_record(f"id-{n}")) for n in range(3000)])
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert store.quick_check() is None

    with path.open("r+b") as file:
        file.seek(4096 * 3)
        file.write(b"\x5a" * 4096)
    problem = store.quick_check()
    store.close()

    assert problem is not None


def test_a_database_of_a_newer_schema_is_left_alone(tmp_path: Path) -> None:
    """A later release's database is neither moved nor written: persistence is unavailable."""
    path = tmp_path / "state.db"
    saved(path, minimal_record("from-the-future"))
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    before = path.read_bytes()

    store, result = open_store(path)

    assert store is None and not result.available and result.moved_to is None
    assert result.problem is not None and "newer" in result.problem
    assert path.read_bytes() == before


def test_a_corrupt_file_that_cannot_be_moved_leaves_persistence_unavailable(
    tmp_path: Path,
) -> None:
    """When even the rename fails, nothing is overwritten: no store, and the problem says so."""
    path = tmp_path / "state.db"
    path.write_text("{")
    blocker = tmp_path / "state.db.corrupt-1718000000"
    blocker.mkdir()
    (blocker / "keep").write_text("")  # a non-empty directory cannot be replaced by a file

    store, result = open_store(path, now=lambda: NOW)

    assert store is None and not result.available and result.moved_to is None
    assert result.problem is not None and "could not move it aside" in result.problem
    assert path.read_text() == "{"


def test_a_directory_at_the_state_path_is_unavailable_and_left_alone(tmp_path: Path) -> None:
    """A directory where the file should be is not moved: persistence is unavailable."""
    path = tmp_path / "state.db"
    path.mkdir()
    (path / "inside").write_text("kept")
    store, result = open_store(path, now=lambda: NOW)
    assert store is None and not result.available
    assert result.problem is not None and "could not be read" in result.problem
    assert "directory" in result.problem
    assert result.moved_to is None and (path / "inside").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.db"]


def test_a_fifo_at_the_state_path_is_unavailable_without_blocking(tmp_path: Path) -> None:
    """A FIFO (no writer) is neither opened for a blocking read nor moved."""
    path = tmp_path / "state.db"
    os.mkfifo(path)
    store, result = open_store(path, now=lambda: NOW)
    assert store is None and not result.available and result.moved_to is None
    assert result.problem is not None and "not a regular file" in result.problem
    assert path.is_fifo()


def test_open_removes_temp_files_of_an_interrupted_release_1_save(tmp_path: Path) -> None:
    """Release 1's `.state.db.<random>.tmp` files are cleaned at start; others are not."""
    path = tmp_path / "state.db"
    (tmp_path / ".state.db.abc123.tmp").write_text('{"half')
    (tmp_path / "unrelated.tmp").write_text("")
    reopened(path)
    assert sorted(p.name for p in tmp_path.iterdir() if "wal" not in p.name) == [
        "state.db",
        "unrelated.tmp",
    ]


# -- migration from release 1's JSON file -------------------------------------------------------


def test_a_release_1_json_file_is_migrated_with_nothing_lost(tmp_path: Path) -> None:
    """A file written by release 1's save_state (tests/data) loads whole, field for field."""
    path = tmp_path / "state.json"
    shutil.copyfile(V1_FILE, path)
    document = json.loads(V1_FILE.read_text())

    store, result = open_store(path, now=lambda: NOW)

    assert store is not None and result.problem is None and result.skipped == 0
    assert result.migrated_from == tmp_path / "state.json.v1.json"
    assert result.migrated_from.read_bytes() == V1_FILE.read_bytes()
    assert path.read_bytes().startswith(b"SQLite format 3\x00")
    expected = [
        UploadRecord(
            ingestion_id=u["ingestion_id"],
            sources=tuple(u["sources"]),
            labels=u["labels"],
            status=u["status"],
            first_seen=u["first_seen"],
            status_changed=u["status_changed"],
            last_success=u["last_success"],
            terminal_at=u["terminal_at"],
            report_available=u["report_available"],
            queue_observed=u["queue_observed"],
            released=u["released"],
        )
        for u in document["uploads"]
    ]
    assert list(result.snapshot.uploads) == expected
    assert dict(result.snapshot.retired) == document["retired"]
    store.close()
    again, second = open_store(path)  # the next start reads the database: no second migration
    assert again is not None and second.migrated_from is None
    assert second.snapshot == result.snapshot
    again.close()


def test_a_migration_interrupted_before_its_rename_is_done_again(tmp_path: Path) -> None:
    """A half-built database left by a crash is discarded; the JSON at the path is migrated."""
    path = tmp_path / "state.json"
    shutil.copyfile(V1_FILE, path)
    (tmp_path / "state.json.migrating").write_bytes(b"SQLite format 3\x00" + b"\x00" * 100)
    (tmp_path / "state.json.v1.json").write_text("an older backup")

    store, result = open_store(path)

    assert store is not None and result.migrated_from is not None
    assert len(result.snapshot.uploads) == len(json.loads(V1_FILE.read_text())["uploads"])
    assert not (tmp_path / "state.json.migrating").exists()
    assert result.migrated_from.read_bytes() == V1_FILE.read_bytes()
    store.close()


BAD_ENTRIES = {
    "retired time a string": ("retired", "old", "yesterday"),
    "id a number": ("uploads", "ingestion_id", 7),
    "status null": ("uploads", "status", None),
    "first_seen a bool": ("uploads", "first_seen", True),
    "first_seen huge int": ("uploads", "first_seen", 10**400),
    "sources a string": ("uploads", "sources", "api"),
    "label value a number": ("uploads", "labels", {"team": 1}),
    "flag a number": ("uploads", "report_available", 1),
}


@pytest.mark.parametrize(("where", "key", "bad"), BAD_ENTRIES.values(), ids=BAD_ENTRIES.keys())
def test_a_bad_json_entry_is_skipped_and_counted_and_the_rest_migrated(
    tmp_path: Path, where: str, key: str, bad: object
) -> None:
    """One entry of the JSON file that fails its checks is skipped; the rest is migrated."""
    document = valid_document()
    good = {**document["uploads"][0], "ingestion_id": "good"}  # type: ignore[index]
    if where == "retired":
        document["retired"] = {key: bad, "kept": NOW}
    else:
        document["uploads"][0][key] = bad  # type: ignore[index]
    document["uploads"].append(good)  # type: ignore[attr-defined]
    path = tmp_path / "state.json"
    path.write_text(json.dumps(document))

    store, result = open_store(path)

    assert store is not None and result.skipped == 1 and result.moved_to is None
    assert result.problem is not None and "skipped 1 invalid entries" in result.problem
    assert "good" in [r.ingestion_id for r in result.snapshot.uploads]
    store.close()


# -- crashes ------------------------------------------------------------------------------------

CRASH_LOOP = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from exporter.state import UploadRecord, open_store

    store, result = open_store(Path(sys.argv[1]))
    assert store is not None, result.problem
    generation = 0
    while True:
        generation += 1
        size = generation % 60 + 1
        labels = {"gen": str(generation)}
        batch = [
            (f"id-{k}", UploadRecord(f"id-{k}", ("api",), labels, "INQUEUE", 1.0, 2.0))
            for k in range(size)
        ]
        batch += [(f"id-{k}", None) for k in range(size, 61)]
        store.apply(batch, [("gen", float(generation))])
        if generation == 1:
            print("committed", flush=True)
    """
)


@pytest.mark.slow
def test_the_database_survives_sigkill_at_random_moments(tmp_path: Path) -> None:
    """A writer killed mid-commit 20 times never leaves a half batch or an unreadable file."""
    path = tmp_path / "state.db"
    rng = random.Random(20240611)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(20):
        child = subprocess.Popen(
            [sys.executable, "-c", CRASH_LOOP, str(path)], stdout=subprocess.PIPE, env=env, cwd=ROOT
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == b"committed\n"
            time.sleep(rng.uniform(0.0, 0.05))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            if child.stdout is not None:
                child.stdout.close()
        assert child.returncode == -signal.SIGKILL

        snapshot = reopened(path)

        generation = int(snapshot.retired["gen"])
        assert len(snapshot.uploads) == generation % 60 + 1
        assert {r.labels["gen"] for r in snapshot.uploads} == {str(generation)}
    assert not list(tmp_path.glob("*.corrupt-*"))


# -- the writer ---------------------------------------------------------------------------------


class Memory:
    """The in-memory side the writer reads rows from, counting what it is asked for."""

    def __init__(self) -> None:
        self.records: dict[str, UploadRecord] = {}
        self.retired: dict[str, float] = {}
        self.asked: list[str] = []

    def record(self, ingestion_id: str) -> UploadRecord | None:
        self.asked.append(ingestion_id)
        return self.records.get(ingestion_id)

    def put(self, *ingestion_ids: str) -> list[str]:
        for ingestion_id in ingestion_ids:
            self.records[ingestion_id] = minimal_record(ingestion_id)
        return list(ingestion_ids)


Start = Callable[..., Awaitable[tuple[StateWriter, Memory]]]


@pytest.fixture
async def start_writer(tmp_path: Path) -> AsyncIterator[Start]:
    """A writer over a fresh database in tmp_path with run() going; stopped after the test."""
    tasks: list[asyncio.Task[None]] = []

    async def start(**options: Any) -> tuple[StateWriter, Memory]:
        memory = Memory()
        writer, result = await open_state(
            tmp_path / "state.db",
            record=memory.record,
            retired_at=memory.retired.get,
            busy_timeout_seconds=0.05,
            **options,
        )
        assert writer is not None, result.problem
        tasks.append(asyncio.get_running_loop().create_task(writer.run()))
        return writer, memory

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def locked(path: Path) -> sqlite3.Connection:
    """Another connection holding the write lock: the writer's commits fail, for real."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")
    return db


def on_disk(path: Path) -> list[str]:
    """The ids the database holds now, read through a connection of our own."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [i for (i,) in db.execute("SELECT ingestion_id FROM uploads ORDER BY rowid")]


async def test_concurrent_flushes_are_committed_together(start_writer: Start) -> None:
    """50 acknowledgements asked for at once cost at most two commits (group commit)."""
    writer, memory = await start_writer(debounce_seconds=60.0)

    async def register(n: int) -> None:
        writer.mark(memory.put(f"id-{n}"))
        await writer.flush()

    await asyncio.gather(*(register(n) for n in range(50)))

    assert writer.commits <= 2
    assert sorted(on_disk(writer.path)) == sorted(f"id-{n}" for n in range(50))


async def test_a_commit_costs_only_the_ids_marked(start_writer: Start) -> None:
    """With 10,000 rows tracked, a change to three of them asks for three rows, not all."""
    writer, memory = await start_writer(debounce_seconds=60.0)
    writer.mark(memory.put(*(f"id-{n}" for n in range(10_000))))
    await writer.flush()
    memory.asked.clear()

    writer.mark(["id-1", "id-5000", "id-9999"])
    await writer.flush()

    assert sorted(memory.asked) == ["id-1", "id-5000", "id-9999"]


async def test_marked_changes_are_committed_within_the_debounce_and_coalesced(
    start_writer: Start,
) -> None:
    """A burst of marks without a flush becomes one commit after the debounce."""
    writer, memory = await start_writer(debounce_seconds=0.1)
    for n in range(100):
        writer.mark(memory.put(f"id-{n}"))
        if n % 20 == 0:
            await asyncio.sleep(0)
    assert writer.commits == 0

    async def committed() -> bool:
        return writer.commits >= 1

    await wait_for(committed, interval=0.01)
    assert writer.commits == 1 and len(on_disk(writer.path)) == 100


async def test_flush_does_not_wait_for_the_debounce(start_writer: Start) -> None:
    """flush() commits at once, and the file has the change when it returns."""
    writer, memory = await start_writer(debounce_seconds=60.0)
    writer.mark(memory.put("first"))
    await asyncio.wait_for(writer.flush(), timeout=5.0)
    assert on_disk(writer.path) == ["first"]


async def test_a_row_gone_from_memory_is_deleted(start_writer: Start) -> None:
    """An id marked after it left memory has its row deleted."""
    writer, memory = await start_writer(debounce_seconds=60.0)
    writer.mark(memory.put("a", "b"))
    await writer.flush()
    del memory.records["a"]
    writer.mark(["a"])
    await writer.flush()
    assert on_disk(writer.path) == ["b"]


async def test_a_failed_commit_undoes_raises_and_reports(start_writer: Start) -> None:
    """A refused commit: every joined flush runs its undo and raises; on_error hears of it."""
    errors: list[Exception] = []
    writer, memory = await start_writer(debounce_seconds=60.0, on_error=errors.append)
    lock = locked(writer.path)
    undone: list[str] = []

    async def register(ingestion_id: str) -> None:
        writer.mark(memory.put(ingestion_id))
        await writer.flush(
            undo=lambda: undone.append(memory.records.pop(ingestion_id).ingestion_id)
        )

    results = await asyncio.gather(register("x"), register("y"), return_exceptions=True)

    assert all(isinstance(r, StateError) for r in results)
    assert sorted(undone) == ["x", "y"] and len(errors) >= 1
    assert isinstance(errors[0], sqlite3.OperationalError)
    lock.execute("ROLLBACK")
    lock.close()
    writer.mark(memory.put("z"))
    await writer.flush()
    assert on_disk(writer.path) == ["z"]


async def test_a_failed_commit_is_undone_before_the_next_batch_is_cut(
    start_writer: Start,
) -> None:
    """A flush queued while a failing commit runs never carries the undone change to disk."""
    lock: sqlite3.Connection | None = None

    def release(_: Exception) -> None:
        nonlocal lock
        if lock is not None:
            lock.execute("ROLLBACK")
            lock.close()
            lock = None

    writer, memory = await start_writer(debounce_seconds=60.0, on_error=release)
    lock = locked(writer.path)
    writer.mark(memory.put("unacknowledged"))
    asked_at_undo: list[str] = []

    def undo() -> None:
        asked_at_undo.extend(memory.asked)
        del memory.records["unacknowledged"]

    first = asyncio.create_task(writer.flush(undo=undo))

    async def first_batch_cut() -> bool:
        return memory.asked == ["unacknowledged"]

    # Looked at on every turn of the loop: the first batch's rows were just read, so its commit
    # is under way, and cannot end before its thread has waited out the lock.
    await wait_for(first_batch_cut, interval=0)
    writer.mark(memory.put("other"))
    second = asyncio.create_task(writer.flush())

    with pytest.raises(StateError):
        await first
    await second  # the lock went as the first commit failed: this one succeeds

    assert asked_at_undo == ["unacknowledged"]  # undone before the next batch was built
    assert on_disk(writer.path) == ["other"]


async def test_run_retries_a_failed_commit_but_not_in_a_hot_loop(start_writer: Start) -> None:
    """Marked changes whose commit failed are retried, at most once per min_retry_seconds,
    and not once more after they were written."""
    loop = asyncio.get_running_loop()
    failed_at: list[float] = []
    writer, memory = await start_writer(
        debounce_seconds=0.01,
        on_error=lambda _: failed_at.append(loop.time()),
        min_retry_seconds=0.2,
    )
    lock = locked(writer.path)
    writer.mark(memory.put("retried"))

    async def failed_thrice() -> bool:
        return len(failed_at) >= 3

    await wait_for(failed_thrice, interval=0.01)
    assert all(b - a >= 0.2 for a, b in itertools.pairwise(failed_at)), failed_at
    lock.execute("ROLLBACK")
    lock.close()

    async def written() -> bool:
        return on_disk(writer.path) == ["retried"]

    await wait_for(written, interval=0.01)
    commits, asked = writer.commits, memory.asked.count("retried")
    # Clean again: a sentinel flushed next is the only commit, and its batch does not hold
    # the retried id (left marked, it would have gone into one or the other).
    writer.mark(memory.put("sentinel"))
    await writer.flush()
    assert writer.commits == commits + 1
    assert memory.asked.count("retried") == asked
    assert sorted(on_disk(writer.path)) == ["retried", "sentinel"]


async def test_on_recovered_follows_the_first_commit_after_a_failure(start_writer: Start) -> None:
    """The writer says when it fails and when it writes again (what drives
    catalog_exporter_state_persistence_available), once each."""
    heard: list[str] = []
    writer, memory = await start_writer(
        debounce_seconds=60.0,
        on_error=lambda _: heard.append("failed"),
        on_recovered=lambda: heard.append("recovered"),
    )
    writer.mark(memory.put("first"))
    await writer.flush()
    lock = locked(writer.path)
    writer.mark(memory.put("refused"))
    with pytest.raises(StateError):
        await writer.flush()
    lock.execute("ROLLBACK")
    lock.close()
    for name in ("again", "and-again"):
        writer.mark(memory.put(name))
        await writer.flush()

    assert heard == ["failed", "recovered"]


async def test_an_idle_writer_writes_a_deleted_file_anew_within_file_check_seconds(
    start_writer: Start,
) -> None:
    """Nothing changes, the file is deleted: the writer's own check puts the state back."""
    reopens: list[str] = []
    writer, memory = await start_writer(
        debounce_seconds=60.0, file_check_seconds=0.01, on_reopened=reopens.append
    )
    writer.mark(memory.put("kept"))
    await writer.flush()
    writer.path.unlink()

    async def reopened_once() -> bool:
        return len(reopens) == 1

    await wait_for(reopened_once, interval=0.01)
    assert "deleted" in reopens[0]
    assert on_disk(writer.path) == ["kept"]


async def test_the_writer_runs_quick_check_on_its_cadence_and_reports_damage(
    start_writer: Start,
) -> None:
    """Damaged pages are reported while running (on_checked), not found at the next start."""
    checks: list[str | None] = []
    writer, memory = await start_writer(
        debounce_seconds=60.0, integrity_check_seconds=0.01, on_checked=checks.append
    )
    writer.mark(memory.put(*(f"id-{n}" for n in range(3000))))
    await writer.flush()

    async def checked_sound() -> bool:
        return None in checks

    await wait_for(checked_sound, interval=0.01)
    with contextlib.closing(sqlite3.connect(writer.path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with writer.path.open("r+b") as file:
        file.seek(4096 * 3)
        file.write(b"\x5a" * 4096)

    async def found_damage() -> bool:
        return any(problem is not None for problem in checks)

    await wait_for(found_damage, interval=0.01)


async def test_a_cancelled_flush_does_not_cancel_the_commit(start_writer: Start) -> None:
    """A caller that gives up waiting leaves the shared commit to finish for everyone else."""
    writer, memory = await start_writer(debounce_seconds=60.0)
    writer.mark(memory.put("a"))
    impatient = asyncio.create_task(writer.flush())
    patient = asyncio.create_task(writer.flush())
    await asyncio.sleep(0)
    impatient.cancel()
    await patient
    assert impatient.cancelled() and on_disk(writer.path) == ["a"]


async def test_stopping_commits_what_is_marked_and_refuses_later_flushes(
    tmp_path: Path,
) -> None:
    """Cancelling run() commits the last marks; a flush after that undoes and raises."""
    memory = Memory()
    writer, _ = await open_state(
        tmp_path / "state.db",
        record=memory.record,
        retired_at=memory.retired.get,
        debounce_seconds=60.0,
    )
    assert writer is not None
    task = asyncio.create_task(writer.run())
    await asyncio.sleep(0)
    writer.mark(memory.put("last"))
    memory.retired["old"] = NOW
    writer.mark_retired(["old"])
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert on_disk(tmp_path / "state.db") == ["last"]
    assert reopened(tmp_path / "state.db").retired == {"old": NOW}
    undone: list[bool] = []
    with pytest.raises(StateError, match="stopped"):
        await writer.flush(undo=lambda: undone.append(True))
    assert undone == [True]


@pytest.mark.parametrize("steps", range(6))
async def test_cancelling_run_during_the_debounce_cancels_it_even_as_a_flush_arrives(
    tmp_path: Path, steps: int
) -> None:
    """run() cancelled in its debounce, `steps` loop steps after a flush asked to cut it
    short, ends cancelled and closes the store (with the change committed). On 3.11,
    asyncio.wait_for returned the event's result and dropped a cancel that met it in one
    step: run() went on, and the exporter's stop waited for it forever."""
    memory = Memory()
    writer, _ = await open_state(
        tmp_path / "state.db",
        record=memory.record,
        retired_at=memory.retired.get,
        debounce_seconds=60.0,
    )
    assert writer is not None
    task = asyncio.create_task(writer.run())
    writer.mark(memory.put("marked"))
    for _ in range(10):  # run() wakes to the mark and waits out the debounce
        await asyncio.sleep(0)
    flushing = asyncio.create_task(writer.flush())
    for _ in range(steps):
        await asyncio.sleep(0)
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=5)  # the bound only limits a failure
    assert task in done, "run() swallowed the cancel and is still running"
    assert task.cancelled()
    await flushing
    assert on_disk(tmp_path / "state.db") == ["marked"]


async def test_without_persistence_every_flush_undoes_and_raises(tmp_path: Path) -> None:
    """The stand-in used when the path cannot be read refuses every acknowledgement."""
    state = UnavailableState(tmp_path / "state.db", "the path is a directory")
    undone: list[bool] = []
    state.mark(["ignored"])
    with pytest.raises(StateError, match="unavailable"):
        await state.flush(undo=lambda: undone.append(True))
    assert undone == [True]


# -- the tracker's side -------------------------------------------------------------------------


class Recorder:
    """A Persistence that records what the tracker marks (changes nothing, fails nothing)."""

    def __init__(self) -> None:
        self.marked: list[str] = []
        self.retired: list[str] = []

    def mark(self, ingestion_ids: Iterable[str]) -> None:
        self.marked.extend(ingestion_ids)

    def mark_retired(self, ingestion_ids: Iterable[str]) -> None:
        self.retired.extend(ingestion_ids)

    async def flush(self, undo: Callable[[], None] | None = None) -> None:
        return None


async def test_the_tracker_marks_only_what_changed_and_forgets_old_retired_ids() -> None:
    """A status change marks that id; a retirement its retired id; after 7 days it is forgotten."""
    now = [NOW]
    store = UploadStore(clock=lambda: now[0])
    tracker = IngestionTracker(
        store,
        max_tracked=100,
        label_names=(),
        on_added=lambda ids: None,
        on_removed=lambda ids: None,
        on_rejected=lambda reason: None,
        clock=lambda: now[0],
    )
    state = Recorder()
    tracker.attach_state(state)
    for n in range(50):
        await tracker.register(f"id-{n}", Source.DIRECTORY)
    state.marked.clear()

    tracker.changed("id-7")
    store.retire("id-8")
    tracker.changed("id-8")

    assert state.marked == ["id-7", "id-8"] and state.retired == ["id-8"]
    assert tracker.record("id-8") is None and tracker.retired_at("id-8") == NOW
    now[0] += RETIRED_MEMORY_SECONDS + RETIRED_PRUNE_SECONDS + 1
    tracker.changed("id-9")
    assert state.retired == ["id-8", "id-8"] and tracker.retired_at("id-8") is None
