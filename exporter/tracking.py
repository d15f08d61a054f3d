"""Which ingestionIds are tracked, and why: the one entry point for every discovery source.

The config file, the watched directory, the admin API, notifications and the signing proxy
register ids here.
The tracker validates each id (`models.ingestion_id_problem`: the API's 255-character limit,
no control or invisible format characters, in Unicode NFC) and its labels (only allow-listed
names), enforces the cap on tracked ids, counts every rejection, keeps the store and the
poller in step, and marks the state file dirty. It does no I/O of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from exporter.models import (
    EXPOSED_STATUSES,
    MAX_INGESTION_ID_LENGTH,
    RejectReason,
    Status,
    exposed_status,
    ingestion_id_problem,
    refused_character,
)
from exporter.responses import clean_text
from exporter.sharding import Shard, shard_of
from exporter.state import StateSnapshot, UploadRecord
from exporter.state_writer import Persistence
from exporter.uploads import TrackedUpload, UploadStore

__all__ = [
    "ConfigIdsChange",
    "IngestionTracker",
    "Page",
    "Registration",
    "RejectReason",
    "Source",
    "Tracker",
    "UploadView",
]

log = structlog.get_logger("exporter.tracking")

#: One replica owning every id: the default.
UNSHARDED = Shard()

#: Longest label value accepted; longer ones are refused as bad_labels.
MAX_LABEL_VALUE_LENGTH = 128

#: Retired ids are remembered this long, so a restart or a file still lying in the watched
#: directory does not re-poll a finished upload; after that the list is pruned.
RETIRED_MEMORY_SECONDS = 7 * 86400.0

#: How often retired ids past their memory are looked for (each look costs O(ids forgotten)).
RETIRED_PRUNE_SECONDS = 60.0

_REASON_TEXT = {
    RejectReason.NOT_A_STRING: "ingestionId must be a string",
    RejectReason.EMPTY: "ingestionId must not be empty",
    RejectReason.TOO_LONG: f"ingestionId must be at most {MAX_INGESTION_ID_LENGTH} characters",
    RejectReason.CONTROL_CHARACTERS: "ingestionId must not contain control characters",
    RejectReason.FORMAT_CHARACTERS: "ingestionId must not contain invisible format characters "
    "(Unicode category Cf, such as U+202E or U+200B)",
    RejectReason.NOT_NFC: "ingestionId must be in Unicode normalization form NFC (composed "
    "characters): a decomposed spelling looks the same as another id",
}


class Source(enum.StrEnum):
    """Who asked for an id to be tracked."""

    CONFIG = "config"
    DIRECTORY = "directory"
    API = "api"
    NOTIFICATION = "notification"
    PROXY = "proxy"  # an upload's answer the signing proxy passed on


@dataclass(frozen=True, slots=True)
class Registration:
    """The answer to a registration: accepted (new or already tracked) or rejected, and why."""

    ingestion_id: str
    accepted: bool
    created: bool = False
    reason: RejectReason | None = None
    message: str = ""


@dataclass(frozen=True, slots=True)
class ConfigIdsChange:
    """How many ids a new config added to, and dropped from, what the config source holds."""

    added: int
    removed: int


@dataclass(frozen=True, slots=True)
class UploadView:
    """A read-only copy of one tracked upload, for the admin API."""

    ingestion_id: str
    status: str
    sources: tuple[str, ...]
    labels: Mapping[str, str]
    first_seen: float
    status_changed: float
    last_poll: float | None
    last_success: float | None
    last_error: str | None
    terminal_at: float | None
    report_available: bool


@dataclass(frozen=True, slots=True)
class Page:
    """Part of the tracked uploads in id order; the next part starts after `next_after`
    (None: nothing follows)."""

    views: tuple[UploadView, ...]
    next_after: str | None


class Tracker(Protocol):
    """What discovery sources need from the tracker."""

    async def register(
        self,
        ingestion_id: object,
        source: Source,
        labels: Mapping[str, object] | None = None,
        *,
        durable: bool = False,
    ) -> Registration:
        """Track an id for `source`. With `durable`, return only once the state file that
        holds it is on disk (what makes a 2xx an acknowledgement)."""
        ...

    async def release(
        self, ingestion_id: str, source: Source, *, immediate: bool, durable: bool = False
    ) -> bool:
        """`source` no longer wants the id. When no source wants it any more it is removed:
        at once if `immediate` (config removal, API DELETE) or if it awaits no status (never
        polled successfully, INVALID or UNKNOWN), else once it is terminal and its retention
        has passed (a deleted file: a FATAL must still be seen). False if `source` did not
        hold the id."""
        ...

    def ids_from(self, source: Source) -> set[str]:
        """Ids that `source` currently holds (a restarted directory watcher reconciles these)."""
        ...

    def holds(self, ingestion_id: str, source: Source) -> bool:
        """True if `source` holds the id now; O(1), unlike `ids_from`."""
        ...

    def owns(self, ingestion_id: str) -> bool:
        """True if this replica polls the id (`sharding`); every id without sharding."""
        ...


def _label_problem(labels: Mapping[str, object], allowed: tuple[str, ...]) -> str | None:
    for name, value in labels.items():
        if name not in allowed:
            listed = ", ".join(allowed) if allowed else "none are configured"
            return f"label {name!r} is not allow-listed in ingestions.labels ({listed})"
        if not isinstance(value, str):
            return f"label {name!r} must have a string value"
        if len(value) > MAX_LABEL_VALUE_LENGTH:
            return f"label {name!r} is longer than {MAX_LABEL_VALUE_LENGTH} characters"
        if refused_character(value) is not None:
            return f"label {name!r} must not contain control characters"
    return None


def _view(upload: TrackedUpload) -> UploadView:
    return UploadView(
        ingestion_id=upload.ingestion_id,
        status=upload.status,
        sources=tuple(sorted(upload.sources)),
        labels=dict(upload.labels),
        first_seen=upload.first_seen,
        status_changed=upload.status_changed,
        last_poll=upload.last_poll,
        last_success=upload.last_success,
        last_error=upload.last_error.value if upload.last_error else None,
        terminal_at=upload.terminal_at,
        report_available=upload.report_available,
    )


class IngestionTracker:
    """Registers and releases ids for every source; keeps store, poller and state in step.

    `on_added` / `on_removed` are the poller's `track` / `untrack`; `on_rejected` counts a
    rejection by reason. Without a `state` writer nothing is persisted and `durable` is a no-op.
    """

    def __init__(
        self,
        store: UploadStore,
        *,
        max_tracked: int,
        label_names: tuple[str, ...],
        on_added: Callable[[list[str]], None],
        on_removed: Callable[[list[str]], None],
        on_rejected: Callable[[RejectReason], None],
        state: Persistence | None = None,
        shard: Shard = UNSHARDED,
        notification_cap: int | None = None,
        invalid_retention: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._shard = shard
        self._max_tracked = max_tracked
        self._notification_cap = notification_cap
        self._invalid_retention = invalid_retention
        self._label_names = label_names
        self._on_added = on_added
        self._on_removed = on_removed
        self._on_rejected = on_rejected
        self._state = state
        self._clock = clock
        # Durable changes to one id take turns: a change rolled back after a failed write
        # must not take a concurrent, acknowledged change to the same id with it.
        self._id_locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._pruned_at = -math.inf

    def configure(
        self,
        *,
        max_tracked: int,
        label_names: tuple[str, ...],
        notification_cap: int | None = None,
        invalid_retention: float | None = None,
    ) -> None:
        """Apply reloaded limits; ids already tracked stay, even above a lowered cap.

        `notification_cap`: how many ids the notification source may hold at once (None:
        only `max_tracked` applies). `invalid_retention`: seconds after which an id only
        notifications hold, and that the API called INVALID, is released (None: never).
        """
        self._max_tracked = max_tracked
        self._label_names = label_names
        self._notification_cap = notification_cap
        self._invalid_retention = invalid_retention

    def attach_state(self, state: Persistence | None) -> None:
        """Persist through `state` from now on (set before `restore`)."""
        self._state = state

    async def register(
        self,
        ingestion_id: object,
        source: Source,
        labels: Mapping[str, object] | None = None,
        *,
        durable: bool = False,
    ) -> Registration:
        """Track an id for `source`; see `Tracker.register`."""
        problem = ingestion_id_problem(ingestion_id)
        if problem is not None:
            shown = ingestion_id if isinstance(ingestion_id, str) else ""
            return self._reject(shown[:MAX_INGESTION_ID_LENGTH], problem, _REASON_TEXT[problem])
        assert isinstance(ingestion_id, str)
        if not self._shard.owns(ingestion_id):
            return self._not_owned(ingestion_id, source)
        label_problem = _label_problem(labels or {}, self._label_names)
        if label_problem is not None:
            return self._reject(ingestion_id, RejectReason.BAD_LABELS, label_problem)
        if self._store.is_retired(ingestion_id) and ingestion_id not in self._store:
            return Registration(
                ingestion_id, accepted=True, message="finished and retired; not polled again"
            )
        async with self._turn(ingestion_id, durable):
            return await self._add(ingestion_id, source, labels or {}, durable)

    async def _add(
        self, ingestion_id: str, source: Source, labels: Mapping[str, object], durable: bool
    ) -> Registration:
        if ingestion_id not in self._store and len(self._store) >= self._max_tracked:
            message = f"already tracking ingestions.max_tracked={self._max_tracked} ids"
            return self._reject(ingestion_id, RejectReason.CAP_REACHED, message)
        before = self._store.get(ingestion_id)
        held = before is not None and source.value in before.sources
        cap = self._notification_cap
        if (
            source is Source.NOTIFICATION
            and not held
            and cap is not None
            and self._store.held_by(source.value) >= cap
        ):
            # Messages are not authenticated: whoever can send to the queue must not be able
            # to fill max_tracked and lock the other sources out.
            message = f"notifications already hold notifications.sqs.max_registered={cap} ids"
            return self._reject(ingestion_id, RejectReason.NOTIFICATION_CAP, message)
        old_labels = dict(before.labels) if before is not None else {}
        new_labels = {k: str(v) for k, v in labels.items()}
        created = self._store.add(ingestion_id, source.value, new_labels)
        if created:
            self._on_added([ingestion_id])
            log.info("ingestion_registered", ingestion_id=ingestion_id, source=source.value)
        elif new_labels and new_labels != old_labels:
            # Kept backwards compatible (the last registration's labels win), but said aloud:
            # two apps registering one id with different labels is worth noticing.
            log.info(
                "labels_replaced",
                ingestion_id=ingestion_id,
                source=source.value,
                old_labels=old_labels,
                new_labels=new_labels,
            )

        def undo() -> None:
            self._undo_add(ingestion_id, source, created=created, held=held, labels=old_labels)

        await self._changed(ingestion_id, durable, undo)
        return Registration(ingestion_id, accepted=True, created=created)

    def _undo_add(
        self,
        ingestion_id: str,
        source: Source,
        *,
        created: bool,
        held: bool,
        labels: dict[str, str],
    ) -> None:
        """Roll back a registration whose write failed: as if it had never been asked for."""
        if not held:
            self._store.drop_source(ingestion_id, source.value)
        self._store.set_labels(ingestion_id, labels)
        upload = self._store.get(ingestion_id)
        if created and upload is not None and upload.released:
            self._store.remove(ingestion_id)
            self._on_removed([ingestion_id])
        log.info("ingestion_registration_undone", ingestion_id=ingestion_id, source=source.value)

    async def release(
        self, ingestion_id: str, source: Source, *, immediate: bool, durable: bool = False
    ) -> bool:
        """`source` no longer wants the id; see `Tracker.release`."""
        dropped = await self.release_sources(
            ingestion_id, (source,), immediate=immediate, durable=durable
        )
        return bool(dropped)

    async def release_sources(
        self,
        ingestion_id: str,
        sources: Iterable[Source],
        *,
        immediate: bool,
        durable: bool = False,
    ) -> tuple[Source, ...]:
        """Like `release`, for several sources in one change (one write, one rollback);
        returns those that held the id."""
        async with self._turn(ingestion_id, durable):
            upload = self._store.get(ingestion_id)
            if upload is None:
                return ()
            dropped = tuple(s for s in sources if self._store.drop_source(ingestion_id, s.value))
            if not dropped:
                return ()
            names = ",".join(s.value for s in dropped)
            removed = upload.released and (immediate or not upload.awaiting_status)
            if removed:
                self._store.remove(ingestion_id)
                self._on_removed([ingestion_id])
                log.info("ingestion_removed", ingestion_id=ingestion_id, source=names)
            elif upload.released:
                log.info("ingestion_released", ingestion_id=ingestion_id, source=names)

            def undo() -> None:
                self._undo_release(upload, dropped, removed=removed)

            await self._changed(ingestion_id, durable, undo)
            return dropped

    def _undo_release(
        self, upload: TrackedUpload, sources: tuple[Source, ...], *, removed: bool
    ) -> None:
        """Roll back a release whose write failed: the sources hold the id again."""
        current = self._store.get(upload.ingestion_id)
        if current is None and removed:
            upload.sources.update(s.value for s in sources)
            self._store.restore(upload)
            self._on_added([upload.ingestion_id])
        elif current is not None:
            for source in sources:
                self._store.add(upload.ingestion_id, source.value, {})
        names = ",".join(s.value for s in sources)
        log.info("ingestion_release_undone", ingestion_id=upload.ingestion_id, source=names)

    def invalid_release_in(self, ingestion_id: str) -> float | None:
        """Seconds until an id that only notifications hold, and that the API calls INVALID,
        is released (0: now); None for any other id, which is polled on as before.

        Counted from when it became INVALID, so a message naming it again does not extend it.
        """
        upload = self._store.get(ingestion_id)
        retention = self._invalid_retention
        if retention is None or upload is None or not self._notification_only_invalid(upload):
            return None
        return max(0.0, upload.status_changed + retention - self._clock())

    def release_invalid(self, ingestion_id: str) -> bool:
        """Release an id `invalid_release_in` found due; True if it is no longer tracked.

        False when another source has taken it meanwhile: it stays, polled as before.
        """
        upload = self._store.get(ingestion_id)
        if upload is None:
            return True
        if not self._notification_only_invalid(upload):
            return False
        self._store.drop_source(ingestion_id, Source.NOTIFICATION.value)
        self._store.remove(ingestion_id)
        self._on_removed([ingestion_id])
        log.info(
            "ingestion_removed",
            ingestion_id=ingestion_id,
            source=Source.NOTIFICATION.value,
            reason="invalid_retention",
        )
        self._mark([ingestion_id])
        return True

    @staticmethod
    def _notification_only_invalid(upload: TrackedUpload) -> bool:
        return upload.status == Status.INVALID.value and upload.sources == {
            Source.NOTIFICATION.value
        }

    @contextlib.asynccontextmanager
    async def _turn(self, ingestion_id: str, durable: bool) -> AsyncIterator[None]:
        """Hold the id's lock for a durable change (others need none: they cannot fail)."""
        if not durable or self._state is None:
            yield
            return
        lock, users = self._id_locks.get(ingestion_id, (asyncio.Lock(), 0))
        self._id_locks[ingestion_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._id_locks[ingestion_id]
            if users == 1:
                del self._id_locks[ingestion_id]
            else:
                self._id_locks[ingestion_id] = (lock, users - 1)

    def replace_config_ids(
        self, ids: Sequence[str], *, previous: Sequence[str] | None = None
    ) -> ConfigIdsChange:
        """Make the config source hold exactly `ids` (validated by the config loader).

        Config ids are not subject to the cap: the config is explicit, and the loader already
        refuses more ids than `ingestions.max_tracked`. Ids dropped from the config go at once
        (logged one by one, like a DELETE: a vanished id must be traceable).

        With `previous`, the ids the config held until now (a reload), only the difference is
        looked at: set operations in C instead of a Python step per tracked upload, so a
        reload of 100,000 unchanged ids does not stall the event loop.
        """
        if previous is None:
            wanted = dict.fromkeys(i for i in ids if self._shard.owns(i))
            dropped = sorted(self.ids_from(Source.CONFIG) - wanted.keys())
            candidates: Iterable[str] = wanted
        elif tuple(ids) == tuple(previous):
            return ConfigIdsChange(added=0, removed=0)  # the usual reload: labels, limits...
        else:
            kept, listed = set(previous), set(ids)
            dropped = sorted(i for i in kept - listed if self.holds(i, Source.CONFIG))
            new = listed - kept
            candidates = (
                [i for i in dict.fromkeys(ids) if i in new and self._shard.owns(i)] if new else []
            )
        source = Source.CONFIG.value
        for ingestion_id in dropped:
            self._store.drop_source(ingestion_id, source)
            upload = self._store.get(ingestion_id)
            if upload is not None and upload.released:
                self._store.remove(ingestion_id)
                self._on_removed([ingestion_id])
                log.info("ingestion_removed", ingestion_id=ingestion_id, source=source)
            elif upload is not None:
                held_by = sorted(upload.sources)  # another source still wants it
                log.info(
                    "ingestion_kept", ingestion_id=ingestion_id, source=source, held_by=held_by
                )
        newly_held = []
        for ingestion_id in candidates:
            upload = self._store.get(ingestion_id)
            if not self._store.is_retired(ingestion_id) and (
                upload is None or Source.CONFIG.value not in upload.sources
            ):
                newly_held.append(ingestion_id)
        added = [
            ingestion_id
            for ingestion_id in newly_held
            if self._store.add(ingestion_id, Source.CONFIG.value, {})
        ]
        if added:
            self._on_added(added)
        self._mark([*dropped, *newly_held])
        return ConfigIdsChange(added=len(newly_held), removed=len(dropped))

    def ids_from(self, source: Source) -> set[str]:
        """Ids that `source` currently holds."""
        return {u.ingestion_id for u in self._store if source.value in u.sources}

    def holds(self, ingestion_id: str, source: Source) -> bool:
        """True if `source` holds the id now."""
        upload = self._store.get(ingestion_id)
        return upload is not None and source.value in upload.sources

    def owns(self, ingestion_id: str) -> bool:
        """See `Tracker.owns`."""
        return self._shard.owns(ingestion_id)

    def view(self, ingestion_id: str) -> UploadView | None:
        """One upload as the admin API shows it."""
        upload = self._store.get(ingestion_id)
        return None if upload is None else _view(upload)

    def page(self, after: str | None, limit: int, statuses: frozenset[str], examine: int) -> Page:
        """Up to `limit` uploads whose ids sort above `after`, only those in `statuses` if any.

        At most max(`limit`, `examine`) ids are looked at, so a filtered page may be short,
        even empty, with more to come. The cost is O(log n + what is looked at), whatever
        the number tracked, and an id removed between pages moves no other id.
        """
        views: list[UploadView] = []
        budget = max(limit, examine)
        last: str | None = None
        for ingestion_id in self._store.ids_after(after):
            if len(views) == limit or budget == 0:
                return Page(tuple(views), last)
            budget -= 1
            last = ingestion_id
            upload = self._store.get(ingestion_id)
            if upload is not None and (not statuses or upload.status in statuses):
                views.append(_view(upload))
        return Page(tuple(views), None)

    def statuses(self) -> tuple[str, ...]:
        """Statuses an upload can be listed under: every exposed one, OTHER for any value the
        API sent outside the documented five (the log names the value)."""
        return EXPOSED_STATUSES

    def record(self, ingestion_id: str) -> UploadRecord | None:
        """What the state must hold for this id now (None: no row)."""
        u = self._store.get(ingestion_id)
        if u is None:
            return None
        return UploadRecord(
            ingestion_id=u.ingestion_id,
            sources=tuple(sorted(u.sources)),
            labels=dict(u.labels),
            status=u.status,
            first_seen=u.first_seen,
            status_changed=u.status_changed,
            last_success=u.last_success,
            terminal_at=u.terminal_at,
            report_available=u.report_available,
            queue_observed=u.queue_observed,
            released=u.released,
        )

    def retired_at(self, ingestion_id: str) -> float | None:
        """When the id was retired, if it is remembered as retired."""
        return self._store.retired.get(ingestion_id)

    def restore(self, snapshot: StateSnapshot) -> None:
        """Load what a previous run persisted, before polling starts.

        Rows of ids another replica owns now (sharding.total changed) are deleted; rows
        whose status is outside `EXPOSED_STATUSES` (an older version kept each value the API
        sent) are rewritten with OTHER or UNKNOWN.
        """
        rewrite = []
        for record in snapshot.uploads:
            if not self._shard.owns(record.ingestion_id):
                rewrite.append(record.ingestion_id)
                continue
            status = exposed_status(record.status)
            if status != record.status:
                rewrite.append(record.ingestion_id)
            self._store.restore(
                TrackedUpload(
                    ingestion_id=record.ingestion_id,
                    first_seen=record.first_seen,
                    status=status,
                    status_changed=record.status_changed,
                    sources=set(record.sources),
                    labels=dict(record.labels),
                    last_success=record.last_success,
                    report_available=record.report_available,
                    terminal_at=record.terminal_at,
                    queue_observed=record.queue_observed,
                )
            )
        self._store.restore_retired(snapshot.retired)
        self._mark(rewrite)
        self._prune_retired()

    def changed(self, ingestion_id: str) -> None:
        """A poll changed this upload (status, retirement): persist it within the debounce."""
        self._mark([ingestion_id])
        if self._state is not None and self._store.is_retired(ingestion_id):
            self._state.mark_retired([ingestion_id])
        self._prune_retired()

    def _prune_retired(self) -> None:
        """Forget retired ids past their memory, at most once a minute."""
        now = self._clock()
        if now - self._pruned_at < RETIRED_PRUNE_SECONDS:
            return
        self._pruned_at = now
        forgotten = self._store.forget_retired(before=now - RETIRED_MEMORY_SECONDS)
        if forgotten and self._state is not None:
            self._state.mark_retired(forgotten)

    def _mark(self, ingestion_ids: list[str]) -> None:
        if self._state is not None and ingestion_ids:
            self._state.mark(ingestion_ids)

    async def _changed(self, ingestion_id: str, durable: bool, undo: Callable[[], None]) -> None:
        """Persist the change; durably: wait for the write, and roll the change back if the
        write fails (the StateError then propagates)."""
        self._mark([ingestion_id])
        if durable and self._state is not None:
            await self._state.flush(undo)

    def _not_owned(self, ingestion_id: str, source: Source) -> Registration:
        owner = shard_of(ingestion_id, self._shard.total)
        message = (
            f"owned by shard {owner} of {self._shard.total}, not this one ({self._shard.index})"
        )
        if source is Source.API:
            # Someone sent it to the wrong replica: say so. The config and a shared directory
            # list every id on every replica, so skipping is normal there.
            return self._reject(ingestion_id, RejectReason.NOT_OWNED, message)
        return Registration(ingestion_id, accepted=True, message=message)

    def _reject(self, ingestion_id: str, reason: RejectReason, message: str) -> Registration:
        self._on_rejected(reason)
        log.warning(
            "ingestion_rejected",
            ingestion_id=clean_text(ingestion_id),
            reason=reason.value,
            message=message,
        )
        return Registration(ingestion_id, accepted=False, reason=reason, message=message)
