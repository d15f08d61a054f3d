"""The watched directory: one file per upload, registered with the tracker and released on delete.

The application beside the exporter drops one file per upload into `ingestions.directory`
(typically the pod's shared emptyDir). The directory is polled (a listing every
`poll_seconds`, off the event loop), not watched with inotify, which misses events on some
volume types. A scan costs the event loop O(new, changed and deleted files), never O(files)
or O(tracked ids): listing, reading and comparing with the last scan run in a worker thread,
and new files are registered in batches of `BATCH_FILES` with the loop free between them.

File format
-----------
* Names starting with "." are ignored, so a writer can create `.tmp-x` and rename it into
  place atomically. Directories, FIFOs, sockets and devices are ignored too. A symlink is
  followed only when it resolves to a regular file inside the directory (the layout of a
  ConfigMap volume); one pointing elsewhere is skipped, so the volume cannot make the
  exporter read, and then publish, its own files.
* A file larger than 64 KiB is skipped with a warning.
* The content is UTF-8 (a leading byte-order mark is dropped). If the stripped content starts
  with "{", it is a JSON object::

      {"ingestionId": "amzn1.ingestion.abc", "labels": {"team": "pricing"}}

  `labels` is optional; other keys are ignored (a missing or non-string `ingestionId` goes
  to the tracker, which refuses it as not_a_string). A document nested deeper than
  `MAX_JSON_DEPTH` is refused as too_deep before it is parsed: the parser recurses, and a
  60 KB file of brackets would otherwise exhaust the stack. Otherwise the first line of the stripped
  content, stripped, is the id. A file that is empty (or only whitespace) names the id that
  is its own file name, so `touch <directory>/<id>` works.
* A new or changed file is registered with the tracker (source `directory`). The tracker
  validates the id and the labels; a refusal is logged once per file version and not retried
  until the file changes (`touch` it to retry, after cap_reached say).
* When a file is deleted, or changed to name another id (or nothing readable), its old id is
  released for removal once terminal (`immediate=False`: a FATAL must still be seen),
  unless another file still names it.

A file version is its (mtime in ns, size, inode): a file is read again only when one of
these changes. The inode catches a file of the same size renamed into place within the
file system's timestamp granularity. Problems with a file (too large, not UTF-8, bad JSON,
too deep) are logged once per version and counted in
`catalog_exporter_directory_file_errors_total{reason}`; a read error (permissions, say) is
logged and counted once and retried on every scan, since a chmod does not change the version.
Whatever goes wrong with one file, even a bug of ours, stays with that file: the scan goes
on with the others (a crash while registering a file is retried on the next scan).

The first scan that lists the directory releases every id the tracker holds for the
directory (from a previous run) that no file names any more. A missing or unlistable
directory is logged once per distinct problem and retried; it releases nothing, since an
unreadable listing says nothing about which files are gone. While scans fail (no listing, or
a crash), `catalog_exporter_directory_scan_failing` is 1, and
`catalog_exporter_directory_last_scan_success_timestamp_seconds` says since when.

Spool mode (`ingestions.directory_mode: spool`)
-----------------------------------------------
The exporter consumes the files: a file is a request to track its id, not the reason it
stays tracked. Each new file is registered durably (the tracker's `durable=True`: the state
database has committed the row, the same acknowledgement as an admin 2xx), then deleted. The
id stays held by the `directory` source in the state, so the delete releases nothing and a
restart's first scan reconciles nothing; it leaves like any other id once terminal and past
its retention (or through the admin API's DELETE with `?source=directory`). What happens to
each file:

* registered (or already tracked, or retired): deleted, counted as `registered`;
* refused for good (an invalid id, labels not allowed) or naming no id (too large, bad
  JSON...): logged and counted once, then deleted (`refused`, `unusable`); it can never be
  tracked as it is, and kept it would fill the volume;
* refused as cap_reached, not made durable (the state cannot be written), or not deletable
  (no write access): kept, and the spool pauses for `RETRY_SECONDS` before it tries again
  (each pause is counted in `catalog_exporter_directory_file_errors_total`: reason
  cap_reached, not_durable, delete_failed, and logged once per distinct problem);
* owned by another shard: left for its owner, like a file in watch mode;
* unreadable or crashed: as in watch mode (retried on every scan).

A file is deleted only if it still has the version that was read (checked just before the
unlink), so a file rewritten meanwhile is read again instead; the app should still write
each upload under a new name.

Every scan, in both modes, also sums the directory's usage off the loop: the number of
entries that are not directories and their allocated bytes (`st_blocks * 512`, what fills
an emptyDir's `sizeLimit`: a 40-byte file takes a 4 KiB block), for
`catalog_exporter_directory_files` and `catalog_exporter_directory_bytes`.

This module reads files and talks to the tracker; it must not validate ids or labels (the
tracker's job, which also counts rejections) and never logs file content beyond the id.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import json
import os
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from exporter.boundedjson import MAX_JSON_DEPTH, json_depth_exceeds
from exporter.metrics import DirectoryMetrics
from exporter.models import MAX_REGISTRATION_BYTES, RejectReason
from exporter.state import StateError
from exporter.tracking import Registration, Source, Tracker

log = structlog.get_logger("exporter.discovery")

#: New or changed files handled between two yields to the event loop.
BATCH_FILES = 50

#: Batches of new files spool mode has in flight at once (registered, awaiting their commit,
#: or being deleted): enough for commits to overlap the next registrations, few enough that a
#: cap reached or a failing state stops it within a few hundred files.
SPOOL_WINDOW = 8

#: Seconds the spool waits after a file it could not consume (cap reached, state not
#: writable, delete refused) before it tries again: each try costs the loop a registration
#: and a log line, and none of these clears up in a few seconds.
RETRY_SECONDS = 30.0


class FileProblem(enum.StrEnum):
    """Why a file names no id (`reason` of the file-errors counter and of the warning)."""

    TOO_LARGE = "too_large"
    NOT_UTF8 = "not_utf8"
    BAD_JSON = "bad_json"
    TOO_DEEP = "too_deep"
    SYMLINK_OUTSIDE = "symlink_outside"
    NOT_A_FILE = "not_a_file"
    READ_ERROR = "read_error"
    #: A bug of ours while reading, parsing or registering the file.
    CRASHED = "crashed"
    #: Spool mode: kept, as the tracker is full (ingestions.max_tracked).
    CAP_REACHED = "cap_reached"
    #: Spool mode: kept, as the registration could not be committed to the state.
    NOT_DURABLE = "not_durable"
    #: Spool mode: registered, but the file could not be deleted (no write access?).
    DELETE_FAILED = "delete_failed"


class Deleted(enum.StrEnum):
    """Why spool mode deleted a file (`reason` of the deleted-files counter)."""

    REGISTERED = "registered"
    REFUSED = "refused"
    UNUSABLE = "unusable"


_Version = tuple[int, int, int]  # (st_mtime_ns, st_size, st_ino)
_NO_VERSION: _Version = (-1, -1, -1)


@dataclass(frozen=True, slots=True)
class _Named:
    """A file version that names an id (not yet validated: the tracker does that)."""

    ingestion_id: object
    labels: Mapping[str, object] | None = None


@dataclass(frozen=True, slots=True)
class _Bad:
    """A file version whose content names no id; skipped until the file changes."""

    reason: FileProblem
    message: str


@dataclass(frozen=True, slots=True)
class _Unreadable:
    """An error reading a file; retried on every scan."""

    message: str


@dataclass(frozen=True, slots=True)
class _Observed:
    """What one scan found in a new or changed file."""

    version: _Version
    content: _Named | _Bad | _Unreadable


@dataclass(frozen=True, slots=True)
class _Seen:
    """A file as last read: its version and the id it holds for the tracker, if any."""

    version: _Version
    held: str | None


@dataclass(frozen=True, slots=True)
class _Listing:
    """What one listing found: new or changed files, and the names no longer listed."""

    changed: dict[str, _Observed]
    #: Names of `_files` that are gone (deleted, or no longer regular files).
    gone: list[str]
    #: Names with a noted read error or crash that are gone.
    forgotten: list[str]
    #: Entries that are not directories, hidden ones included, and their allocated bytes.
    files: int = 0
    allocated_bytes: int = 0


class DirectoryWatcher:
    """Keeps the tracker's `directory` ids in step with the files in one directory."""

    def __init__(
        self,
        directory: Path,
        tracker: Tracker,
        *,
        poll_seconds: float = 2.0,
        metrics: DirectoryMetrics | None = None,
        consume: bool = False,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """`consume`: spool mode (see the module's docstring); the tracker must then persist
        (a `durable` registration is what allows the delete)."""
        if poll_seconds <= 0:
            msg = f"poll_seconds must be positive, got {poll_seconds}"
            raise ValueError(msg)
        self._directory = directory
        self._tracker = tracker
        self._poll_seconds = poll_seconds
        self._metrics = metrics or DirectoryMetrics(CollectorRegistry(), FileProblem)
        self._files: dict[str, _Seen] = {}
        # How many files hold each id, kept in step with `_files`: O(1) per change.
        self._holders: dict[str, int] = {}
        self._read_errors: dict[str, tuple[_Version, str]] = {}
        # Files whose registration crashed, and the version: logged once, retried every scan.
        self._crashed: dict[str, _Version] = {}
        # Kept across scans so an exception between a file's removal and its release
        # cannot lose the release.
        self._to_release: set[str] = set()
        # Spool mode: the files are gone by design, so their absence releases nothing.
        self._consuming = consume
        self._reconciled = consume
        self._directory_problem: str | None = None
        self._monotonic = monotonic
        # Spool mode: no file is consumed before this (monotonic time), after a failure.
        self._paused_until = -float("inf")
        # The last spool problem logged, by reason: logged again only when it changes.
        self._spool_problems: dict[FileProblem, str] = {}

    async def run(self) -> None:
        """Scan, sleep `poll_seconds`, forever; cancel the task to stop."""
        log.info(
            "directory_watcher_started",
            directory=str(self._directory),
            poll_seconds=self._poll_seconds,
        )
        while True:
            try:
                await self.scan()
            except Exception:
                # A bug of ours (or the tracker's) must not stop discovery for good.
                self._metrics.scan_failing.set(1)
                log.exception("ingestion_directory_scan_crashed", directory=str(self._directory))
            await asyncio.sleep(self._poll_seconds)

    async def scan(self) -> None:
        """One pass: register new and changed files, release the ids of vanished ones.

        Listing, reading and comparing against what is known run in a worker thread (the
        only code touching `_files` while it runs, since scans never overlap); the loop then
        pays only for what changed, in batches that yield to it.
        """
        noted = (self._read_errors, self._crashed)
        try:
            listing = await asyncio.to_thread(_observe, self._directory, self._files, noted)
        except OSError as error:
            self._metrics.scan_failing.set(1)
            self._directory_unavailable(error)
            return
        if self._directory_problem is not None:
            self._directory_problem = None
            log.info("ingestion_directory_available", directory=str(self._directory))

        self._metrics.files.set(listing.files)
        self._metrics.allocated_bytes.set(listing.allocated_bytes)
        if self._consuming:
            await self._consume_all(listing.changed)
        # Registrations come before releases, so an id that moves from one file to another
        # in the same scan is never released.
        for done, name in enumerate(sorted(listing.changed), start=1):
            if self._consuming:
                break
            await self._update_confined(name, listing.changed[name])
            if done % BATCH_FILES == 0:
                await asyncio.sleep(0)  # thousands of new files must not stall the loop
        for name in sorted(listing.gone):
            seen = self._files.pop(name)
            self._unhold(seen.held)
            log.info("ingestion_file_removed", file=name, ingestion_id=seen.held)
            if seen.held is not None:
                self._to_release.add(seen.held)
        for name in listing.forgotten:
            self._read_errors.pop(name, None)
            self._crashed.pop(name, None)
        if not self._reconciled:
            # Once per watcher: ids a previous run registered whose files are gone.
            held = self._tracker.ids_from(Source.DIRECTORY)
            self._to_release.update(i for i in held if i not in self._holders)
            self._reconciled = True
        await self._release_orphans()
        self._metrics.scan_succeeded()

    async def _update_confined(self, name: str, found: _Observed) -> None:
        """`_update`, with a crash confined to this file: logged once per version, retried."""
        try:
            await self._update(name, found)
        except Exception:
            if self._crashed.get(name) != found.version:
                self._crashed[name] = found.version
                self._metrics.file_errors.labels(FileProblem.CRASHED.value).inc()
                log.exception("ingestion_file_crashed", file=name)
        else:
            self._crashed.pop(name, None)

    async def _update(self, name: str, found: _Observed) -> None:
        content = found.content
        if isinstance(content, _Unreadable):
            # The previous version's id stays held: a passing read error is no deletion.
            if self._read_errors.get(name) != (found.version, content.message):
                self._read_errors[name] = (found.version, content.message)
                self._metrics.file_errors.labels(FileProblem.READ_ERROR.value).inc()
                log.warning(
                    "ingestion_file_unreadable",
                    file=name,
                    reason=FileProblem.READ_ERROR.value,
                    message=content.message,
                )
            return
        self._read_errors.pop(name, None)
        if isinstance(content, _Bad):
            self._metrics.file_errors.labels(content.reason.value).inc()
            log.warning(
                "ingestion_file_unreadable",
                file=name,
                reason=content.reason.value,
                message=content.message,
            )
            held = None
        else:
            held = await self._register(name, content)
        previous = self._files.get(name)
        self._files[name] = _Seen(found.version, held)
        self._hold(held)
        if previous is not None:
            self._unhold(previous.held)
            if previous.held is not None and previous.held != held:
                self._to_release.add(previous.held)

    def _hold(self, ingestion_id: str | None) -> None:
        if ingestion_id is not None:
            self._holders[ingestion_id] = self._holders.get(ingestion_id, 0) + 1

    def _unhold(self, ingestion_id: str | None) -> None:
        if ingestion_id is None:
            return
        left = self._holders[ingestion_id] - 1
        if left:
            self._holders[ingestion_id] = left
        else:
            del self._holders[ingestion_id]

    async def _register(self, name: str, named: _Named) -> str | None:
        registration = await self._tracker.register(
            named.ingestion_id, Source.DIRECTORY, named.labels
        )
        if registration.accepted:
            log.info(
                "ingestion_file_registered",
                file=name,
                ingestion_id=registration.ingestion_id,
                created=registration.created,
            )
            return registration.ingestion_id
        # The id itself is not logged: it may be the reason (too long, control characters).
        log.warning(
            "ingestion_file_rejected",
            file=name,
            reason=registration.reason,
            message=registration.message,
        )
        # A refused update (bad labels, say) of an id the directory already holds leaves it
        # tracked; the file still names it, so it must still be released with the file.
        if isinstance(named.ingestion_id, str) and self._tracker.holds(
            named.ingestion_id, Source.DIRECTORY
        ):
            return named.ingestion_id
        return None

    async def _release_orphans(self) -> None:
        for ingestion_id in sorted(self._to_release):
            if ingestion_id not in self._holders:
                was_held = await self._tracker.release(
                    ingestion_id, Source.DIRECTORY, immediate=False
                )
                log.info("ingestion_released", ingestion_id=ingestion_id, was_held=was_held)
            self._to_release.discard(ingestion_id)

    async def _consume_all(self, changed: Mapping[str, _Observed]) -> None:
        """Spool mode: register each new file durably, then delete it; in batches of
        `BATCH_FILES` (one thread hop for the deletes each), up to `SPOOL_WINDOW` batches in
        flight, so that their flushes share group commits instead of waiting for each other."""
        names = sorted(changed)
        flying: collections.deque[asyncio.Task[None]] = collections.deque()
        try:
            for start in range(0, len(names), BATCH_FILES):
                if len(flying) >= SPOOL_WINDOW:
                    await flying.popleft()
                if self._monotonic() < self._paused_until:
                    break  # the rest waits, unread by the loop: O(1) while paused
                batch = {n: changed[n] for n in names[start : start + BATCH_FILES]}
                flying.append(asyncio.create_task(self._consume_batch(batch)))
                await asyncio.sleep(0)  # each batch's registrations run in a step of their own
            while flying:
                await flying.popleft()
        finally:
            for task in flying:  # a cancelled scan leaves nothing running
                task.cancel()

    async def _consume_batch(self, batch: Mapping[str, _Observed]) -> None:
        outcomes = await asyncio.gather(
            *(self._consume_confined(name, found) for name, found in batch.items())
        )
        doomed = {
            name: (batch[name].version, reason)
            for name, reason in zip(batch, outcomes, strict=True)
            if reason is not None
        }
        if not doomed:
            return
        versions = {name: version for name, (version, _) in doomed.items()}
        failed = await asyncio.to_thread(_unlink_all, self._directory, versions)
        for name, (_, reason) in doomed.items():
            if name not in failed:
                self._metrics.files_deleted.labels(reason.value).inc()
        if failed:
            name, message = min(failed.items())
            self._spool_blocked(FileProblem.DELETE_FAILED, message, file=name)
        elif self._spool_problems and self._monotonic() >= self._paused_until:
            log.info("ingestion_spool_resumed", directory=str(self._directory))
            self._spool_problems.clear()

    async def _consume_confined(self, name: str, found: _Observed) -> Deleted | None:
        """`_consume`, with a crash confined to this file: logged once per version, retried."""
        try:
            reason = await self._consume(name, found)
        except Exception:
            if self._crashed.get(name) != found.version:
                self._crashed[name] = found.version
                self._metrics.file_errors.labels(FileProblem.CRASHED.value).inc()
                log.exception("ingestion_file_crashed", file=name)
            return None
        self._crashed.pop(name, None)
        return reason

    async def _consume(self, name: str, found: _Observed) -> Deleted | None:
        """What to do with one new file: the reason to delete it, or None to keep it."""
        content = found.content
        if isinstance(content, _Unreadable | _Bad):
            await self._update(name, found)  # logged and counted as in watch mode
            if isinstance(content, _Unreadable):
                return None  # retried on every scan, like a read error in watch mode
            self._files.pop(name, None)
            return Deleted.UNUSABLE
        try:
            registration = await self._tracker.register(
                content.ingestion_id, Source.DIRECTORY, content.labels, durable=True
            )
        except StateError as error:
            self._spool_blocked(FileProblem.NOT_DURABLE, str(error), file=name)
            return None
        return self._consumed(name, found, registration)

    def _consumed(self, name: str, found: _Observed, registration: Registration) -> Deleted | None:
        if registration.accepted:
            if not self._tracker.owns(registration.ingestion_id):
                # Another replica's file in a shared directory: its owner consumes it.
                self._files[name] = _Seen(found.version, None)
                return None
            log.info(
                "ingestion_file_consumed",
                file=name,
                ingestion_id=registration.ingestion_id,
                created=registration.created,
            )
            return Deleted.REGISTERED
        if registration.reason is RejectReason.CAP_REACHED:
            self._spool_blocked(FileProblem.CAP_REACHED, registration.message, file=name)
            return None
        # The tracker logged and counted the refusal; the id is not logged (it may be why).
        log.warning(
            "ingestion_file_discarded",
            file=name,
            reason=registration.reason,
            message="refused for good, so deleted: write a corrected file to track the upload",
        )
        return Deleted.REFUSED

    def _spool_blocked(self, problem: FileProblem, message: str, *, file: str) -> None:
        """Pause consumption for RETRY_SECONDS; count, and log a problem not logged last."""
        self._paused_until = self._monotonic() + RETRY_SECONDS
        self._metrics.file_errors.labels(problem.value).inc()
        if self._spool_problems.get(problem) == message:
            return
        self._spool_problems[problem] = message
        log.warning(
            "ingestion_file_kept",
            file=file,
            reason=problem.value,
            message=message,
            retry_in_seconds=RETRY_SECONDS,
        )

    def _directory_unavailable(self, error: OSError) -> None:
        missing = isinstance(error, FileNotFoundError)
        problem = "missing" if missing else str(error)
        if problem == self._directory_problem:
            return
        self._directory_problem = problem
        if missing:
            log.warning(
                "ingestion_directory_missing",
                directory=str(self._directory),
                message="directory does not exist yet",
            )
        else:
            log.warning(
                "ingestion_directory_unreadable", directory=str(self._directory), message=problem
            )


def _observe(
    directory: Path, known: Mapping[str, _Seen], noted: Iterable[Mapping[str, object]]
) -> _Listing:
    """The candidate files in `directory` that are new or changed since `known`, and what
    they say; the names of `known` and of each of `noted` that are no longer listed.

    Blocking: runs in a worker thread, and reads `known` and `noted`, which the caller must
    not change meanwhile. An error listing the directory propagates, so a partial listing is
    never taken for the whole.
    """
    root = os.path.realpath(directory)
    listed: set[str] = set()
    changed: dict[str, _Observed] = {}
    files = allocated = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            try:
                own = entry.stat(follow_symlinks=False)
            except OSError:  # deleted since listed, or unreadable: the read below says which
                own = None
            if own is not None and not stat.S_ISDIR(own.st_mode):
                files += 1
                allocated += own.st_blocks * 512
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    continue
                status = entry.stat()
            except FileNotFoundError:  # deleted since listed, or a dangling symlink
                continue
            except OSError as error:
                listed.add(entry.name)
                changed[entry.name] = _Observed(_NO_VERSION, _Unreadable(str(error)))
                continue
            if not stat.S_ISREG(status.st_mode):
                continue
            listed.add(entry.name)
            version = _version_of(status)
            seen = known.get(entry.name)
            if seen is not None and seen.version == version:
                continue
            try:
                changed[entry.name] = _read(entry, root)
            except Exception as error:  # one file must not stop the scan
                # No message: an exception's text may quote the content.
                message = f"{type(error).__name__} while reading the file"
                changed[entry.name] = _Observed(version, _Bad(FileProblem.CRASHED, message))
    gone = [name for name in known if name not in listed]
    forgotten = [name for names in noted for name in names if name not in listed]
    return _Listing(changed, gone, forgotten, files, allocated)


def _unlink_all(directory: Path, versions: Mapping[str, _Version]) -> dict[str, str]:
    """Delete each named file that still has the version read; the problems, by name.

    Blocking: runs in a worker thread. A file gone already counts as deleted; one with
    another version is kept (not a problem: the next scan reads it again).
    """
    failed: dict[str, str] = {}
    for name, version in versions.items():
        path = directory / name
        try:
            if version != _NO_VERSION and _version_of(path.stat()) != version:
                continue
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as error:
            failed[name] = f"could not delete the file: {error.strerror or error}"
    return failed


def _read(entry: os.DirEntry[str], root: str) -> _Observed:
    path = entry.path
    try:
        if entry.is_symlink():
            path = os.path.realpath(entry.path)
            if os.path.commonpath([root, path]) != root:
                return _Observed(
                    _version_of(entry.stat()),
                    _Bad(FileProblem.SYMLINK_OUTSIDE, "symlink resolves outside the directory"),
                )
        # O_NOFOLLOW: a file swapped for a symlink since the check is not followed.
        # O_NONBLOCK: one swapped for a FIFO does not block the thread.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        with open(os.open(path, flags), "rb") as file:
            # The version of what is read, not of what was listed a moment ago.
            status = os.fstat(file.fileno())
            version = _version_of(status)
            if not stat.S_ISREG(status.st_mode):
                return _Observed(version, _Bad(FileProblem.NOT_A_FILE, "not a regular file"))
            # Larger files are not read: no id needs more, and a stray log file is no id.
            if status.st_size > MAX_REGISTRATION_BYTES:
                return _Observed(version, _too_large())
            data = file.read(MAX_REGISTRATION_BYTES + 1)
    except OSError as error:
        return _Observed(_NO_VERSION, _Unreadable(str(error)))
    if len(data) > MAX_REGISTRATION_BYTES:
        return _Observed(version, _too_large())
    return _Observed(version, _parse(entry.name, data))


def _parse(name: str, data: bytes) -> _Named | _Bad:
    """What a file's content names. Messages never quote the content."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        return _Bad(FileProblem.NOT_UTF8, f"not UTF-8 (byte {error.start})")
    stripped = text.strip()
    if not stripped:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            return _Bad(FileProblem.NOT_UTF8, "empty file whose name is not UTF-8")
        return _Named(name)
    if not stripped.startswith("{"):
        return _Named(stripped.split("\n", 1)[0].strip())
    return _parse_json(stripped)


def _parse_json(text: str) -> _Named | _Bad:
    if json_depth_exceeds(text, MAX_JSON_DEPTH):
        return _Bad(FileProblem.TOO_DEEP, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        document: Any = json.loads(text)
    except json.JSONDecodeError as error:
        return _Bad(FileProblem.BAD_JSON, f"not a JSON object: {error.msg} at line {error.lineno}")
    except ValueError:
        # Not a JSONDecodeError: an integer past sys.get_int_max_str_digits(), say.
        return _Bad(FileProblem.BAD_JSON, "not a JSON object: a value Python cannot read")
    if not isinstance(document, dict):  # pragma: no cover - "{" guarantees an object
        return _Bad(FileProblem.BAD_JSON, "not a JSON object")
    labels = document.get("labels")
    if labels is not None and not isinstance(labels, dict):
        return _Bad(FileProblem.BAD_JSON, '"labels" is not a JSON object')
    return _Named(document.get("ingestionId"), labels)


def _version_of(status: os.stat_result) -> _Version:
    return (status.st_mtime_ns, status.st_size, status.st_ino)


def _too_large() -> _Bad:
    return _Bad(FileProblem.TOO_LARGE, f"larger than {MAX_REGISTRATION_BYTES} bytes")
