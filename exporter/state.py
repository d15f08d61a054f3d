"""What survives a restart: the tracked uploads in an SQLite database, and reading them back.

This module owns the on-disk format: one row per tracked upload (and per retired id), written
per change; loading it without ever trusting it; and, on opening, the one-time migration of
release 1's JSON state file (whose format `state_migration` reads). It is blocking code for
one thread, the state writer's; it knows nothing of HTTP, polling, metrics or the event loop
(`state_writer` decides when to write).

The database, at `state.path` (with `<path>-wal` beside it while the exporter runs)::

    PRAGMA application_id = 0x43555845;  -- "CUXE"
    PRAGMA user_version = 1;
    CREATE TABLE uploads (ingestion_id TEXT NOT NULL UNIQUE, sources TEXT NOT NULL,
        labels TEXT NOT NULL, status TEXT NOT NULL, first_seen REAL NOT NULL,
        status_changed REAL NOT NULL, last_success REAL, terminal_at REAL,
        report_available INTEGER NOT NULL, queue_observed INTEGER NOT NULL,
        released INTEGER NOT NULL);
    CREATE TABLE retired (ingestion_id TEXT PRIMARY KEY, retired_at REAL NOT NULL);

`sources` is a JSON list of strings and `labels` a JSON object of strings; timestamps are
wall-clock seconds; rowid order is registration order. `retired` holds ids whose terminal
retention ended, so they are not polled again while a source still lists them. It runs in WAL
mode with synchronous=FULL: a commit has reached the disk when it returns.

Opening it never destroys anything. A path that exists but cannot be read (a directory, a FIFO,
no permission, a database of a newer release) gives no store: the caller runs without
persistence. A file that is neither a database nor JSON, or a damaged database, is renamed to
`<path>.corrupt-<unix time>` (its `-wal` with it) and a new database is made. A row that fails
its checks is skipped and counted, the others are kept. A JSON file of release 1 is migrated:
its content goes into a new database, the JSON is kept as `<path>.v1.json`, and only then does
the database take the path (a crash before that repeats the migration; nothing is lost).

The schema is checked whole, constraints included: a database whose `sqlite_master` differs
from the one above (a missing UNIQUE, an extra trigger) is not this exporter's and is moved
aside like a corrupt one. While open, each commit checks (two `stat` calls) that the path still
names the file that was opened, and its WAL: a file deleted or replaced under the running
exporter would take every later commit with it. If it was, the open (unlinked) database is
copied, with SQLite's backup, to `<path>.reopening`, that takes the path (a file someone put
there is kept as `<path>.replaced-<unix time>`) and is opened in its place.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sqlite3
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from exporter.models import ingestion_id_problem
from exporter.responses import clean_text, describe_error
from exporter.state_migration import (
    NotRelease1,
    keep_backup,
    read_release_1,
    remove_temp_files,
)

SCHEMA_VERSION = 1
APPLICATION_ID = 0x43555845

_SQLITE_HEADER = b"SQLite format 3\x00"
_SPACING = re.compile(r"\s+")
_MIGRATING_SUFFIX = ".migrating"
_REOPENING_SUFFIX = ".reopening"
#: SQLite result codes (the low byte) that mean the file is damaged, not out of reach.
_CORRUPT_CODES = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB

_SCHEMA = """
CREATE TABLE uploads (
    ingestion_id TEXT NOT NULL UNIQUE,
    sources TEXT NOT NULL,
    labels TEXT NOT NULL,
    status TEXT NOT NULL,
    first_seen REAL NOT NULL,
    status_changed REAL NOT NULL,
    last_success REAL,
    terminal_at REAL,
    report_available INTEGER NOT NULL,
    queue_observed INTEGER NOT NULL,
    released INTEGER NOT NULL
);
CREATE TABLE retired (ingestion_id TEXT PRIMARY KEY, retired_at REAL NOT NULL) WITHOUT ROWID;
"""
# Literal SQL only: no statement is ever built from data.
_UPSERT = """
INSERT INTO uploads (ingestion_id, sources, labels, status, first_seen, status_changed,
    last_success, terminal_at, report_available, queue_observed, released)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (ingestion_id) DO UPDATE SET sources = excluded.sources, labels = excluded.labels,
    status = excluded.status, first_seen = excluded.first_seen,
    status_changed = excluded.status_changed, last_success = excluded.last_success,
    terminal_at = excluded.terminal_at, report_available = excluded.report_available,
    queue_observed = excluded.queue_observed, released = excluded.released
"""
_SELECT_UPLOADS = """
SELECT rowid, ingestion_id, sources, labels, status, first_seen, status_changed, last_success,
    terminal_at, report_available, queue_observed, released
FROM uploads ORDER BY rowid
"""


@dataclass(frozen=True, slots=True)
class UploadRecord:
    """One tracked upload as persisted."""

    ingestion_id: str
    sources: tuple[str, ...]
    labels: Mapping[str, str]
    status: str
    first_seen: float
    status_changed: float
    last_success: float | None = None
    terminal_at: float | None = None
    report_available: bool = False
    queue_observed: bool = False
    released: bool = False


@dataclass(frozen=True, slots=True)
class StateSnapshot:
    """Everything the store holds: tracked uploads and ids whose retention ended."""

    uploads: tuple[UploadRecord, ...] = ()
    retired: Mapping[str, float] = field(default_factory=dict)


class StateError(Exception):
    """A change could not be made durable."""


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What opening the store found: a usable snapshot, and what was wrong if anything.

    `available` is False when the path exists but could not be read: it must then be neither
    moved nor overwritten. `skipped` counts the entries dropped while the rest was kept;
    `moved_to` is where a corrupt file went; `migrated_from` the JSON file of release 1 that
    was read into the new database.
    """

    snapshot: StateSnapshot
    problem: str | None = None
    moved_to: Path | None = None
    skipped: int = 0
    available: bool = True
    migrated_from: Path | None = None


class _Invalid(ValueError):
    """Content that does not have the expected shape."""


class _Corrupt(Exception):
    """The file is damaged or not ours: move it aside."""


class _Unavailable(Exception):
    """The file is out of reach: leave it alone."""


# -- the store ----------------------------------------------------------------------------------

UploadChange = tuple[str, UploadRecord | None]  #: the id, and its row (None: delete it)
RetiredChange = tuple[str, float | None]  #: the id, and when it retired (None: forget it)


class StateStore:
    """The open database: apply batches of changes, each as one transaction.

    Use it from one thread only (the connection is bound to the thread that opened it).
    """

    def __init__(
        self,
        db: sqlite3.Connection,
        path: Path,
        *,
        busy_timeout_seconds: float = 5.0,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._db: sqlite3.Connection | None = db
        self.path = path
        self._busy_timeout = busy_timeout_seconds
        self._now = now
        self._identity = _identity(path)
        #: Transactions committed, for the curious (benchmarks, tests of group commit).
        self.commits = 0

    def apply(
        self, uploads: Sequence[UploadChange], retired: Sequence[RetiredChange] = ()
    ) -> str | None:
        """Write these changes in one transaction; durable at `path` when this returns.

        Returns what was done to the file first, if anything: it had been deleted or replaced
        and was written anew (see `check_file`). On any failure the transaction is rolled back
        and the exception propagates (StateError when the file could not be written anew):
        nothing of the batch is on disk.
        """
        reopened = self.check_file()
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            rows = [_row(record) for _, record in uploads if record is not None]
            gone = [(ingestion_id,) for ingestion_id, record in uploads if record is None]
            if rows:
                db.executemany(_UPSERT, rows)
            if gone:
                db.executemany("DELETE FROM uploads WHERE ingestion_id = ?", gone)
            kept = [(i, at) for i, at in retired if at is not None]
            forgotten = [(i,) for i, at in retired if at is None]
            if kept:
                db.executemany(
                    "INSERT OR REPLACE INTO retired (ingestion_id, retired_at) VALUES (?, ?)", kept
                )
            if forgotten:
                db.executemany("DELETE FROM retired WHERE ingestion_id = ?", forgotten)
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        self.commits += 1
        # Deleted while the commit ran: the commit is in the open database, which is copied.
        return self.check_file() or reopened

    def check_file(self) -> str | None:
        """Make sure the path still names the database (and WAL) this store has open.

        Two `stat` calls (about 8 µs) when it does: None. When the file was deleted or
        replaced, the open database is copied to a new file at the path, which is then used;
        returns what was found and done. StateError if that fails: the open database is
        kept when it can be, and the next call tries again.
        """
        if self._db is not None and (
            _file_id(self.path) == self._identity.database
            and _file_id(_companions(self.path)[0]) == self._identity.wal
        ):
            return None
        return self._write_anew()

    def quick_check(self) -> str | None:
        """SQLite's quick_check over the pages on disk: None if sound, else the first problem.

        The connection's page cache is dropped first, or pages read before would be checked
        from memory and damage done to the file since would go unseen.
        """
        db = self._connection()
        try:
            db.execute("PRAGMA shrink_memory")
            (check,) = db.execute("PRAGMA quick_check(1)").fetchone()
        except sqlite3.Error as exc:
            return describe_error(exc)
        return None if check == "ok" else clean_text(check)

    def close(self) -> None:
        """Close the database; SQLite folds the WAL back into the main file first."""
        if self._db is not None:
            self._db.close()
            self._db = None

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise StateError(f"{self.path} could not be opened again after it was replaced")
        return self._db

    def _write_anew(self) -> str:
        """The file at the path is not the open database: put a copy of it there and open that.

        Until the copy is open, `_identity.database` names the copy (at `<path>.reopening`,
        or at the path once renamed), so a failed step is taken up again by the next call.
        """
        old, found = self._identity, _identity(self.path)
        if self._db is None:
            problem = "the state file was replaced while the exporter ran"
        elif old.database != found.database:
            what = "deleted" if found.database is None else "replaced"
            problem = f"the state file was {what} while the exporter ran"
        else:
            problem = "the state file's WAL was deleted or replaced while the exporter ran"
        temporary = Path(f"{self.path}{_REOPENING_SUFFIX}")
        try:
            if self._db is not None:
                _copy_database(self._db, temporary)
                self._db.close()  # nothing reads the old file or its WAL from here on
                self._db = None
                self._identity = _Identity(_file_id(temporary), None, None)
                note = self._take_path(temporary, old, found)
            elif old.database is not None and _file_id(temporary) == old.database:
                note = self._take_path(temporary, old, found)
            elif old.database is not None and found.database == old.database:
                note = f"the copy at {self.path} was opened again"
            else:
                raise OSError(0, "the copy of the open database is gone")
            store, _, _, _ = _open_database(
                self.path, self._busy_timeout, StateSnapshot(), self._now
            )
        except (OSError, sqlite3.Error, _Corrupt, _Unavailable) as exc:
            if self._db is not None:  # the open database still holds it all: drop the copy
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
            msg = f"{problem}; could not write it anew: {describe_error(exc)}"
            raise StateError(msg) from None
        self._db, store._db = store._db, None
        self._identity = store._identity
        return f"{problem}; {note}"

    def _take_path(self, temporary: Path, old: _Identity, found: _Identity) -> str:
        """Rename the copy to the path; whatever else is there is kept under another name."""
        # Our own WAL and shared-memory file: SQLite leaves them when the database was
        # unlinked, and the copy must not read them as its own.
        for companion, ours in zip(_companions(self.path)[:2], old[1:], strict=True):
            if ours is not None and _file_id(companion) == ours:
                os.unlink(companion)
        note = f"the state was written anew to {self.path} from the open database"
        if found.database is not None and found.database != old.database:
            moved = _move_aside(self.path, "", self._now, kind="replaced")
            if moved.moved_to is None:
                raise OSError(0, moved.problem or "the file at the path could not be moved")
            note += f"; the file found there was moved to {moved.moved_to}"
        os.replace(temporary, self.path)
        _fsync_directory(self.path.parent)
        return note


class _Identity(NamedTuple):
    """(st_dev, st_ino) of the database, its WAL and its shared-memory file; None if absent."""

    database: tuple[int, int] | None
    wal: tuple[int, int] | None
    shm: tuple[int, int] | None


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


def _identity(path: Path) -> _Identity:
    """Which files the path and its WAL name now: a deleted file cannot be named again while
    it is open, so an unchanged (device, inode) pair is the same file."""
    wal, shm = _companions(path)[:2]
    return _Identity(_file_id(path), _file_id(wal), _file_id(shm))


def _copy_database(db: sqlite3.Connection, target: Path) -> None:
    """A consistent copy of the open database at `target`, fsynced (SQLite's backup API)."""
    for leftover in (target, *_companions(target)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(leftover)
    copy = sqlite3.connect(target, isolation_level=None)
    try:
        copy.execute("PRAGMA synchronous=FULL")
        db.backup(copy)
    finally:
        copy.close()
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _row(record: UploadRecord) -> tuple[object, ...]:
    return (
        record.ingestion_id,
        json.dumps(list(record.sources)),
        json.dumps(dict(record.labels), sort_keys=True),
        record.status,
        record.first_seen,
        record.status_changed,
        record.last_success,
        record.terminal_at,
        int(record.report_available),
        int(record.queue_observed),
        int(record.released),
    )


def open_store(
    path: Path, *, now: Callable[[], float] = time.time, busy_timeout_seconds: float = 5.0
) -> tuple[StateStore | None, LoadResult]:
    """Open (or create, or migrate into) the database at `path` and read it; never raises.

    Returns no store when the path cannot be read: see the module docstring for what happens
    to a corrupt file, a bad row and a JSON file of release 1. Call it in the thread that will
    use the store.
    """
    _remove_leftovers(path, now)
    migrated: LoadResult | None = None
    try:
        head = _head(path)
        if head and not head.startswith(_SQLITE_HEADER):
            migrated = _migrate(path, now)
            if migrated.migrated_from is None and migrated.moved_to is None:
                # Corrupt but still in the way: better no persistence than overwriting it.
                raise _Unavailable(migrated.problem or "state file could not be moved aside")
    except _Unavailable as exc:
        return None, LoadResult(StateSnapshot(), str(exc), available=False)
    try:
        # Just migrated: the rows are the snapshot that was written, checked already.
        fresh = migrated.snapshot if migrated is not None and migrated.migrated_from else None
        store, snapshot, skipped, first = _open_database(path, busy_timeout_seconds, fresh, now)
    except _Unavailable as exc:
        return None, LoadResult(StateSnapshot(), str(exc), available=False)
    except _Corrupt as exc:
        moved = _move_aside(path, str(exc), now)
        if moved.moved_to is None:  # still in the way: better no persistence than overwriting
            return None, LoadResult(StateSnapshot(), moved.problem, available=False)
        try:
            store, snapshot, skipped, first = _open_database(path, busy_timeout_seconds, None, now)
        except (_Unavailable, _Corrupt) as again:
            problem = f"{moved.problem}; a new database could not be made: {again}"
            return None, LoadResult(StateSnapshot(), problem, available=False)
        return store, LoadResult(snapshot, moved.problem, moved_to=moved.moved_to)
    problems = [migrated.problem] if migrated is not None and migrated.problem else []
    skipped += migrated.skipped if migrated is not None else 0
    if first:
        problems.append(f"skipped {skipped} invalid rows in the state database (first: {first})")
    return store, LoadResult(
        snapshot,
        "; ".join(problems) or None,
        moved_to=migrated.moved_to if migrated is not None else None,
        skipped=skipped,
        migrated_from=migrated.migrated_from if migrated is not None else None,
    )


def _head(path: Path) -> bytes:
    """The first bytes of the file (b"" when there is none); _Unavailable if it is unreadable."""
    try:
        return _read_regular_file(path, limit=len(_SQLITE_HEADER))
    except FileNotFoundError:
        return b""
    except OSError as exc:
        detail = exc.strerror or describe_error(exc)
        raise _Unavailable(f"state file could not be read: {detail}") from None


def _read_regular_file(path: Path, *, limit: int = -1) -> bytes:
    """The file's bytes (up to `limit`); OSError unless it is a regular file we may read.

    O_NONBLOCK: opening a FIFO put where the state file should be must not hang the start.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as file:
        mode = os.fstat(file.fileno()).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise OSError(0, f"the path is {kind}")
        return file.read(limit)


def _open_database(
    path: Path,
    busy_timeout_seconds: float,
    known: StateSnapshot | None = None,
    now: Callable[[], float] = time.time,
) -> tuple[StateStore, StateSnapshot, int, str]:
    """Open or create the database and read it all (unless its content is `known`);
    _Corrupt or _Unavailable if it cannot."""
    try:
        db = sqlite3.connect(
            path, timeout=busy_timeout_seconds, isolation_level=None, check_same_thread=True
        )
    except sqlite3.Error as exc:
        msg = f"state database could not be opened: {describe_error(exc)}"
        raise _Unavailable(msg) from None
    try:
        _prepare(db)
        snapshot, skipped, first = _load(db) if known is None else (known, 0, "")
    except sqlite3.Error as exc:
        db.close()
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        if code in _CORRUPT_CODES:
            raise _Corrupt(f"state database is damaged: {describe_error(exc)}") from None
        raise _Unavailable(f"state database could not be read: {describe_error(exc)}") from None
    except BaseException:
        db.close()
        raise
    store = StateStore(db, path, busy_timeout_seconds=busy_timeout_seconds, now=now)
    return store, snapshot, skipped, first


def _prepare(db: sqlite3.Connection) -> None:
    """Check that the database is ours and sound, creating the schema in a new one."""
    (version,) = db.execute("PRAGMA user_version").fetchone()
    (application_id,) = db.execute("PRAGMA application_id").fetchone()
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if version > SCHEMA_VERSION and application_id == APPLICATION_ID:
        db.close()
        raise _Unavailable(
            f"state database has schema version {version}, newer than this release's "
            f"{SCHEMA_VERSION}: left as it is"
        )
    if not tables and version == 0:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(
            f"BEGIN; {_SCHEMA} PRAGMA application_id = {APPLICATION_ID}; "
            f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
        )
    elif (application_id, version) != (APPLICATION_ID, SCHEMA_VERSION) or not {
        "uploads",
        "retired",
    } <= tables:
        db.close()
        raise _Corrupt("state database is not this exporter's (application_id or schema)")
    else:
        problem = _schema_problem(db)
        if problem is not None:
            db.close()
            raise _Corrupt(f"state database is not this exporter's: {problem}")
    (mode,) = db.execute("PRAGMA journal_mode=WAL").fetchone()
    db.execute("PRAGMA synchronous=FULL")
    if mode != "wal":
        db.close()
        raise _Unavailable(f"state database cannot use WAL mode (got {mode})")
    (check,) = db.execute("PRAGMA quick_check(1)").fetchone()
    if check != "ok":
        db.close()
        raise _Corrupt(f"state database is damaged: {clean_text(check)}")


def _schema_objects(db: sqlite3.Connection) -> dict[tuple[str, str], str | None]:
    """Tables, indexes, triggers and views by (type, name), with their SQL normalized.

    SQLite keeps each CREATE statement as written: spacing and case are all that may differ
    between two equal schemas. Its statistics tables (left by an ANALYZE) change nothing.
    """
    rows = db.execute(
        "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_stat%'"
    )
    return {
        (kind, name): None if sql is None else _SPACING.sub(" ", sql).strip().lower()
        for kind, name, sql in rows
    }


def _schema_problem(db: sqlite3.Connection) -> str | None:
    """How the database's schema differs from `_SCHEMA` (constraints included), or None."""
    with contextlib.closing(sqlite3.connect(":memory:")) as reference:
        reference.executescript(_SCHEMA)
        expected = _schema_objects(reference)
    found = _schema_objects(db)
    for key, sql in expected.items():
        if key not in found:
            return f"{key[0]} {key[1]} is missing"
        if found[key] != sql:
            return f"{key[0]} {key[1]} is not as this release makes it"
    extra = sorted(found.keys() - expected.keys())
    if not extra:
        return None
    kind, name = extra[0]  # text from the file: quoted and cut short
    return f"it has {len(extra)} object(s) this release does not make ({kind[:20]!r} {name[:64]!r})"


def _load(db: sqlite3.Connection) -> tuple[StateSnapshot, int, str]:
    """Every row that passes its checks, how many did not, and why the first did not."""
    reasons: list[str] = []
    uploads: list[UploadRecord] = []
    reader = _RowReader()
    for row in db.execute(_SELECT_UPLOADS):
        try:
            uploads.append(reader.record(row[1:]))
        except _Invalid as exc:
            reasons.append(f"uploads row {row[0]}: {exc}")
    retired: dict[str, float] = {}
    for ingestion_id, at in db.execute(
        "SELECT ingestion_id, retired_at FROM retired ORDER BY retired_at"
    ):
        if not isinstance(ingestion_id, str) or ingestion_id_problem(ingestion_id) is not None:
            reasons.append("retired: not a valid ingestionId")
        elif not _finite(at):
            reasons.append("retired: an entry's time is not a finite number")
        else:
            retired[ingestion_id] = float(at)
    return StateSnapshot(tuple(uploads), retired), len(reasons), reasons[0] if reasons else ""


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _time(value: object, name: str) -> float:
    if type(value) is float and math.isfinite(value):  # the common case, checked first
        return value
    if _finite(value):
        return float(value)  # type: ignore[arg-type]
    raise _Invalid(f"{name}: expected a finite number")


class _RowReader:
    """Checks rows one by one. Most uploads share a few sources and label sets, so each
    distinct JSON text is decoded and checked once (a start with 100,000 rows is ~2x faster)."""

    def __init__(self) -> None:
        self._sources: dict[str, tuple[str, ...]] = {}
        self._labels: dict[str, Mapping[str, str]] = {}

    def record(self, row: Sequence[object]) -> UploadRecord:
        """One row as a record; _Invalid naming the first field that fails its check."""
        (ingestion_id, sources, labels, status, first_seen, changed, success, terminal) = row[:8]
        if not isinstance(ingestion_id, str) or ingestion_id_problem(ingestion_id) is not None:
            raise _Invalid("ingestion_id: not a valid ingestionId")
        if not isinstance(status, str):
            raise _Invalid("status: expected text")
        flags = row[8:11]
        if not all(type(flag) is int and flag in (0, 1) for flag in flags):
            raise _Invalid("report_available, queue_observed, released: expected 0 or 1")
        return UploadRecord(
            ingestion_id=ingestion_id,
            sources=self._source_tuple(sources),
            labels=self._label_map(labels),
            status=status,
            first_seen=_time(first_seen, "first_seen"),
            status_changed=_time(changed, "status_changed"),
            last_success=None if success is None else _time(success, "last_success"),
            terminal_at=None if terminal is None else _time(terminal, "terminal_at"),
            report_available=bool(flags[0]),
            queue_observed=bool(flags[1]),
            released=bool(flags[2]),
        )

    def _source_tuple(self, text: object) -> tuple[str, ...]:
        if isinstance(text, str) and text in self._sources:
            return self._sources[text]
        value = _json_column(text, "sources")
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise _Invalid("sources: expected a JSON list of strings")
        self._sources[text] = found = tuple(value)  # type: ignore[index]
        return found

    def _label_map(self, text: object) -> Mapping[str, str]:
        if isinstance(text, str) and text in self._labels:
            return self._labels[text]
        value = _json_column(text, "labels")
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise _Invalid("labels: expected a JSON object of strings")
        self._labels[text] = value  # type: ignore[index]
        return value


def _json_column(value: object, name: str) -> object:
    if not isinstance(value, str):
        raise _Invalid(f"{name}: expected JSON text")
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        raise _Invalid(f"{name}: not valid JSON") from None


def _companions(path: Path) -> list[Path]:
    """The files SQLite keeps beside the database."""
    return [Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal")]


def _move_aside(
    path: Path, problem: str, now: Callable[[], float], *, kind: str = "corrupt"
) -> LoadResult:
    """Rename a corrupt file (and its WAL: it belongs to it) out of the way; never delete."""
    try:
        target = Path(f"{path}.{kind}-{int(now())}")
        os.replace(path, target)
    except (OSError, ValueError, OverflowError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else describe_error(exc)
        return LoadResult(StateSnapshot(), f"{problem}; could not move it aside: {detail}")
    for companion, suffix in zip(_companions(path), ("-wal", "-shm", "-journal"), strict=True):
        with contextlib.suppress(FileNotFoundError):
            os.replace(companion, f"{target}{suffix}")
    return LoadResult(StateSnapshot(), f"{problem}; moved it to {target}", moved_to=target)


def _remove_leftovers(path: Path, now: Callable[[], float]) -> None:
    """Temp files of an interrupted release-1 save or migration: never the state itself.

    A copy made when the file was deleted while running (`StateStore.check_file`) is all the
    state there is if the exporter died before it took the path: it takes it now. Beside a
    file at the path it is kept, under another name.
    """
    migrating = Path(f"{path}{_MIGRATING_SUFFIX}")
    for leftover in (migrating, *_companions(migrating)):
        with contextlib.suppress(OSError):
            os.unlink(leftover)
    reopening = Path(f"{path}{_REOPENING_SUFFIX}")
    if os.path.lexists(reopening):
        if os.path.lexists(path):
            _move_aside(reopening, "", now, kind="kept")
        else:
            # The WAL beside no database is the deleted one's, whose content is in the copy.
            pairs = zip(
                (*_companions(reopening), reopening), (*_companions(path), path), strict=True
            )
            with contextlib.suppress(OSError):
                for source, target in pairs:
                    if os.path.lexists(source):
                        os.replace(source, target)
                    elif target != path:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(target)
    remove_temp_files(path)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- migrating the JSON file of release 1 (its format: `state_migration`) ---------------------


def _migrate(path: Path, now: Callable[[], float]) -> LoadResult:
    """Turn the JSON file at `path` into a database at `path`; keep the JSON beside it.

    A file that is not release 1's JSON is moved aside (the caller then makes a new database).
    _Unavailable when the file or the directory cannot be read or written: nothing changes.
    The database is complete and fsynced under `<path>.migrating` before the JSON is kept as a
    backup and the database takes the path in one rename: a crash before that repeats it all.
    """
    try:
        raw = _read_regular_file(path)
    except OSError as exc:
        detail = exc.strerror or describe_error(exc)
        raise _Unavailable(f"state file could not be read: {detail}") from None
    try:
        found = read_release_1(raw)
    except NotRelease1 as exc:
        return _move_aside(path, str(exc), now)
    snapshot = StateSnapshot(tuple(UploadRecord(**u) for u in found.uploads), found.retired)
    migrating = Path(f"{path}{_MIGRATING_SUFFIX}")
    try:
        _write_new_database(migrating, snapshot)
        backup = keep_backup(path)
        os.replace(migrating, path)
        _fsync_directory(path.parent)
    except (OSError, sqlite3.Error) as exc:
        for leftover in (migrating, *_companions(migrating)):
            with contextlib.suppress(OSError):
                os.unlink(leftover)
        raise _Unavailable(f"state file could not be migrated: {describe_error(exc)}") from None
    problem = None
    if found.skipped:
        problem = (
            f"skipped {found.skipped} invalid entries in the JSON state file "
            f"(first: {found.first_skipped})"
        )
    return LoadResult(snapshot, problem, skipped=found.skipped, migrated_from=backup)


def _write_new_database(path: Path, snapshot: StateSnapshot) -> None:
    """A complete database holding `snapshot`, fsynced, at `path` (which must not exist)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(
            f"BEGIN; {_SCHEMA} PRAGMA application_id = {APPLICATION_ID}; "
            f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
        )
        StateStore(db, path).apply(
            [(record.ingestion_id, record) for record in snapshot.uploads],
            list(snapshot.retired.items()),
        )
    finally:
        db.close()
