"""When the state is written: changed ids collected on the loop, committed by one thread.

`StateWriter` owns the state database's thread. The tracker marks the ids whose persisted row
changed (a registration, a release, a status change, a retirement); the writer turns the marked
ids into rows on the loop, which costs O(ids marked), and commits them in one transaction in
its thread. A durable `flush()` (what makes an admin 2xx an acknowledgement) starts a commit at
once, and every flush that arrives while a commit runs joins the next one: changes arriving
together are committed together (group commit). Other changes are committed within
`debounce_seconds`. Between commits the thread also looks after the file: that the path still
names the open database (every `file_check_seconds`, besides before and after each commit),
and SQLite's quick_check over its pages (every `integrity_check_seconds`). It knows nothing of
HTTP or polling; the on-disk format is `state`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog

from exporter.responses import describe_error
from exporter.state import (
    LoadResult,
    RetiredChange,
    StateError,
    StateStore,
    UploadChange,
    UploadRecord,
    open_store,
)

log = structlog.get_logger("exporter.state")

Undo = Callable[[], None]

#: Rows whose records are built between two yields to the loop. The first commit after
#: starting on a new store, or after a reload adding many ids, holds 100,000 rows.
_ROWS_PER_STEP = 2_000
#: How often an idle writer checks that the path still names the open database (each commit
#: checks too): a file deleted while nothing changes is written anew within this.
FILE_CHECK_SECONDS = 60.0
#: How often PRAGMA quick_check reads every page of the database (22 ms at 100,000 rows,
#: 14 MB; commits wait meanwhile), so damage is seen while running, not at the next start.
INTEGRITY_CHECK_SECONDS = 3600.0


class Persistence(Protocol):
    """What the tracker needs: mark changed ids, and wait until a change is durable."""

    def mark(self, ingestion_ids: Iterable[str]) -> None:
        """These uploads' rows changed (or must go): write them within the debounce."""
        ...

    def mark_retired(self, ingestion_ids: Iterable[str]) -> None:
        """These ids were retired (or forgotten): write them within the debounce."""
        ...

    async def flush(self, undo: Undo | None = None) -> None:
        """Return once every change marked before this call is durable; else call `undo`
        and raise StateError."""
        ...


@dataclass(slots=True)
class _Batch:
    """The ids cut for one commit, and the flushes it answers."""

    uploads: set[str] = field(default_factory=set)
    retired: set[str] = field(default_factory=set)
    waiters: list[tuple[asyncio.Future[Exception | None], Undo | None]] = field(
        default_factory=list
    )

    def __bool__(self) -> bool:
        return bool(self.uploads or self.retired or self.waiters)


class StateWriter:
    """Group-committing writer of the state database; `flush()` is the acknowledgement.

    `run()` must be running for anything to be written; cancel it to stop, and it commits
    what is still marked, closes the database and ends its thread. A failed commit calls
    `on_error`, runs the undo of every flush it would have answered (before any later batch
    is cut, so an unacknowledged change never reaches the disk afterwards), and is retried
    no sooner than `min_retry_seconds` later; the first success after it calls
    `on_recovered`. A file found deleted or replaced, and written anew, calls `on_reopened`
    with what was done (a failure to do so is a failed commit: `on_error`); each quick_check
    calls `on_checked` with the problem found, or None. Use it from one event loop only.
    """

    def __init__(
        self,
        store: StateStore,
        executor: ThreadPoolExecutor,
        *,
        record: Callable[[str], UploadRecord | None],
        retired_at: Callable[[str], float | None],
        debounce_seconds: float = 0.5,
        on_error: Callable[[Exception], None] | None = None,
        min_retry_seconds: float = 1.0,
        on_recovered: Callable[[], None] | None = None,
        on_reopened: Callable[[str], None] | None = None,
        on_checked: Callable[[str | None], None] | None = None,
        file_check_seconds: float = FILE_CHECK_SECONDS,
        integrity_check_seconds: float = INTEGRITY_CHECK_SECONDS,
    ) -> None:
        self._store = store
        self._executor = executor
        self._record = record
        self._retired_at = retired_at
        self._debounce = debounce_seconds
        self._on_error = on_error
        self._on_recovered = on_recovered
        self._on_reopened = on_reopened
        self._on_checked = on_checked
        self._file_check = file_check_seconds
        self._integrity_check = integrity_check_seconds
        self._healthy = True
        self._retry_delay = max(debounce_seconds, min_retry_seconds)
        self._next = _Batch()
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()
        self._failed_at: float | None = None
        self._closed = False

    @property
    def path(self) -> Path:
        """The database's path."""
        return self._store.path

    @property
    def commits(self) -> int:
        """Transactions committed so far."""
        return self._store.commits

    def mark(self, ingestion_ids: Iterable[str]) -> None:
        """These uploads' rows changed: commit them within the debounce."""
        if not self._closed:
            self._next.uploads.update(ingestion_ids)
            self._wake.set()

    def mark_retired(self, ingestion_ids: Iterable[str]) -> None:
        """These retired ids were added or forgotten: commit them within the debounce."""
        if not self._closed:
            self._next.retired.update(ingestion_ids)
            self._wake.set()

    async def flush(self, undo: Undo | None = None) -> None:
        """Return once a commit holding every change marked before this call has completed.

        It does not wait for the debounce, only for a commit already in progress. Raises
        StateError when the commit failed, after `undo` ran. Cancelling a flush does not
        cancel the commit.
        """
        if self._closed:
            if undo is not None:
                undo()
            raise StateError("the state writer has stopped")
        future: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self._next.waiters.append((future, undo))
        self._urgent.set()
        self._wake.set()
        error = await asyncio.shield(future)
        if error is not None:
            msg = f"could not write the state database {self._store.path}: {describe_error(error)}"
            raise StateError(msg) from error

    async def run(self) -> None:
        """Commit marked changes until cancelled; then commit the rest and close the store."""
        loop = asyncio.get_running_loop()
        commit: asyncio.Task[None] | None = None
        next_file_check = loop.time() + self._file_check
        next_integrity_check = loop.time() + self._integrity_check
        try:
            while True:
                due = min(next_file_check, next_integrity_check) - loop.time()
                if due <= 0:  # asked after each commit too: a writer never idle is checked
                    integrity = loop.time() >= next_integrity_check
                    check = self._look_after(integrity=integrity)
                    commit = loop.create_task(check, name="state-check")
                    await asyncio.shield(commit)
                    next_file_check = loop.time() + self._file_check
                    if integrity:
                        next_integrity_check = loop.time() + self._integrity_check
                    continue
                # Not wait_for: on 3.11 it can swallow a cancel that meets the event being set.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(due):
                        await self._wake.wait()
                if not self._wake.is_set():
                    continue
                if not self._urgent.is_set():
                    delay = self._debounce
                    if self._failed_at is not None:
                        delay = max(delay, self._failed_at + self._retry_delay - loop.time())
                    with contextlib.suppress(TimeoutError):  # not wait_for either (above)
                        async with asyncio.timeout(delay):
                            await self._urgent.wait()
                self._wake.clear()
                self._urgent.clear()
                # No await between clearing the events and cutting the batch: whatever is
                # marked from here on sets them again and goes into the next batch.
                batch, self._next = self._next, _Batch()
                if batch:
                    commit = loop.create_task(self._commit(batch), name="state-commit")
                    await asyncio.shield(commit)
        except asyncio.CancelledError:
            await self._close(commit)
            raise

    async def _close(self, commit: asyncio.Task[None] | None) -> None:
        if commit is not None:
            await asyncio.wait([commit])  # a commit in its thread cannot be cancelled
        batch, self._next = self._next, _Batch()
        self._closed = True
        if batch:
            await self._commit(batch)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._store.close)
        except Exception as exc:  # closing must not keep the exporter from stopping
            log.warning("state_close_failed", path=str(self._store.path), error=describe_error(exc))
        self._executor.shutdown(wait=False)

    async def _commit(self, batch: _Batch) -> None:
        """Commit one batch in the writer thread and answer its flushes; never raises."""
        loop = asyncio.get_running_loop()
        try:
            uploads: list[UploadChange] = []
            for chunk in _chunks(list(batch.uploads), _ROWS_PER_STEP):
                uploads.extend((i, self._record(i)) for i in chunk)
                await asyncio.sleep(0)  # a batch of 100,000 rows must not stall the loop
            retired: list[RetiredChange] = [(i, self._retired_at(i)) for i in batch.retired]
            note = await loop.run_in_executor(self._executor, self._store.apply, uploads, retired)
        except Exception as exc:  # any failure must leave the loop running
            self._failed_at = loop.time()
            self._undo(batch)
            # Marked again, rows rebuilt from memory after the undo: retried by run().
            self._next.uploads.update(batch.uploads)
            self._next.retired.update(batch.retired)
            if not self._closed:
                self._wake.set()
            self._report(exc)
            self._answer(batch, exc)
            return
        self._failed_at = None
        self._answer(batch, None)
        self._fine(note)

    async def _look_after(self, *, integrity: bool) -> None:
        """Between commits: the file's identity, and its pages if `integrity`; never raises."""
        loop = asyncio.get_running_loop()
        try:
            note = await loop.run_in_executor(self._executor, self._store.check_file)
        except Exception as exc:  # StateError: the next commit fails too, and retries it
            self._report(exc)
        else:
            self._fine(note)
        if not integrity:
            return
        try:
            problem = await loop.run_in_executor(self._executor, self._store.quick_check)
        except Exception as exc:  # StateError: no open database to check
            problem = describe_error(exc)
        if self._on_checked is not None:
            self._call(self._on_checked, problem)
        elif problem is not None:
            log.error("state_integrity_check_failed", path=str(self.path), problem=problem)

    def _fine(self, note: str | None) -> None:
        """A commit or check succeeded (after writing the file anew if `note`)."""
        if note is not None:
            if self._on_reopened is None:
                log.warning("state_file_reopened", path=str(self.path), note=note)
            else:
                self._call(self._on_reopened, note)
        if not self._healthy:
            self._healthy = True
            if self._on_recovered is not None:
                self._call(self._on_recovered)

    def _call(self, callback: Callable[..., None], *args: object) -> None:
        try:
            callback(*args)
        except Exception:  # a broken callback must not stop the writer
            log.exception("state_callback_failed", path=str(self._store.path))

    def _undo(self, batch: _Batch) -> None:
        """Roll back the unacknowledged changes, newest first."""
        for _, undo in reversed(batch.waiters):
            if undo is None:
                continue
            try:
                undo()
            except Exception:  # one broken undo must not keep the others from running
                log.exception("state_undo_failed", path=str(self._store.path))

    @staticmethod
    def _answer(batch: _Batch, error: Exception | None) -> None:
        for future, _ in batch.waiters:
            if not future.done():
                future.set_result(error)

    def _report(self, exc: Exception) -> None:
        self._healthy = False
        if self._on_error is None:
            log.warning("state_write_failed", path=str(self._store.path), error=describe_error(exc))
            return
        try:
            self._on_error(exc)
        except Exception:  # a broken callback must not stop the writer
            log.exception("state_error_callback_failed", path=str(self._store.path))


class UnavailableState:
    """Stands in for the writer when `state.path` exists but cannot be read.

    Nothing is written (the file must not be overwritten by a state that lacks what it holds),
    and every acknowledgement fails: `flush` undoes the change and raises StateError.
    """

    def __init__(self, path: Path, problem: str) -> None:
        self._path = path
        self._problem = problem

    def mark(self, ingestion_ids: Iterable[str]) -> None:
        """Nothing is persisted."""

    def mark_retired(self, ingestion_ids: Iterable[str]) -> None:
        """Nothing is persisted."""

    async def flush(self, undo: Undo | None = None) -> None:
        """Undo the change and refuse: no change can be made durable."""
        if undo is not None:
            undo()
        msg = f"persistence is unavailable: {self._path}: {self._problem}"
        raise StateError(msg)


async def open_state(
    path: Path,
    *,
    record: Callable[[str], UploadRecord | None],
    retired_at: Callable[[str], float | None],
    debounce_seconds: float = 0.5,
    on_error: Callable[[Exception], None] | None = None,
    min_retry_seconds: float = 1.0,
    busy_timeout_seconds: float = 5.0,
    on_recovered: Callable[[], None] | None = None,
    on_reopened: Callable[[str], None] | None = None,
    on_checked: Callable[[str | None], None] | None = None,
    file_check_seconds: float = FILE_CHECK_SECONDS,
    integrity_check_seconds: float = INTEGRITY_CHECK_SECONDS,
) -> tuple[StateWriter | None, LoadResult]:
    """Open the store in a new writer thread and read it; no writer if it is unavailable."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-writer")
    loop = asyncio.get_running_loop()
    store, result = await loop.run_in_executor(
        executor, lambda: open_store(path, busy_timeout_seconds=busy_timeout_seconds)
    )
    if store is None:
        executor.shutdown(wait=False)
        return None, result
    writer = StateWriter(
        store,
        executor,
        record=record,
        retired_at=retired_at,
        debounce_seconds=debounce_seconds,
        on_error=on_error,
        min_retry_seconds=min_retry_seconds,
        on_recovered=on_recovered,
        on_reopened=on_reopened,
        on_checked=on_checked,
        file_check_seconds=file_check_seconds,
        integrity_check_seconds=integrity_check_seconds,
    )
    return writer, result


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    return (items[start : start + size] for start in range(0, len(items), size))
