"""Wiring of one running exporter: store, tracker, rate limiter, client, poller, state, discovery,
notifications.

`Exporter` builds the parts from a `Config`, starts and stops them (their background tasks run
under its `Supervisor`, which stops them in a fixed order), and applies a reloaded config to the
running parts. It does no HTTP serving (see `server` and `admin`), no file watching of the config
(see `reload`), and no process set-up (see `runtime`, which builds it).
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import botocore.session
import structlog
from prometheus_client import CollectorRegistry

from exporter.auth import RequestAuth
from exporter.auth_setup import AuthFactory, auth_from_config
from exporter.client import CatalogClient
from exporter.config import Config
from exporter.discovery import Deleted, DirectoryWatcher, FileProblem
from exporter.exposition import UploadExposition
from exporter.logs import SecretMask, configure_logging
from exporter.metrics import (
    ApiMetrics,
    DirectoryMetrics,
    ExporterMetrics,
    NotificationMetrics,
    UploadCollector,
    UploadMetrics,
)
from exporter.models import StatusReport
from exporter.notifications import NotificationHandler, confirm_subscription
from exporter.ratelimit import AdaptiveRateLimiter, RateShare
from exporter.report import (
    DownloadLimits,
    ReportFailure,
    ReportOutcome,
    ReportProblem,
    ReportSink,
    fetch_report,
)
from exporter.scheduler import Poller
from exporter.sharding import Shard
from exporter.sqs import AwsSessions, QueueErrorKind, QueueReceiver
from exporter.state_writer import StateWriter, UnavailableState, open_state
from exporter.supervisor import Stage, Supervisor
from exporter.tracking import ConfigIdsChange, IngestionTracker
from exporter.uploads import UploadStore

log = structlog.get_logger("exporter.service")

#: The share of `api.max_requests_per_second` that report link polls may take (0.5 of 5/s).
REPORT_SHARE = 0.1


def _notification_limits(config: Config) -> dict[str, Any]:
    """The tracker's limits on what notifications register (`IngestionTracker.configure`)."""
    sqs = config.notifications.sqs
    return {
        "notification_cap": sqs.registration_cap(config.ingestions.max_tracked),
        "invalid_retention": sqs.invalid_retention_seconds,
    }


def _watched(config: Config) -> tuple[object, ...]:
    """What the directory watcher is built from: a change restarts it."""
    ingestions = config.ingestions
    return (ingestions.directory, ingestions.directory_poll_seconds, ingestions.directory_mode)


class Exporter:
    """One exporter instance: its parts, their lifecycle, and reloads."""

    def __init__(
        self,
        config: Config,
        *,
        auth_factory: AuthFactory = auth_from_config,
        rng: random.Random | None = None,
        log_stream: TextIO | None = None,
        secret_mask: SecretMask | None = None,
        rebuild_pause: Callable[[], Awaitable[None]] | None = None,
        aws_session_factory: Callable[[], botocore.session.Session] = botocore.session.Session,
    ) -> None:
        self.config = config
        self._log_stream = log_stream
        # The one given to configure_logging at start-up; reloads reconfigure with it.
        self.secret_mask = SecretMask() if secret_mask is None else secret_mask
        self._auth: RequestAuth | None = None
        self.secret_mask.watch("api", self._held_api_secrets)
        self._receiver: QueueReceiver | None = None
        self.secret_mask.watch("sqs", self._held_queue_secrets)
        # One botocore session for every receiver a reload builds (see `AwsSessions`).
        self._aws_sessions = AwsSessions(aws_session_factory)
        self.registry = CollectorRegistry(auto_describe=True)
        self.store = UploadStore()
        self.limiter = AdaptiveRateLimiter(
            config.api.max_requests_per_second,
            max_pause_seconds=config.polling.max_backoff_seconds,
        )
        # Report link polls come from people (the admin API), in bursts an abuser can make:
        # they get a tenth of the budget of their own, and can never starve the polls.
        self.report_pacing = RateShare(self.limiter, REPORT_SHARE)
        self.api_metrics = ApiMetrics(self.registry)
        self.upload_metrics = UploadMetrics(self.registry)
        self.metrics = ExporterMetrics(
            self.registry,
            rate_limit=lambda: self.limiter.rate,
            poll_lag=lambda: self._poller.lag() if self._poller is not None else 0.0,
        )
        self.registry.register(UploadCollector(self.store))
        self.directory_metrics = DirectoryMetrics(self.registry, FileProblem, Deleted)
        self.directory_metrics.size_limit_bytes.set(config.ingestions.directory_size_limit_bytes)
        self.notification_metrics = NotificationMetrics(
            self.registry, [kind.value for kind in QueueErrorKind]
        )
        self.exposition = UploadExposition(
            self.store,
            label_names=lambda: self.config.ingestions.labels,
            active_status_only=lambda: self.config.metrics.status_series == "active",
        )
        self.tracker = IngestionTracker(
            self.store,
            max_tracked=config.ingestions.max_tracked,
            label_names=config.ingestions.labels,
            on_added=self._track,
            on_removed=self._untrack,
            on_rejected=self.metrics.count_rejected,
            shard=Shard(config.sharding.index, config.sharding.total),
            **_notification_limits(config),
        )
        self._auth_factory = auth_factory
        self._rng = rng
        self._rebuild_pause = rebuild_pause
        self._session: aiohttp.ClientSession | None = None
        self._poller: Poller | None = None
        self._state: StateWriter | None = None
        #: Every background task of this exporter (and the runtime's reloader and loop lag tick).
        self.supervisor = Supervisor(restarts=self.metrics.task_restarts)
        self.metrics.config_loaded(ok=True)

    @property
    def auth(self) -> RequestAuth | None:
        """The signer the polls use, for the config in force (None before `start`): the proxy
        signs with it too, so credentials are resolved once."""
        return self._auth

    @property
    def ready(self) -> bool:
        """Config loaded, state restored and the poll loop running."""
        return self._poller is not None and self.supervisor.running("poller")

    async def start(self) -> None:
        """Restore state, apply the config's ids, open the session and start polling."""
        await self._restore_state()
        self.tracker.replace_config_ids(self.config.ingestions.ids)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
            raise_for_status=False,
        )
        self._poller = Poller(
            store=self.store,
            client=self._make_client(self.config),
            limiter=self.limiter,
            settings=self.config.polling,
            max_concurrency=self.config.api.max_concurrency,
            metrics=self.metrics,
            upload_metrics=self.upload_metrics,
            on_change=self.tracker.changed,
            invalid_release_in=self.tracker.invalid_release_in,
            release_invalid=self.tracker.release_invalid,
            rng=self._rng,
        )
        poller = self._poller
        poller.schedule_store()
        self.supervisor.start(
            "poller",
            poller.run,
            Stage.POLLING,
            after=lambda: poller.drain(grace_seconds=self.config.api.timeout_seconds),
        )
        pause = self._rebuild_pause
        rebuilds = (
            self.exposition.run if pause is None else functools.partial(self.exposition.run, pause)
        )
        self.supervisor.start("exposition-rebuilder", rebuilds, Stage.OUTPUT)
        self.supervisor.start("exposition-precompress", self.exposition.precompress, Stage.OUTPUT)
        self._start_watcher(self.config)
        self._start_notifications(self.config)
        log.info(
            "exporter_started",
            tracked_ingestions=len(self.store),
            base_url=self.config.api.base_url,
            auth=self.config.api.auth.type,
        )

    async def stop(self) -> None:
        """Stop every background task in the supervisor's order (reloads, discovery and
        notifications, then the poller, whose in-flight polls get the API timeout to end,
        then the state writer, which writes the last changes), then close the session."""
        await self.supervisor.stop()
        if self._session is not None:
            await self._session.close()
        log.info("exporter_stopped")

    def apply(self, new: Config) -> ConfigIdsChange:
        """Apply a validated config to the running parts; ids added start polling at once.

        Returns how many config ids were added and removed (the reload's log line says so).
        """
        old, self.config = self.config, new
        configure_logging(
            new.logging.level, new.logging.format, self._log_stream, mask=self.secret_mask
        )
        self.tracker.configure(
            max_tracked=new.ingestions.max_tracked,
            label_names=new.ingestions.labels,
            **_notification_limits(new),
        )
        self.limiter.set_max_rate(new.api.max_requests_per_second)
        self.limiter.set_max_pause(new.polling.max_backoff_seconds)
        if self._poller is not None:
            self._poller.reconfigure(new.polling, new.api.max_concurrency)
            if new.api != old.api:
                self._poller.client = self._make_client(new)
        change = self.tracker.replace_config_ids(new.ingestions.ids, previous=old.ingestions.ids)
        self.exposition.check_settings()  # new labels or series: re-rendered off the scrapes
        self.directory_metrics.size_limit_bytes.set(new.ingestions.directory_size_limit_bytes)
        if _watched(new) != _watched(old):
            self.supervisor.replace(
                "directory-watcher", functools.partial(self._start_watcher, new)
            )
        if new.notifications != old.notifications:
            self.supervisor.replace(
                "notifications", functools.partial(self._start_notifications, new)
            )
        for section in ("server", "admin", "proxy", "state", "sharding"):
            if getattr(new, section) != getattr(old, section):
                log.warning("settings_need_restart", section=section)
        log.info("config_applied", tracked_ingestions=len(self.store))
        return change

    async def fetch_report(self, ingestion_id: str, sink: ReportSink) -> ReportOutcome:
        """One upload's processing report into `sink` (the admin API's report route).

        The API call goes through the poller's client and the rate limiter, like a poll, after
        a token of `report_pacing`, the reports' share of it; a 429 to it slows the limiter,
        as a poll's does.
        """
        if self._poller is None:
            return ReportFailure(ReportProblem.API_ERROR, "not_started", "not polling yet")
        await self.report_pacing.acquire()
        api = self.config.api
        limits = DownloadLimits(api.max_report_bytes, allowed_hosts=frozenset(api.report_hosts))
        outcome = await fetch_report(
            self._poller.client,
            ingestion_id,
            sink,
            limits,
            on_throttled=self.limiter.on_throttled,
        )
        if isinstance(outcome, ReportFailure):  # an API may echo our token in its message
            return dataclasses.replace(outcome, message=self.secret_mask.mask(outcome.message))
        return outcome

    def observed_status(self, ingestion_id: str, report: StatusReport) -> bool:
        """A status the app fetched through the proxy, applied like a poll's (`Poller.observed`);
        False when the id is not tracked or polling has not started."""
        return self._poller is not None and self._poller.observed(ingestion_id, report)

    def _track(self, ids: list[str]) -> None:
        if self._poller is not None:
            self._poller.track(ids)

    def _untrack(self, ids: list[str]) -> None:
        if self._poller is not None:
            self._poller.untrack(ids)

    async def _restore_state(self) -> None:
        if not self.config.state.path:
            self.metrics.state_available.set(1)  # 0 means "set but unusable": alertable
            return
        path = Path(self.config.state.path)
        writer, result = await open_state(
            path,
            record=self.tracker.record,
            retired_at=self.tracker.retired_at,
            debounce_seconds=self.config.state.debounce_seconds,
            on_error=self._state_write_failed,
            on_recovered=self._state_write_recovered,
            on_reopened=self._state_reopened,
            on_checked=self._state_checked,
        )
        self.metrics.state_skipped_entries.inc(result.skipped)
        self.metrics.state_available.set(1 if writer is not None else 0)
        if writer is None:
            log.error(
                "state_persistence_unavailable",
                path=str(path),
                problem=result.problem,
                consequence="nothing is persisted and admin writes answer 503 until a restart "
                "finds the file readable; the file is left as it is",
            )
            self.tracker.attach_state(UnavailableState(path, result.problem or "unreadable"))
            return
        if result.moved_to is not None:
            self.metrics.state_load_errors.inc()
            log.error(
                "state_file_unusable",
                path=str(path),
                problem=result.problem,
                moved_to=str(result.moved_to),
            )
        elif result.problem is not None:
            log.error("state_entries_skipped", path=str(path), problem=result.problem)
        if result.migrated_from is not None:
            log.warning(
                "state_migrated",
                path=str(path),
                uploads=len(result.snapshot.uploads),
                json_kept_as=str(result.migrated_from),
            )
        self._state = writer
        self.tracker.attach_state(writer)
        self.tracker.restore(result.snapshot)
        log.info("state_restored", path=str(path), uploads=len(result.snapshot.uploads))
        self.supervisor.start("state-writer", writer.run, Stage.OUTPUT)

    def _state_write_failed(self, error: Exception) -> None:
        self.metrics.state_write_errors.inc()
        self.metrics.state_available.set(0)  # admin writes answer 503 until a write succeeds
        log.error("state_write_failed", path=self.config.state.path, error=str(error))

    def _state_write_recovered(self) -> None:
        self.metrics.state_available.set(1)
        log.info("state_write_recovered", path=self.config.state.path)

    def _state_reopened(self, note: str) -> None:
        self.metrics.state_reopens.inc()
        log.error("state_file_reopened", path=self.config.state.path, problem=note)

    def _state_checked(self, problem: str | None) -> None:
        self.metrics.state_integrity_ok.set(0 if problem else 1)
        if problem is not None:
            log.error(
                "state_integrity_check_failed",
                path=self.config.state.path,
                problem=problem,
                consequence="the next start moves the file aside and starts without its ids; "
                "see docs/operations.md",
            )

    def _start_watcher(self, config: Config) -> None:
        if config.ingestions.directory:
            watcher = DirectoryWatcher(
                Path(config.ingestions.directory),
                self.tracker,
                poll_seconds=config.ingestions.directory_poll_seconds,
                metrics=self.directory_metrics,
                consume=config.ingestions.directory_mode == "spool",
            )
            self.supervisor.start("directory-watcher", watcher.run, Stage.SOURCES)

    def _start_notifications(self, config: Config) -> None:
        """Receive from the configured queue, if any: its messages trigger polls."""
        settings = config.notifications.sqs
        if not settings.queue_url or self._poller is None or self._session is None:
            self._receiver = None
            return
        confirm = (
            functools.partial(confirm_subscription, self._session)
            if settings.confirm_subscriptions
            else None
        )
        handler = NotificationHandler(
            trigger=self._poller.trigger,
            tracker=self.tracker,
            metrics=self.notification_metrics,
            register_unknown=settings.register_unknown,
            confirm=confirm,
        )
        self._receiver = QueueReceiver(
            settings,
            handler=handler,
            metrics=self.notification_metrics,
            sessions=self._aws_sessions,
            rng=self._rng,
        )
        self.supervisor.start("notifications", self._receiver.run, Stage.SOURCES)

    def _held_queue_secrets(self) -> tuple[str, ...]:
        return () if self._receiver is None else self._receiver.held_secrets()

    def _held_api_secrets(self) -> tuple[str, ...]:
        return () if self._auth is None else self._auth.held_secrets()

    def _make_client(self, config: Config) -> CatalogClient:
        assert self._session is not None, "start() opens the session first"
        self._auth = self._auth_factory(config.api.auth)
        return CatalogClient(
            self._session,
            base_url=config.api.base_url,
            auth=self._auth,
            timeout_seconds=config.api.timeout_seconds,
            max_response_bytes=config.api.max_response_bytes,
            metrics=self.api_metrics,
        )
