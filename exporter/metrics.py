"""Every metric the exporter exposes, on a registry the caller injects.

Metric names and labels are public API (dashboards and alerts depend on them); docs/metrics.md
lists them. The per-upload families are not here: `exposition` keeps them
pre-rendered, updated when an upload changes, so a removed upload simply disappears and
`/metrics` never waits on the Catalog API. The aggregates (`UploadCollector`) are counted
from `UploadStore` at scrape time.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.models import (
    TERMINAL_STATUSES,
    AuthProblem,
    ErrorKind,
    PollError,
    PollOutcome,
    RejectReason,
    Status,
)
from exporter.uploads import Transition, UploadStore

#: Request latency buckets: the API answers in tens of milliseconds when well, and the
#: client gives up at `api.timeout_seconds` (10 s by default).
REQUEST_DURATION_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: Proxied requests: the proxy adds about a millisecond to the API's tens (BENCHMARKS.md); an
#: upload's body may take seconds to send.
PROXY_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: Upload and queue durations: catalog processing takes from seconds to hours.
UPLOAD_DURATION_BUCKETS = (
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1200.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
    28800.0,
    86400.0,
)

#: Event loop lag buckets: a healthy loop runs a due tick within a millisecond or two; a
#: liveness probe gives up after seconds (3 x 2 s in deploy/).
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: Kinds counted by catalog_api_errors_total; 429 has its own counter.
ERROR_KINDS = tuple(k.value for k in ErrorKind if k is not ErrorKind.THROTTLED)


class ApiMetrics:
    """Counters and the latency histogram for calls to the Catalog API."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "catalog_api_requests",
            "Requests sent to getCatalogUploadStatus, by HTTP code ('error' when no response).",
            ["code"],
            registry=registry,
        )
        self.throttled = Counter(
            "catalog_api_throttled",
            "Requests the Catalog API answered with 429 Too Many Requests.",
            registry=registry,
        )
        self.errors = Counter(
            "catalog_api_errors",
            "Failed polls by kind (429 excluded: see catalog_api_throttled_total).",
            ["kind"],
            registry=registry,
        )
        for kind in ERROR_KINDS:
            self.errors.labels(kind)
        self.auth_errors = Counter(
            "catalog_exporter_auth_errors",
            "Requests not sent because credentials could not be obtained, by kind (each is "
            "also an unauthorized poll error; the log says so once per distinct problem).",
            ["kind"],
            registry=registry,
        )
        for problem in AuthProblem:
            self.auth_errors.labels(problem.value)
        self.duration = Histogram(
            "catalog_api_request_duration_seconds",
            "Time from sending a request to having read its whole answer.",
            buckets=REQUEST_DURATION_BUCKETS,
            registry=registry,
        )

    def observe_request(self, code: str, seconds: float) -> None:
        """Count one request that was sent, whatever came of it."""
        self.requests.labels(code).inc()
        self.duration.observe(seconds)

    def observe_outcome(self, outcome: PollOutcome) -> None:
        """Count a failed poll by kind; successes are counted by `observe_request`."""
        if not isinstance(outcome, PollError):
            return
        if outcome.kind is ErrorKind.THROTTLED:
            self.throttled.inc()
        else:
            self.errors.labels(outcome.kind.value).inc()


#: How a status value outside the documented five is exposed (the `exposed_as` label).
UNKNOWN_STATUS_LABELS = (Status.OTHER.value, Status.UNKNOWN.value)


class ProxyMetrics:
    """The signing proxy's requests: forwarded (by path and the API's code), refused (by
    reason), and what their answers taught the exporter (by outcome). The app's share of the
    rate budget is `catalog_exporter_proxy_requests_total`; the exporter's own is
    `catalog_api_requests_total`."""

    def __init__(
        self,
        registry: CollectorRegistry,
        paths: Iterable[str],
        refusals: Iterable[str],
        outcomes: Iterable[str],
    ) -> None:
        self.requests = Counter(
            "catalog_exporter_proxy_requests",
            "Requests of the app forwarded by the proxy, by path and the API's HTTP code "
            "('error' when there was none to pass on).",
            ["path", "code"],
            registry=registry,
        )
        self.duration = Histogram(
            "catalog_exporter_proxy_request_duration_seconds",
            "Time from a forwarded request's arrival to its answer, the wait for a rate-limit "
            "token and the registration included.",
            ["path"],
            buckets=PROXY_DURATION_BUCKETS,
            registry=registry,
        )
        self.refusals = Counter(
            "catalog_exporter_proxy_refused",
            "Requests the proxy answered itself, forwarding nothing, by reason.",
            ["reason"],
            registry=registry,
        )
        self.answers = Counter(
            "catalog_exporter_proxy_answers",
            "What the API's 2xx answers to the app taught the exporter, by outcome.",
            ["outcome"],
            registry=registry,
        )
        for path in paths:
            self.duration.labels(path)
        for reason in refusals:
            self.refusals.labels(reason)
        for outcome in outcomes:
            self.answers.labels(outcome)

    def observe(self, path: str, code: str, seconds: float) -> None:
        """One forwarded request."""
        self.requests.labels(path, code).inc()
        self.duration.labels(path).observe(seconds)

    def refused(self, reason: str) -> None:
        """One request answered by the proxy itself."""
        self.refusals.labels(reason).inc()

    def learned(self, outcome: str) -> None:
        """One 2xx answer read."""
        self.answers.labels(outcome).inc()


class UploadMetrics:
    """How long uploads take (histograms observed once per upload, on its transitions), and
    how often the API answers a status outside the documented set."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.duration = Histogram(
            "catalog_upload_duration_seconds",
            "From the exporter first seeing an upload to its terminal status.",
            ["final_status"],
            buckets=UPLOAD_DURATION_BUCKETS,
            registry=registry,
        )
        for status in sorted(TERMINAL_STATUSES):
            self.duration.labels(status)
        self.queue = Histogram(
            "catalog_upload_queue_seconds",
            "From the exporter first seeing an upload to its first status past INQUEUE.",
            buckets=UPLOAD_DURATION_BUCKETS,
            registry=registry,
        )
        self.unknown_statuses = Counter(
            "catalog_exporter_unknown_statuses",
            "Successful polls whose processingStatus held no documented value, by the status "
            "exposed instead: OTHER (a well-formed new value), UNKNOWN (not an identifier).",
            ["exposed_as"],
            registry=registry,
        )
        for label in UNKNOWN_STATUS_LABELS:
            self.unknown_statuses.labels(label)

    def count_unknown_status(self, exposed_as: str) -> None:
        """Count one answer with no documented status, exposed as `exposed_as`."""
        label = exposed_as if exposed_as in UNKNOWN_STATUS_LABELS else Status.UNKNOWN.value
        self.unknown_statuses.labels(label).inc()

    def observe(self, transition: Transition) -> None:
        """Record the durations a transition completes, if any."""
        if transition.queued_for is not None:
            self.queue.observe(transition.queued_for)
        if transition.finished_after is not None:
            self.duration.labels(transition.new).observe(transition.finished_after)


class ConfigMetrics:
    """Whether the configuration file is valid, and when it last loaded: on the exporter's
    registry, and on the stand-by's (`runtime`) while no valid config was ever loaded."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.reload_successful = Gauge(
            "catalog_exporter_config_last_reload_successful",
            "1 if the last configuration load or reload succeeded, else 0.",
            registry=registry,
        )
        self.reload_success_timestamp = Gauge(
            "catalog_exporter_config_last_reload_success_timestamp_seconds",
            "When the configuration was last loaded successfully.",
            registry=registry,
        )
        self.valid = Gauge(
            "catalog_exporter_config_valid",
            "1 if the configuration file read last is valid; 0 if not (the exporter waits "
            "for a fixed file with --on-invalid-config=serve, or keeps the last good config "
            "after a reload).",
            registry=registry,
        )

    def loaded(self, *, ok: bool) -> None:
        """Record the outcome of a configuration load or reload."""
        self.reload_successful.set(1 if ok else 0)
        self.valid.set(1 if ok else 0)
        if ok:
            self.reload_success_timestamp.set(time.time())


def register_build_info(registry: CollectorRegistry) -> None:
    """`catalog_exporter_build_info` and the process, platform and GC collectors."""
    build = Gauge(
        "catalog_exporter_build_info",
        "Always 1; labels say which build is running.",
        ["version", "python_version"],
        registry=registry,
    )
    build.labels(__version__, platform.python_version()).set(1)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)


class ExporterMetrics:
    """The exporter's own health: reloads, build, rate limit in force, tracked ids, event
    loop lag, and the process, platform and GC collectors of prometheus_client (memory, CPU,
    file descriptors: `process_resident_memory_bytes` and the rest)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        rate_limit: Callable[[], float],
        poll_lag: Callable[[], float],
    ) -> None:
        self.config = ConfigMetrics(registry)
        self.last_successful_poll = Gauge(
            "catalog_exporter_last_successful_poll_timestamp_seconds",
            "When any poll last succeeded (0 until one does).",
            registry=registry,
        )
        rate = Gauge(
            "catalog_api_rate_limit_requests_per_second",
            "Client-side rate limit in force now (lowered after 429s, then recovering).",
            registry=registry,
        )
        rate.set_function(rate_limit)
        lag = Gauge(
            "catalog_exporter_poll_lag_seconds",
            "How overdue the most overdue poll is: above 0 for long, the rate budget is too "
            "small for the uploads tracked (raise it, lengthen the interval, or shard).",
            registry=registry,
        )
        lag.set_function(poll_lag)
        self.rejected = Counter(
            "catalog_exporter_rejected_ingestions",
            "Incoming ingestionIds refused (bad id, labels not allow-listed, cap reached).",
            ["reason"],
            registry=registry,
        )
        for reason in RejectReason:
            self.rejected.labels(reason.value)
        self.state_load_errors = Counter(
            "catalog_exporter_state_load_errors",
            "State files found unreadable or corrupt at start (moved aside).",
            registry=registry,
        )
        self.state_write_errors = Counter(
            "catalog_exporter_state_write_errors",
            "Failed writes of the state file (retried).",
            registry=registry,
        )
        self.state_skipped_entries = Counter(
            "catalog_exporter_state_skipped_entries",
            "Entries of the state file skipped at start as invalid (the rest was loaded).",
            registry=registry,
        )
        self.state_available = Gauge(
            "catalog_exporter_state_persistence_available",
            "0 while nothing can be made durable and admin writes answer 503: state.path is "
            "set but could not be read at start, or the last write of it failed (1 otherwise).",
            registry=registry,
        )
        self.state_reopens = Counter(
            "catalog_exporter_state_reopens",
            "State files found deleted or replaced while running, and written anew from the "
            "open database.",
            registry=registry,
        )
        self.state_integrity_ok = Gauge(
            "catalog_exporter_state_integrity_ok",
            "0 when the last quick_check of the state database (hourly) found damaged pages; "
            "1 otherwise.",
            registry=registry,
        )
        self.state_integrity_ok.set(1)
        self.loop_lag = Histogram(
            "catalog_exporter_event_loop_lag_seconds",
            "How late a periodic tick of the event loop ran: time the loop was held by other "
            "work, which every request (/healthz included) waits behind.",
            buckets=LOOP_LAG_BUCKETS,
            registry=registry,
        )
        register_build_info(registry)
        self.scrape_clients_dropped = Counter(
            "catalog_exporter_scrape_clients_dropped",
            "Scrapes whose client did not read the body within server.write_timeout_seconds.",
            registry=registry,
        )
        self.task_restarts = Counter(
            "catalog_exporter_background_task_restarts",
            "Background tasks restarted after they failed (exporter.supervisor), by task.",
            ["task"],
            registry=registry,
        )

    def count_rejected(self, reason: RejectReason) -> None:
        """Count one refused ingestionId."""
        self.rejected.labels(reason.value).inc()

    def config_loaded(self, ok: bool) -> None:
        """Record the outcome of a configuration load or reload."""
        self.config.loaded(ok=ok)


class WebConfigMetrics:
    """The web config's reloads (`webconfig`), as Prometheus reports its own config's."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.reload_successful = Gauge(
            "catalog_exporter_web_config_last_reload_successful",
            "1 if the last load or reload of the web config (and its certificate, key and CA "
            "files) succeeded, else 0.",
            registry=registry,
        )
        self.reload_success_timestamp = Gauge(
            "catalog_exporter_web_config_last_reload_success_timestamp_seconds",
            "When the web config was last loaded successfully.",
            registry=registry,
        )

    def web_config_loaded(self, *, ok: bool, now: float) -> None:
        """Record the outcome of a load or reload; a failed one leaves the last good in force."""
        self.reload_successful.set(1 if ok else 0)
        if ok:
            self.reload_success_timestamp.set(now)


class DirectoryMetrics:
    """The watched directory's health: files it cannot use, and scans that fail."""

    def __init__(
        self,
        registry: CollectorRegistry,
        file_problems: Iterable[str],
        deleted_reasons: Iterable[str] = (),
    ) -> None:
        self.file_errors = Counter(
            "catalog_exporter_directory_file_errors",
            "Files in the watched directory that name no id, once per file version, by reason.",
            ["reason"],
            registry=registry,
        )
        for reason in file_problems:
            self.file_errors.labels(reason)
        self.scan_failing = Gauge(
            "catalog_exporter_directory_scan_failing",
            "1 while scans of the watched directory fail (cannot be listed, or crashed), else 0.",
            registry=registry,
        )
        self.last_scan_success = Gauge(
            "catalog_exporter_directory_last_scan_success_timestamp_seconds",
            "When a scan of the watched directory last completed (0 until one does).",
            registry=registry,
        )
        # Counted off the loop by each scan: what fills the volume's sizeLimit.
        self.files = Gauge(
            "catalog_exporter_directory_files",
            "Entries in the watched directory at the last scan (all but subdirectories).",
            registry=registry,
        )
        self.allocated_bytes = Gauge(
            "catalog_exporter_directory_bytes",
            "Bytes allocated to those entries at the last scan (st_blocks * 512).",
            registry=registry,
        )
        self.size_limit_bytes = Gauge(
            "catalog_exporter_directory_size_limit_bytes",
            "The volume's size limit, from ingestions.directory_size_limit_bytes (0: not set).",
            registry=registry,
        )
        self.files_deleted = Counter(
            "catalog_exporter_directory_files_deleted",
            "Files spool mode deleted, by reason: registered durably, refused, unusable.",
            ["reason"],
            registry=registry,
        )
        for reason in deleted_reasons:
            self.files_deleted.labels(reason)

    def scan_succeeded(self) -> None:
        """Record a complete scan."""
        self.scan_failing.set(0)
        self.last_scan_success.set(time.time())


#: How notifications are handled (catalog_exporter_notifications_total's outcome label).
NOTIFICATION_OUTCOMES = (
    "triggered",  # a poll was moved ahead of the schedule
    "merged",  # joined a poll in flight, already triggered, or due within a second
    "terminal",  # the upload is finished already: not polled again
    "unknown_id",  # the exporter does not track the id
    "not_owned",  # another replica polls the id (sharding); never registered here
    "registered",  # an unknown id tracked (notifications.sqs.register_unknown)
    "malformed",  # not JSON, too large or deep, or naming no id (deleted)
    "confirmation",  # an SNS SubscriptionConfirmation or UnsubscribeConfirmation
)

#: From a message received to its triggered poll completing: a poll takes tens of
#: milliseconds when the rate budget has room, longer when polls queue for tokens.
NOTIFICATION_DELAY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class NotificationMetrics:
    """Upload-result notifications: what came of them, queue errors, and how fast they act."""

    def __init__(self, registry: CollectorRegistry, error_kinds: Iterable[str]) -> None:
        self.outcomes = Counter(
            "catalog_exporter_notifications",
            "Ids named by notifications (and messages naming none), by what came of them.",
            ["outcome"],
            registry=registry,
        )
        for outcome in NOTIFICATION_OUTCOMES:
            self.outcomes.labels(outcome)
        self.errors = Counter(
            "catalog_exporter_notification_errors",
            "Failed calls to the notification queue, by kind (each is retried with backoff).",
            ["kind"],
            registry=registry,
        )
        for kind in error_kinds:
            self.errors.labels(kind)
        self.last_received = Gauge(
            "catalog_exporter_notification_last_received_timestamp_seconds",
            "When a notification message was last received (0 until one is).",
            registry=registry,
        )
        self.poll_delay = Histogram(
            "catalog_exporter_notification_poll_delay_seconds",
            "From a notification being received to the poll it triggered completing.",
            buckets=NOTIFICATION_DELAY_BUCKETS,
            registry=registry,
        )

    def count(self, outcome: str) -> None:
        """Count one outcome (one of NOTIFICATION_OUTCOMES)."""
        self.outcomes.labels(outcome).inc()


class UploadCollector(Collector):
    """Aggregate upload metrics, rendered from the store at scrape time.

    The per-upload families (`catalog_upload_status` and friends) are not here: they are
    kept pre-rendered by `exposition.UploadExposition`, which is what keeps a scrape of
    100,000 uploads fast.
    """

    def __init__(self, store: UploadStore) -> None:
        self._store = store

    def collect(self) -> Iterable[Metric]:
        uploads = GaugeMetricFamily(
            "catalog_uploads", "Tracked uploads per status.", labels=["status"]
        )
        for name, count in self._store.status_counts().items():
            uploads.add_metric([name], count)
        yield uploads
        transitions = CounterMetricFamily(
            "catalog_upload_transitions",
            "Status transitions observed, by the status entered.",
            labels=["status"],
        )
        for name, count in self._store.transitions().items():
            transitions.add_metric([name], count)
        yield transitions
        yield GaugeMetricFamily(
            "catalog_exporter_tracked_ingestions",
            "IngestionIds tracked now (polled, or terminal and within retention).",
            value=len(self._store),
        )
