"""The state file that lets tracked ingestionIds survive a restart: its format and its writing.

This module owns the on-disk format, loading it without ever trusting it, and durable, atomic,
debounced writes. It knows nothing of HTTP, polling or metrics: callers hand it snapshots and
count failures through the `on_error` callback.

The file is one compact JSON object (no indentation)::

    {"version": 1,
     "written_at": 1718000000.5,
     "uploads": [{"ingestion_id": "abc", "sources": ["config", "directory"],
                  "labels": {"team": "books"}, "status": "INPROGRESS",
                  "first_seen": 1717990000.0, "status_changed": 1717995000.0,
                  "last_success": 1717999990.0, "terminal_at": null,
                  "report_available": false, "queue_observed": true, "released": false}],
     "retired": {"old-id": 1717900000.0}}

Timestamps are wall-clock seconds. `retired` maps an id whose terminal retention ended to when
it ended, so it is not polled again while a source still lists it. On load every field is
checked for its exact type; a record may omit the fields that have defaults, and keys this
version does not know are ignored. A record (or retired entry) that fails the checks is skipped
and counted, the rest kept; a file whose top level fails them is moved aside, never deleted. A
path that exists but cannot be read (a directory, a FIFO, no permission) is left alone: the
caller runs without persistence rather than overwrite what it could not read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import stat
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from exporter.models import ingestion_id_problem

log = structlog.get_logger("exporter.state")

STATE_VERSION = 1

_TEMP_SUFFIX = ".tmp"


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
    """Everything the state file holds: tracked uploads and ids whose retention ended."""

    uploads: tuple[UploadRecord, ...] = ()
    retired: Mapping[str, float] = field(default_factory=dict)


class StateError(Exception):
    """The state file could not be written."""


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What `load_state` found: a usable snapshot, and what was wrong with the file if anything.

    `available` is False when the file exists but could not be read: it must then be neither
    moved nor overwritten. `skipped` counts the entries dropped while the rest was kept.
    """

    snapshot: StateSnapshot
    problem: str | None = None
    moved_to: Path | None = None
    skipped: int = 0
    available: bool = True


# -- writing ------------------------------------------------------------------------------------


def _encode(snapshot: StateSnapshot) -> bytes:
    document = {
        "version": STATE_VERSION,
        "written_at": time.time(),
        "uploads": [
            {
                "ingestion_id": r.ingestion_id,
                "sources": list(r.sources),
                "labels": dict(r.labels),
                "status": r.status,
                "first_seen": r.first_seen,
                "status_changed": r.status_changed,
                "last_success": r.last_success,
                "terminal_at": r.terminal_at,
                "report_available": r.report_available,
                "queue_observed": r.queue_observed,
                "released": r.released,
            }
            for r in snapshot.uploads
        ],
        "retired": dict(snapshot.retired),
    }
    # allow_nan=False: NaN is not JSON, and load_state would reject the file we wrote.
    return json.dumps(document, separators=(",", ":"), allow_nan=False).encode()


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def save_state(path: Path, snapshot: StateSnapshot) -> None:
    """Write `snapshot` to `path` atomically and durably; blocking, so call it off the loop.

    A reader (or a restart after a crash at any instant) sees either the old file or the new
    one, never a mix: the JSON goes to a uniquely named temp file in the same directory, is
    fsynced, renamed over `path`, and then the directory is fsynced so the rename survives a
    power cut. On failure the temp file is removed and the exception (usually OSError)
    propagates.
    """
    data = _encode(snapshot)
    fd, temp_name = tempfile.mkstemp(
        dir=path.parent, prefix=_temp_prefix(path), suffix=_TEMP_SUFFIX
    )
    replaced = False
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
        replaced = True
        _fsync_directory(path.parent)
    except BaseException:
        if not replaced:
            with contextlib.suppress(OSError):
                os.unlink(temp_name)
        raise


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- loading ------------------------------------------------------------------------------------


class _Invalid(ValueError):
    """The file's content does not have the expected shape."""


def load_state(path: Path, *, now: Callable[[], float] = time.time) -> LoadResult:
    """Read the state file; never raises.

    A missing file is an empty snapshot and no problem. A path that exists but cannot be read
    as a regular file (a directory, a FIFO, a permission error) yields an empty snapshot with
    `available` False and is left where it is. A file that is not JSON, has another version or
    the wrong shape at the top level is renamed to `<path>.corrupt-<unix time>` and yields an
    empty snapshot with `problem` saying why. Entries that fail their checks (a bad field, an
    invalid or duplicate id) are skipped one by one and counted in `skipped`, while the rest of
    the file is used and stays where it is.

    Call it before the writer starts: it also removes temp files left by a save that was
    interrupted (a crash between creating and renaming them).
    """
    _remove_leftover_temp_files(path)
    try:
        raw = _read_regular_file(path)
    except FileNotFoundError:
        return LoadResult(StateSnapshot())
    except OSError as exc:
        detail = exc.strerror or _short(exc)
        return LoadResult(
            StateSnapshot(), f"state file could not be read: {detail}", available=False
        )
    try:
        # RecursionError: deeply nested arrays in a hostile file exhaust the parser's stack.
        document = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        return _move_aside(path, f"state file is not valid JSON: {_short(exc)}", now)
    try:
        snapshot, skipped, first_reason = _parse_document(document)
    except _Invalid as exc:
        return _move_aside(path, f"state file has the wrong shape: {exc}", now)
    if skipped:
        problem = f"skipped {skipped} invalid entries in the state file (first: {first_reason})"
        return LoadResult(snapshot, problem=problem, skipped=skipped)
    return LoadResult(snapshot)


def _read_regular_file(path: Path) -> bytes:
    """The file's bytes; OSError unless it is a regular file we may read.

    O_NONBLOCK: opening a FIFO put where the state file should be must not hang the start.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as file:
        mode = os.fstat(file.fileno()).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise OSError(0, f"the path is {kind}")
        return file.read()


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:199] + "…"


def _move_aside(path: Path, problem: str, now: Callable[[], float]) -> LoadResult:
    try:
        target = Path(f"{path}.corrupt-{int(now())}")
        os.replace(path, target)
    except (OSError, ValueError, OverflowError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else _short(exc)
        return LoadResult(StateSnapshot(), f"{problem}; could not move it aside: {detail}")
    return LoadResult(StateSnapshot(), f"{problem}; moved it to {target}", moved_to=target)


def _remove_leftover_temp_files(path: Path) -> None:
    prefix = _temp_prefix(path)
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix) and name.endswith(_TEMP_SUFFIX):
            with contextlib.suppress(OSError):
                os.unlink(path.parent / name)


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _parse_document(document: object) -> tuple[StateSnapshot, int, str]:
    """The snapshot in `document`, how many entries were skipped, and why the first was."""
    if not isinstance(document, dict):
        raise _Invalid(f"expected an object at the top level, got {_type_name(document)}")
    version = document.get("version")
    if type(version) is not int or version != STATE_VERSION:
        shown = version if type(version) is int else _type_name(version)
        raise _Invalid(f"expected version {STATE_VERSION}, got {shown}")
    _number(document, "written_at", "")
    uploads_raw = document.get("uploads")
    if not isinstance(uploads_raw, list):
        raise _Invalid(f"uploads: expected a list, got {_type_name(uploads_raw)}")
    retired_raw = document.get("retired")
    if not isinstance(retired_raw, dict):
        raise _Invalid(f"retired: expected an object, got {_type_name(retired_raw)}")

    reasons: list[str] = []
    uploads: dict[str, UploadRecord] = {}
    for index, item in enumerate(uploads_raw):
        where = f"uploads[{index}]."
        try:
            record = _parse_record(item, where)
        except _Invalid as exc:
            reasons.append(str(exc))
            continue
        if ingestion_id_problem(record.ingestion_id) is not None:
            reasons.append(f"{where}ingestion_id: not a valid ingestionId")
        elif record.ingestion_id in uploads:
            reasons.append(f"{where}ingestion_id: a duplicate")
        else:
            uploads[record.ingestion_id] = record

    retired: dict[str, float] = {}
    for key in retired_raw:
        try:
            when = _number(retired_raw, key, "retired.")
        except _Invalid:
            # Not the message: it would quote the key, which is untrusted text.
            reasons.append("retired: an entry's time is not a finite number")
            continue
        if ingestion_id_problem(key) is not None:
            reasons.append("retired: not a valid ingestionId")
            continue
        retired[key] = when
    first = reasons[0] if reasons else ""
    return StateSnapshot(tuple(uploads.values()), retired), len(reasons), first


def _parse_record(item: object, where: str) -> UploadRecord:
    if not isinstance(item, dict):
        raise _Invalid(f"{where[:-1]}: expected an object, got {_type_name(item)}")
    sources = item.get("sources")
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise _Invalid(f"{where}sources: expected a list of strings")
    labels = item.get("labels")
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise _Invalid(f"{where}labels: expected an object of strings")
    return UploadRecord(
        ingestion_id=_string(item, "ingestion_id", where),
        sources=tuple(sources),
        labels=dict(labels),
        status=_string(item, "status", where),
        first_seen=_number(item, "first_seen", where),
        status_changed=_number(item, "status_changed", where),
        last_success=_optional_number(item, "last_success", where),
        terminal_at=_optional_number(item, "terminal_at", where),
        report_available=_flag(item, "report_available", where),
        queue_observed=_flag(item, "queue_observed", where),
        released=_flag(item, "released", where),
    )


def _string(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise _Invalid(f"{where}{key}: expected a string, got {_type_name(value)}")
    return value


def _number(obj: dict[str, Any], key: str, where: str) -> float:
    value = obj.get(key)
    # bool is an int subclass, but `true` is never a timestamp.
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float
            number = math.inf
        if math.isfinite(number):
            return number
        raise _Invalid(f"{where}{key}: expected a finite number")
    raise _Invalid(f"{where}{key}: expected a number, got {_type_name(value)}")


def _optional_number(obj: dict[str, Any], key: str, where: str) -> float | None:
    return None if obj.get(key) is None else _number(obj, key, where)


def _flag(obj: dict[str, Any], key: str, where: str) -> bool:
    value = obj.get(key, False)
    if not isinstance(value, bool):
        raise _Invalid(f"{where}{key}: expected true or false, got {_type_name(value)}")
    return value


# -- the debounced writer -----------------------------------------------------------------------


class StateWriter:
    """Debounced background writer: many changes, one write; `flush()` is the acknowledgement.

    `mark_dirty()` after each change; `run()` writes at most `debounce_seconds` later.
    Writes are serialised; each takes its snapshot on the event loop and does the encoding and
    file I/O in a thread. A failed write calls `on_error`, keeps the state dirty, and `run()`
    retries it no sooner than `min_retry_seconds` later. Use it from one event loop only.
    """

    def __init__(
        self,
        path: Path,
        snapshot: Callable[[], StateSnapshot],
        *,
        debounce_seconds: float = 0.5,
        on_error: Callable[[Exception], None] | None = None,
        min_retry_seconds: float = 1.0,
    ) -> None:
        self._path = path
        self._snapshot = snapshot
        self._debounce = debounce_seconds
        self._on_error = on_error
        self._retry_delay = max(debounce_seconds, min_retry_seconds)
        self._dirty = asyncio.Event()
        self._lock = asyncio.Lock()  # one write at a time, in the order they were asked for
        # The write that has been asked for but has not taken its snapshot yet: every flush()
        # until then shares it, because it will contain all of their changes.
        self._pending: asyncio.Task[Exception | None] | None = None
        # What to undo if that pending write fails: the changes of the flushes that joined it.
        self._undos: list[Callable[[], None]] = []
        self._failed_at: float | None = None

    def mark_dirty(self) -> None:
        """Note that the in-memory state changed; `run()` writes it within the debounce."""
        self._dirty.set()

    async def flush(self, undo: Callable[[], None] | None = None) -> None:
        """Return once a write that started after this call has completed.

        It does not wait for the debounce, only for a write already in progress. Raises
        StateError when that write failed; `undo` is then called first, before any later
        write takes its snapshot, so a change that was never acknowledged cannot reach the
        file afterwards. Cancelling a flush does not cancel the write.
        """
        if undo is not None:
            self._undos.append(undo)
        error = await asyncio.shield(self._request_write())
        if error is not None:
            msg = f"could not write the state file {self._path}: {_short(error)}"
            raise StateError(msg) from error

    async def run(self) -> None:
        """Write dirty state after the debounce until cancelled, then write once more if dirty."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._dirty.wait()
                delay = self._debounce
                if self._failed_at is not None:
                    delay = max(delay, self._failed_at + self._retry_delay - loop.time())
                await asyncio.sleep(delay)
                if self._dirty.is_set():  # a flush() may have written it meanwhile
                    await asyncio.shield(self._request_write())
        except asyncio.CancelledError:
            await self._final_write()
            raise

    async def _final_write(self) -> None:
        if self._dirty.is_set() or self._pending is not None:
            await asyncio.shield(self._request_write())
        else:
            async with self._lock:  # let a write in progress finish before we stop
                pass

    def _request_write(self) -> asyncio.Task[Exception | None]:
        if self._pending is None:
            self._pending = asyncio.get_running_loop().create_task(
                self._write(), name="state-write"
            )
        return self._pending

    async def _write(self) -> Exception | None:
        """Write one snapshot; the error is returned, so a task nobody awaits never warns."""
        async with self._lock:
            # No await between these lines: whoever joined this write did so before the
            # snapshot was taken, and every change after it marks the state dirty again.
            self._pending = None
            undos, self._undos = self._undos, []
            self._dirty.clear()
            try:
                snapshot = self._snapshot()
                await asyncio.to_thread(save_state, self._path, snapshot)
            except asyncio.CancelledError:
                self._dirty.set()
                raise
            except Exception as exc:  # any failure must leave the loop running
                self._dirty.set()
                self._failed_at = asyncio.get_running_loop().time()
                self._undo(undos)
                self._report(exc)
                return exc
            self._failed_at = None
            return None

    def _undo(self, undos: list[Callable[[], None]]) -> None:
        """Roll back the unacknowledged changes, newest first, still holding the write lock."""
        for undo in reversed(undos):
            try:
                undo()
            except Exception:  # one broken undo must not keep the others from running
                log.exception("state_undo_failed", path=str(self._path))

    def _report(self, exc: Exception) -> None:
        if self._on_error is None:
            log.warning("state_write_failed", path=str(self._path), error=_short(exc))
            return
        try:
            self._on_error(exc)
        except Exception:  # a broken callback must not stop the writer
            log.exception("state_error_callback_failed", path=str(self._path))


class UnavailableState:
    """Stands in for the writer when the state file exists but cannot be read.

    Nothing is written (the file must not be overwritten by a state that lacks what it holds),
    and every acknowledgement fails: `flush` undoes the change and raises StateError.
    """

    def __init__(self, path: Path, problem: str) -> None:
        self._path = path
        self._problem = problem

    def mark_dirty(self) -> None:
        """Nothing is persisted."""

    async def flush(self, undo: Callable[[], None] | None = None) -> None:
        """Undo the change and refuse: no change can be made durable."""
        if undo is not None:
            undo()
        msg = f"persistence is unavailable: {self._path}: {self._problem}"
        raise StateError(msg)
