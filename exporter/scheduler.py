"""Who is polled when: per-upload schedules, the concurrency cap, backoff and retention.

One dispatcher task pops the upload that is due first from a heap (so the longest-waiting
upload goes first and none starves), waits for a rate-limit token and a concurrency slot,
and starts the poll as a tracked task. A triggered upload (a notification named it) goes
ahead of the heap, still through the rate limit and the concurrency cap; triggers for an
upload whose poll is in flight, already triggered or due within `MERGE_WINDOW_SECONDS` join
that poll. After each poll the upload is put back with its next
due time: the interval with jitter, a backoff after a passing failure, the long invalid-id
interval (an INVALID id only a notification named is released after its short retention
instead), or, once terminal, the end of its retention, when its series are removed.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import structlog

from exporter.backoff import backoff_delay
from exporter.client import CatalogClient
from exporter.config import PollingConfig
from exporter.metrics import ExporterMetrics, UploadMetrics
from exporter.models import RETRYABLE_ERRORS, ErrorKind, PollError, PollOutcome, StatusReport
from exporter.ratelimit import AdaptiveRateLimiter
from exporter.uploads import Transition, UploadStore

log = structlog.get_logger("exporter.scheduler")

#: First polls of newly tracked uploads are spread over this many seconds at most.
INITIAL_SPREAD_SECONDS = 1.0

#: A trigger for an upload whose poll is due within this many seconds joins that poll.
MERGE_WINDOW_SECONDS = 1.0

#: Distinct unknown status values logged, once each; later new ones are only counted
#: (`catalog_exporter_unknown_statuses_total`): an API inventing a value per poll must grow
#: neither memory (at most this many values of at most 200 characters) nor the log.
MAX_UNKNOWN_VALUES_LOGGED = 100

#: A poll that sent nothing because the credentials were unavailable (a token file not
#: mounted yet, no IAM credentials) is tried again after at most this long, not a whole
#: interval: it costs the API nothing, and credentials that appear are used within this (plus
#: the token file's 1 s recheck), as docs/deploying.md promises.
CREDENTIALS_RETRY_SECONDS = 10.0


class Action(enum.Enum):
    """What happens to an upload when its heap entry comes due."""

    POLL = "poll"
    RETIRE = "retire"
    RELEASE = "release"  # an INVALID id only notifications held: its short retention ended


class Trigger(enum.Enum):
    """What `Poller.trigger` did with a request to poll an upload now."""

    TRIGGERED = "triggered"  # a poll was moved ahead of the heap
    MERGED = "merged"  # it joins a poll in flight, already triggered, or due within a second
    TERMINAL = "terminal"  # finished: its status cannot change, so it is not polled again
    NOT_TRACKED = "not_tracked"


@dataclass(order=True, slots=True)
class _Entry:
    due: float
    seq: int
    ingestion_id: str = field(compare=False)
    action: Action = field(compare=False)


class Poller:
    """Polls every tracked, non-terminal upload within the rate and concurrency limits.

    `clock`, `sleep` and `rng` decide when polls happen; tests pass a virtual clock with its
    sleep and a seeded rng, so schedules are checked exactly instead of with slack.
    """

    def __init__(
        self,
        *,
        store: UploadStore,
        client: CatalogClient,
        limiter: AdaptiveRateLimiter,
        settings: PollingConfig,
        max_concurrency: int,
        metrics: ExporterMetrics,
        upload_metrics: UploadMetrics,
        on_change: Callable[[str], None] = lambda ingestion_id: None,
        invalid_release_in: Callable[[str], float | None] = lambda ingestion_id: None,
        release_invalid: Callable[[str], bool] = lambda ingestion_id: False,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self.client = client
        self._limiter = limiter
        self._settings = settings
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._metrics = metrics
        self._upload_metrics = upload_metrics
        self._on_change = on_change
        self._invalid_release_in = invalid_release_in
        self._release_invalid = release_invalid
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._heap: list[_Entry] = []
        # The live heap entry of each scheduled upload; older entries in the heap are stale.
        self._pending: dict[str, _Entry] = {}
        # Triggered uploads, polled before anything in the heap, in the order triggered.
        self._urgent: dict[str, None] = {}
        # Uploads taken off the heap or the urgent queue whose poll has not finished yet.
        self._busy: set[str] = set()
        # Called when the next poll of an upload completes (the triggers that asked for it).
        self._followers: dict[str, list[Callable[[], None]]] = {}
        self._seq = 0
        self._failures: dict[str, int] = {}
        self._unknown_values_logged: set[str] = set()  # at most MAX_UNKNOWN_VALUES_LOGGED
        self._unknown_values_log_full = False
        self._wakeup = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()

    def lag(self) -> float:
        """How overdue the most overdue upload is, in seconds (0 when none is).

        It grows when the rate budget cannot keep every upload fresh (N/interval > rate):
        the signal to raise the budget, lengthen the interval, or shard.
        """
        heap = self._heap
        while heap and self._pending.get(heap[0].ingestion_id) is not heap[0]:
            heapq.heappop(heap)
        return max(0.0, self._clock() - heap[0].due) if heap else 0.0

    def schedule_store(self) -> None:
        """Schedule the uploads already in the store (restored state).

        Terminal uploads are not polled again: they retire when their retention, counted
        from when they became terminal, runs out.
        """
        now = time.time()
        for upload in self._store:
            if upload.terminal:
                terminal_at = upload.terminal_at if upload.terminal_at is not None else now
                retention = self._settings.retention_for(upload.status)
                delay = max(0.0, terminal_at + retention - now)
                self._schedule(upload.ingestion_id, delay, Action.RETIRE)
        self.track([u.ingestion_id for u in self._store if not u.terminal])

    async def drain(self, grace_seconds: float) -> None:
        """Once `run` has stopped: let in-flight polls finish within the grace period, cancel
        the rest."""
        if self._inflight:
            _, late = await asyncio.wait(set(self._inflight), timeout=grace_seconds)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    def track(self, ingestion_ids: Iterable[str]) -> None:
        """Schedule first polls for newly tracked uploads, spread over a short window."""
        spread = min(INITIAL_SPREAD_SECONDS, self._settings.interval_seconds)
        for ingestion_id in ingestion_ids:
            self._schedule(ingestion_id, self._rng.uniform(0, spread), Action.POLL)

    def untrack(self, ingestion_ids: Iterable[str]) -> None:
        """Forget the schedules of uploads no longer tracked."""
        for ingestion_id in ingestion_ids:
            self._pending.pop(ingestion_id, None)
            self._failures.pop(ingestion_id, None)
            self._urgent.pop(ingestion_id, None)
            self._followers.pop(ingestion_id, None)

    def trigger(self, ingestion_id: str, on_polled: Callable[[], None] | None = None) -> Trigger:
        """Poll a tracked upload now: ahead of the heap, through the rate limiter.

        A poll in flight, already triggered, or due within `MERGE_WINDOW_SECONDS` is not
        doubled: the trigger joins it (a poll due soon is moved ahead too, so a backlog in
        the heap does not delay it). `on_polled` is called once the poll that serves this
        trigger completes; never for a terminal or untracked upload.
        """
        upload = self._store.get(ingestion_id)
        if upload is None:
            return Trigger.NOT_TRACKED
        if upload.terminal:
            return Trigger.TERMINAL
        if on_polled is not None:
            self._followers.setdefault(ingestion_id, []).append(on_polled)
        if ingestion_id in self._busy or ingestion_id in self._urgent:
            return Trigger.MERGED
        entry = self._pending.pop(ingestion_id, None)
        soon = entry is not None and entry.due - self._clock() <= MERGE_WINDOW_SECONDS
        self._urgent[ingestion_id] = None
        self._wakeup.set()
        return Trigger.MERGED if soon else Trigger.TRIGGERED

    def observed(self, ingestion_id: str, report: StatusReport) -> bool:
        """A status the app fetched itself (through the proxy): applied as a poll's would be,
        and the next poll is a full interval from now, so the exporter polls less. False when
        the upload is not tracked. A poll in flight or triggered keeps its own schedule."""
        if ingestion_id not in self._store:
            return False
        with structlog.contextvars.bound_contextvars(ingestion_id=ingestion_id):
            delay, action = self._apply_report(ingestion_id, report)
        if ingestion_id not in self._busy and ingestion_id not in self._urgent:
            self._schedule(ingestion_id, delay, action)
        return True

    def reconfigure(self, settings: PollingConfig, max_concurrency: int) -> None:
        """Apply reloaded settings; current schedules keep their due times."""
        self._settings = settings
        self._semaphore = asyncio.Semaphore(max_concurrency)

    async def run(self) -> None:
        """Start the polls as they fall due, until cancelled; a new `run` after a failure
        picks up the schedules where they were."""
        while True:
            ingestion_id = await self._next_due()
            self._busy.add(ingestion_id)
            await self._limiter.acquire()
            semaphore = self._semaphore
            await semaphore.acquire()
            if ingestion_id not in self._store:  # removed while we waited
                semaphore.release()
                self._busy.discard(ingestion_id)
                self._followers.pop(ingestion_id, None)
                continue
            task = asyncio.create_task(self._poll(ingestion_id, semaphore))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _next_due(self) -> str:
        while True:
            if self._urgent:
                ingestion_id = next(iter(self._urgent))
                del self._urgent[ingestion_id]
                return ingestion_id
            now = self._clock()
            heap = self._heap
            while heap and self._pending.get(heap[0].ingestion_id) is not heap[0]:
                heapq.heappop(heap)
            if heap and heap[0].due <= now:
                entry = heapq.heappop(heap)
                del self._pending[entry.ingestion_id]
                if entry.action is Action.POLL:
                    return entry.ingestion_id
                if entry.action is Action.RELEASE:
                    self._release(entry.ingestion_id)
                else:
                    self._retire(entry.ingestion_id)
                continue
            self._wakeup.clear()
            if not heap:
                await self._wakeup.wait()
                continue
            # `clock` and `sleep` go together (tests inject a virtual pair): the timer is a
            # `sleep`, and an earlier entry or a new upload cuts it short through `_wakeup`.
            timer = asyncio.ensure_future(self._sleep(heap[0].due - now))
            timer.add_done_callback(self._timer_done)
            try:
                await self._wakeup.wait()
            finally:
                timer.cancel()

    def _timer_done(self, timer: asyncio.Future[None]) -> None:
        if not timer.cancelled():
            self._wakeup.set()

    async def _poll(self, ingestion_id: str, semaphore: asyncio.Semaphore) -> None:
        with structlog.contextvars.bound_contextvars(ingestion_id=ingestion_id):
            try:
                outcome = await self.client.fetch_status(ingestion_id)
                delay, action = self._apply(ingestion_id, outcome)
            except Exception:
                # A bug of ours must not stop this upload from being polled again.
                log.exception("poll_crashed")
                delay, action = self._interval(), Action.POLL
            finally:
                semaphore.release()
            self._schedule(ingestion_id, delay, action)
            self._busy.discard(ingestion_id)
            for on_polled in self._followers.pop(ingestion_id, ()):
                on_polled()

    def _apply(self, ingestion_id: str, outcome: PollOutcome) -> tuple[float, Action]:
        if isinstance(outcome, StatusReport):
            return self._apply_report(ingestion_id, outcome)
        return self._apply_error(ingestion_id, outcome)

    def _apply_report(self, ingestion_id: str, report: StatusReport) -> tuple[float, Action]:
        self._failures.pop(ingestion_id, None)
        self._metrics.last_successful_poll.set(time.time())
        if not report.known:
            self._unknown_status(report)
        self._transitioned(self._store.record_report(ingestion_id, report))
        upload = self._store.get(ingestion_id)
        if upload is not None and upload.terminal:
            return self._settings.retention_for(upload.status), Action.RETIRE
        return self._interval(), Action.POLL

    def _unknown_status(self, report: StatusReport) -> None:
        """Count an answer with no documented status; log each distinct value once, up to
        MAX_UNKNOWN_VALUES_LOGGED values, then say once that later ones are only counted."""
        self._upload_metrics.count_unknown_status(report.status)
        logged = self._unknown_values_logged
        if report.raw in logged:
            return
        if len(logged) < MAX_UNKNOWN_VALUES_LOGGED:
            logged.add(report.raw)
            log.warning("unknown_status_value", value=report.raw, exposed_as=report.status)
        elif not self._unknown_values_log_full:
            self._unknown_values_log_full = True
            log.warning(
                "unknown_status_values_not_logged",
                logged=MAX_UNKNOWN_VALUES_LOGGED,
                note="later new status values are counted in "
                "catalog_exporter_unknown_statuses_total only",
            )

    def _apply_error(self, ingestion_id: str, error: PollError) -> tuple[float, Action]:
        self._transitioned(self._store.record_error(ingestion_id, error))
        if error.kind is ErrorKind.THROTTLED:
            self._limiter.on_throttled(error.retry_after)
        action = Action.POLL
        if error.kind is ErrorKind.INVALID_INGESTION_ID:
            self._failures.pop(ingestion_id, None)
            release_in = self._invalid_release_in(ingestion_id)
            if release_in is None:
                delay = self._jittered(self._settings.invalid_retry_seconds)
            else:  # a name only a notification gave: not polled on for long
                delay, action = release_in, Action.RELEASE
        elif error.kind in RETRYABLE_ERRORS:
            failures = self._failures.get(ingestion_id, 0) + 1
            self._failures[ingestion_id] = failures
            delay = self._backoff(failures, error.retry_after)
        elif error.kind is ErrorKind.UNAUTHORIZED and error.http_status is None:
            # Refused by our own auth before sending (`client`): no answer from the API.
            delay = min(self._interval(), self._jittered(CREDENTIALS_RETRY_SECONDS))
        else:
            delay = self._interval()
        if error.logged:
            return delay, action
        log.warning(
            "poll_failed",
            kind=error.kind.value,
            http_status=error.http_status,
            message=error.message,
            **{
                "released_in_seconds" if action is Action.RELEASE else "retry_in_seconds": round(
                    delay, 3
                )
            },
        )
        return delay, action

    def _transitioned(self, transition: Transition | None) -> None:
        if transition is None:
            return
        # "from"/"to" are Python keywords, hence the dict.
        log.info("status_changed", **{"from": transition.old, "to": transition.new})
        self._upload_metrics.observe(transition)
        # Only status changes are worth a state write; a fresher last-success time is not.
        self._on_change(transition.ingestion_id)

    def _retire(self, ingestion_id: str) -> None:
        self._failures.pop(ingestion_id, None)
        if self._store.retire(ingestion_id):
            log.info("retention_expired", ingestion_id=ingestion_id)
            self._on_change(ingestion_id)

    def _release(self, ingestion_id: str) -> None:
        """An INVALID id's short retention ended: released, unless a source took it since."""
        self._failures.pop(ingestion_id, None)
        if not self._release_invalid(ingestion_id):
            self._schedule(
                ingestion_id, self._jittered(self._settings.invalid_retry_seconds), Action.POLL
            )

    def _schedule(self, ingestion_id: str, delay: float, action: Action) -> None:
        if ingestion_id not in self._store:
            return
        self._seq += 1
        entry = _Entry(self._clock() + delay, self._seq, ingestion_id, action)
        self._pending[ingestion_id] = entry
        heapq.heappush(self._heap, entry)
        if self._heap[0] is entry:
            self._wakeup.set()

    def _interval(self) -> float:
        return self._jittered(self._settings.interval_seconds)

    def _jittered(self, seconds: float) -> float:
        """Shortened at random by up to jitter_ratio, never lengthened: polls spread out, and
        every upload is still polled at least once per interval."""
        return seconds * (1.0 - self._rng.uniform(0.0, self._settings.jitter_ratio))

    def _backoff(self, failures: int, retry_after: float | None) -> float:
        """`backoff_delay`'s jittered wait, never shorter than the server's Retry-After (which
        is honoured up to `max_backoff_seconds`)."""
        return backoff_delay(
            failures,
            base=self._settings.initial_backoff_seconds,
            cap=self._settings.max_backoff_seconds,
            rng=self._rng,
            retry_after=retry_after,
        )
