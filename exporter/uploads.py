"""The tracked uploads and what is known of each: the single source the metrics render.

`UploadStore` is the only writer of upload state. It knows nothing of HTTP, timing policy or
validation: the tracker decides which ids are tracked, the scheduler tells it what a poll
found. Each change is handed at once to the renderer `exposition` sets, which keeps the
upload's series pre-rendered; at scrape time only the aggregates are read. Timestamps here are
wall-clock seconds (they are exported and persisted); scheduling uses its own clock.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, ValuesView
from dataclasses import dataclass, field

from sortedcontainers import SortedList

from exporter.models import (
    EXPOSED_STATUSES,
    TERMINAL_STATUSES,
    ErrorKind,
    PollError,
    Status,
    StatusReport,
    exposed_status,
)


def _render_nothing(upload: TrackedUpload, full: bool) -> None:
    """The renderer until one is set: a store may be used without exposition (tests)."""


def _forget_nothing(upload: TrackedUpload) -> None:
    """The renderer's removal hook until one is set."""


#: Statuses that mean the upload has not left the queue yet (for the queue-time histogram).
_NOT_YET_STARTED = frozenset({Status.UNKNOWN, Status.INQUEUE, Status.INVALID})

#: Statuses of an upload the API gave no real status for (see `TrackedUpload.awaiting_status`).
_NOTHING_TO_AWAIT = frozenset({Status.UNKNOWN, Status.INVALID})


@dataclass(slots=True)
class TrackedUpload:
    """One ingestionId, who asked for it, and the last thing the API told us about it."""

    ingestion_id: str
    first_seen: float
    status: str = Status.UNKNOWN.value
    status_changed: float = 0.0
    sources: set[str] = field(default_factory=set)
    labels: dict[str, str] = field(default_factory=dict)
    last_success: float | None = None
    last_poll: float | None = None
    last_error: ErrorKind | None = None
    report_available: bool = False
    terminal_at: float | None = None
    queue_observed: bool = False
    #: Where the renderer keeps this upload's exposition lines (`exposition`: the block of
    #: uploads holding them, and the position in it). Not state: not compared, not shown.
    r_block: object = field(default=None, compare=False, repr=False)
    r_index: int = field(default=0, compare=False, repr=False)

    @property
    def terminal(self) -> bool:
        """True once the API reported DONE, CANCELLED or FATAL."""
        return self.status in TERMINAL_STATUSES

    @property
    def released(self) -> bool:
        """No source wants it any more: kept only until it is terminal and retained."""
        return not self.sources

    @property
    def awaiting_status(self) -> bool:
        """True if the API gave it a real status, so a terminal one (a FATAL) may still come.

        An upload never polled successfully, or INVALID or UNKNOWN, waits for nothing: once
        released it is removed at once instead of being kept, and polled, forever.
        """
        return self.last_success is not None and self.status not in _NOTHING_TO_AWAIT


Renderer = Callable[[TrackedUpload, bool], None]
Forgetter = Callable[[TrackedUpload], None]


@dataclass(frozen=True, slots=True)
class Transition:
    """A status change seen by a poll, with the durations it completes (seconds, or None)."""

    ingestion_id: str
    old: str
    new: str
    queued_for: float | None = None
    finished_after: float | None = None


class UploadStore:
    """Tracked uploads by ingestionId, their status counts and observed transitions."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._uploads: dict[str, TrackedUpload] = {}
        # The ids again, sorted: a page of the admin list starts with a bisection instead of
        # a sort of every id. O(log n) per add or removal.
        self._sorted_ids = SortedList()
        self._retired: dict[str, float] = {}
        self._transitions: Counter[str] = Counter()
        self._counts: Counter[str] = Counter()  # kept in step, so a scrape need not count
        self._held: Counter[str] = Counter()  # uploads each source holds, kept in step
        self._render: Renderer = _render_nothing
        self._unrender: Forgetter = _forget_nothing

    def __len__(self) -> int:
        return len(self._uploads)

    def __iter__(self) -> Iterator[TrackedUpload]:
        return iter(self._uploads.values())

    def uploads(self) -> ValuesView[TrackedUpload]:
        """A live view of every tracked upload, in registration order."""
        return self._uploads.values()

    def ids_after(self, after: str | None) -> Iterator[str]:
        """Tracked ids in code point order, from the first above `after` (None: from the start).

        Finding the start costs O(log n); the iterator must be used up before the store changes.
        """
        ids: Iterator[str] = self._sorted_ids.irange(after, inclusive=(after is None, True))
        return ids

    def set_renderer(self, render: Renderer, forget: Forgetter = _forget_nothing) -> None:
        """Have `render(upload, full)` called after every change to what an upload shows
        (`full` False when only its last success changed), and once for each upload now;
        and `forget(upload)` when an upload stops being tracked (its lines must go)."""
        self._render = render
        self._unrender = forget
        for upload in self._uploads.values():
            render(upload, True)

    def __contains__(self, ingestion_id: object) -> bool:
        return ingestion_id in self._uploads

    def get(self, ingestion_id: str) -> TrackedUpload | None:
        """The upload's state, or None when it is not tracked."""
        return self._uploads.get(ingestion_id)

    @property
    def retired(self) -> Mapping[str, float]:
        """Ids whose retention ran out while a source still listed them, and when."""
        return self._retired

    def is_retired(self, ingestion_id: str) -> bool:
        """True if the id finished and was retired; a source listing it again is ignored."""
        return ingestion_id in self._retired

    def add(self, ingestion_id: str, source: str, labels: Mapping[str, str]) -> bool:
        """Track an id for `source` (labels replace earlier ones); True if newly tracked."""
        upload = self._uploads.get(ingestion_id)
        created = upload is None
        if upload is None:
            now = self._clock()
            upload = TrackedUpload(ingestion_id, first_seen=now, status_changed=now)
            self._uploads[ingestion_id] = upload
            self._sorted_ids.add(ingestion_id)
            self._counts[upload.status] += 1
        if source not in upload.sources:
            upload.sources.add(source)
            self._held[source] += 1
        if labels and labels != upload.labels:
            upload.labels = dict(labels)
            self._render(upload, True)
        elif created:
            self._render(upload, True)
        return created

    def set_labels(self, ingestion_id: str, labels: Mapping[str, str]) -> None:
        """Put labels back as they were (an unacknowledged registration is rolled back)."""
        upload = self._uploads.get(ingestion_id)
        if upload is not None and labels != upload.labels:
            upload.labels = dict(labels)
            self._render(upload, True)

    def restore(self, upload: TrackedUpload) -> None:
        """Put back an upload read from the state file, as it was (a status outside
        `EXPOSED_STATUSES`, kept by an older version, as OTHER or UNKNOWN)."""
        upload.status = exposed_status(upload.status)
        self._forget(upload.ingestion_id)
        self._uploads[upload.ingestion_id] = upload
        self._sorted_ids.add(upload.ingestion_id)
        self._counts[upload.status] += 1
        self._held.update(upload.sources)
        self._render(upload, True)

    def restore_retired(self, retired: Mapping[str, float]) -> None:
        """Put back the retired ids read from the state, in the order they retired."""
        self._retired.update(sorted(retired.items(), key=lambda item: item[1]))

    def drop_source(self, ingestion_id: str, source: str) -> bool:
        """`source` no longer wants the id; True if it held it. The upload itself stays."""
        upload = self._uploads.get(ingestion_id)
        if upload is None or source not in upload.sources:
            return False
        upload.sources.discard(source)
        self._held[source] -= 1
        return True

    def held_by(self, source: str) -> int:
        """How many tracked uploads `source` holds now; O(1)."""
        return self._held[source]

    def remove(self, ingestion_id: str) -> bool:
        """Stop tracking at once; its series disappear. True if it was tracked."""
        return self._forget(ingestion_id) is not None

    def forget_retired(self, before: float) -> list[str]:
        """Forget ids retired before `before` (wall clock) and return them: the list must not
        grow forever. Ids are kept in the order they retired, so this costs O(forgotten)."""
        forgotten = []
        for ingestion_id, at in self._retired.items():
            if at >= before:
                break
            forgotten.append(ingestion_id)
        for ingestion_id in forgotten:
            del self._retired[ingestion_id]
        return forgotten

    def retire(self, ingestion_id: str) -> bool:
        """Stop tracking an upload whose terminal retention ran out; its series disappear.

        While a source still lists it, it is remembered as retired so that it is not polled
        again; a released upload is simply forgotten.
        """
        upload = self._forget(ingestion_id)
        if upload is None:
            return False
        if upload.sources:
            self._retired[ingestion_id] = self._clock()
        return True

    def record_report(self, ingestion_id: str, report: StatusReport) -> Transition | None:
        """Apply a successful poll; return the transition when the status changed."""
        upload = self._uploads.get(ingestion_id)
        if upload is None:  # removed while the request was in flight
            return None
        now = self._clock()
        upload.last_poll = now
        upload.last_success = now
        upload.last_error = None
        shown_changed = upload.report_available != report.report_available
        upload.report_available = report.report_available
        transition = self._set_status(upload, report.status, now)
        self._render(upload, shown_changed or transition is not None)
        return transition

    def record_error(self, ingestion_id: str, error: PollError) -> Transition | None:
        """Apply a failed poll; only an invalid id changes the status (to INVALID)."""
        upload = self._uploads.get(ingestion_id)
        if upload is None:
            return None
        now = self._clock()
        upload.last_poll = now
        upload.last_error = error.kind
        if error.kind is ErrorKind.INVALID_INGESTION_ID:
            transition = self._set_status(upload, Status.INVALID.value, now)
            if upload.released:
                # Released while waiting for a terminal status that now cannot come.
                self._forget(ingestion_id)
            elif transition is not None:
                self._render(upload, True)
            return transition
        return None

    def status_counts(self) -> Counter[str]:
        """Tracked uploads per status; every exposed status present (OTHER too), zero or not."""
        counts: Counter[str] = Counter(dict.fromkeys(EXPOSED_STATUSES, 0))
        counts.update(+self._counts)
        return counts

    def transitions(self) -> Counter[str]:
        """Transitions observed into each status since start; every exposed status present."""
        counts: Counter[str] = Counter(dict.fromkeys(EXPOSED_STATUSES, 0))
        counts.update(self._transitions)
        return counts

    def _forget(self, ingestion_id: str) -> TrackedUpload | None:
        upload = self._uploads.pop(ingestion_id, None)
        if upload is not None:
            self._sorted_ids.remove(ingestion_id)
            self._counts[upload.status] -= 1
            self._held.subtract(upload.sources)
            self._unrender(upload)
        return upload

    def _set_status(self, upload: TrackedUpload, status: str, now: float) -> Transition | None:
        # Whoever built the report, the label values (and so the series) stay a fixed set.
        status = exposed_status(status)
        if status == upload.status:
            return None
        old = upload.status
        self._counts[old] -= 1
        self._counts[status] += 1
        upload.status = status
        upload.status_changed = now
        self._transitions[status] += 1
        queued_for = finished_after = None
        if not upload.queue_observed and status not in _NOT_YET_STARTED:
            upload.queue_observed = True
            queued_for = max(0.0, now - upload.first_seen)
        if upload.terminal and upload.terminal_at is None:
            upload.terminal_at = now
            finished_after = max(0.0, now - upload.first_seen)
        return Transition(upload.ingestion_id, old, status, queued_for, finished_after)
