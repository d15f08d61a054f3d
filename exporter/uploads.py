"""The tracked uploads and what is known of each: the single source the metrics render.

`UploadStore` is the only writer of upload state. It knows nothing of HTTP or timing
policy: the scheduler tells it what a poll found, the collector reads it at scrape time.
Timestamps here are wall-clock seconds (they are exported); scheduling uses its own clock.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from exporter.models import (
    KNOWN_STATUSES,
    TERMINAL_STATUSES,
    ErrorKind,
    PollError,
    Status,
    StatusReport,
)


@dataclass(slots=True)
class TrackedUpload:
    """One ingestionId and the last thing the API told us about it."""

    ingestion_id: str
    first_seen: float
    status: str = Status.UNKNOWN.value
    status_changed: float = 0.0
    last_success: float | None = None
    last_poll: float | None = None
    last_error: ErrorKind | None = None
    report_available: bool = False

    @property
    def terminal(self) -> bool:
        """True once the API reported DONE, CANCELLED or FATAL."""
        return self.status in TERMINAL_STATUSES


@dataclass(frozen=True, slots=True)
class Transition:
    """A status change seen by a poll, for the log line and the transitions counter."""

    ingestion_id: str
    old: str
    new: str


class UploadStore:
    """Tracked uploads by ingestionId, their status counts and observed transitions."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._uploads: dict[str, TrackedUpload] = {}
        self._retired: set[str] = set()
        self._transitions: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._uploads)

    def __iter__(self) -> Iterator[TrackedUpload]:
        return iter(self._uploads.values())

    def __contains__(self, ingestion_id: object) -> bool:
        return ingestion_id in self._uploads

    def get(self, ingestion_id: str) -> TrackedUpload | None:
        """The upload's state, or None when it is not tracked."""
        return self._uploads.get(ingestion_id)

    def sync(self, wanted: Iterable[str]) -> tuple[list[str], list[str]]:
        """Track exactly `wanted` (less retired ids); return (added, removed) ids.

        An id whose retention expired stays retired while it is still wanted, so a reload
        does not resurrect a finished upload; dropping it from the wanted set forgets that.
        """
        wanted_set = dict.fromkeys(wanted)
        self._retired &= wanted_set.keys()
        removed = [i for i in self._uploads if i not in wanted_set]
        for ingestion_id in removed:
            del self._uploads[ingestion_id]
        now = self._clock()
        added = []
        for ingestion_id in wanted_set:
            if ingestion_id not in self._uploads and ingestion_id not in self._retired:
                self._uploads[ingestion_id] = TrackedUpload(
                    ingestion_id, first_seen=now, status_changed=now
                )
                added.append(ingestion_id)
        return added, removed

    def retire(self, ingestion_id: str) -> bool:
        """Stop tracking an upload whose terminal retention ran out; its series disappear."""
        if self._uploads.pop(ingestion_id, None) is None:
            return False
        self._retired.add(ingestion_id)
        return True

    def record_report(self, ingestion_id: str, report: StatusReport) -> Transition | None:
        """Apply a successful poll; return the transition when the status changed."""
        upload = self._uploads.get(ingestion_id)
        if upload is None:  # removed by a reload while the request was in flight
            return None
        now = self._clock()
        upload.last_poll = now
        upload.last_success = now
        upload.last_error = None
        upload.report_available = report.report_available
        return self._set_status(upload, report.status, now)

    def record_error(self, ingestion_id: str, error: PollError) -> Transition | None:
        """Apply a failed poll; only an invalid id changes the status (to INVALID)."""
        upload = self._uploads.get(ingestion_id)
        if upload is None:
            return None
        now = self._clock()
        upload.last_poll = now
        upload.last_error = error.kind
        if error.kind is ErrorKind.INVALID_INGESTION_ID:
            return self._set_status(upload, Status.INVALID.value, now)
        return None

    def status_counts(self) -> Counter[str]:
        """Tracked uploads per status; every known status present, zero or not."""
        counts: Counter[str] = Counter(dict.fromkeys(KNOWN_STATUSES, 0))
        counts.update(u.status for u in self._uploads.values())
        return counts

    def transitions(self) -> Counter[str]:
        """Transitions observed into each status since start; known statuses always present."""
        counts: Counter[str] = Counter(dict.fromkeys(KNOWN_STATUSES, 0))
        counts.update(self._transitions)
        return counts

    def _set_status(self, upload: TrackedUpload, status: str, now: float) -> Transition | None:
        if status == upload.status:
            return None
        transition = Transition(upload.ingestion_id, upload.status, status)
        upload.status = status
        upload.status_changed = now
        self._transitions[status] += 1
        return transition
