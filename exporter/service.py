"""Wiring of one running exporter: store, rate limiter, API client, poller and metrics.

`Exporter` builds the parts from a `Config`, starts and stops them, and applies a reloaded
config to the running parts. It does no HTTP serving (see `server`) and no file watching
(see `reload`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TextIO

import aiohttp
import structlog
from prometheus_client import CollectorRegistry

from exporter.auth import RequestAuth, create_auth
from exporter.client import CatalogClient
from exporter.config import AuthConfig, Config
from exporter.logs import configure_logging
from exporter.metrics import ApiMetrics, ExporterMetrics, UploadCollector
from exporter.ratelimit import AdaptiveRateLimiter
from exporter.scheduler import Poller
from exporter.uploads import UploadStore

log = structlog.get_logger("exporter.service")

AuthFactory = Callable[[AuthConfig], RequestAuth]


def auth_from_config(auth: AuthConfig) -> RequestAuth:
    """The production way to authenticate: exactly what the config says."""
    return create_auth(
        type=auth.type,
        region=auth.region,
        role_arn=auth.role_arn,
        token_file=auth.token_file,
        token_env=auth.token_env,
        header=auth.header,
        scheme=auth.scheme,
    )


class Exporter:
    """One exporter instance: its parts, their lifecycle, and reloads."""

    def __init__(
        self,
        config: Config,
        *,
        auth_factory: AuthFactory = auth_from_config,
        rng: random.Random | None = None,
        log_stream: TextIO | None = None,
    ) -> None:
        self.config = config
        self._log_stream = log_stream
        self.registry = CollectorRegistry(auto_describe=True)
        self.store = UploadStore()
        self.limiter = AdaptiveRateLimiter(config.api.max_requests_per_second)
        self.api_metrics = ApiMetrics(self.registry)
        self.metrics = ExporterMetrics(self.registry, rate_limit=lambda: self.limiter.rate)
        self.registry.register(UploadCollector(self.store))
        self._auth_factory = auth_factory
        self._rng = rng
        self._session: aiohttp.ClientSession | None = None
        self._poller: Poller | None = None
        self.store.sync(config.ingestions.ids)
        self.metrics.config_loaded(ok=True)

    @property
    def ready(self) -> bool:
        """Config loaded and the poll loop running."""
        return self._poller is not None and self._poller.running

    async def start(self) -> None:
        """Open the shared keep-alive session and start polling."""
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
            rng=self._rng,
        )
        self._poller.start()
        log.info(
            "exporter_started",
            tracked_ingestions=len(self.store),
            base_url=self.config.api.base_url,
            auth=self.config.api.auth.type,
        )

    async def stop(self) -> None:
        """Stop scheduling, let in-flight polls end within the API timeout, close the session."""
        if self._poller is not None:
            await self._poller.stop(grace_seconds=self.config.api.timeout_seconds)
        if self._session is not None:
            await self._session.close()
        log.info("exporter_stopped")

    def apply(self, new: Config) -> None:
        """Apply a validated config to the running parts; ids added start polling at once."""
        old, self.config = self.config, new
        configure_logging(new.logging.level, new.logging.format, self._log_stream)
        added, removed = self.store.sync(new.ingestions.ids)
        self.limiter.set_max_rate(new.api.max_requests_per_second)
        if self._poller is not None:
            self._poller.untrack(removed)
            self._poller.reconfigure(new.polling, new.api.max_concurrency)
            if new.api != old.api:
                self._poller.client = self._make_client(new)
            self._poller.track(added)
        if new.server != old.server:
            log.warning("server_settings_need_restart", host=old.server.host, port=old.server.port)
        log.info(
            "config_applied",
            added=len(added),
            removed=len(removed),
            tracked_ingestions=len(self.store),
        )

    def _make_client(self, config: Config) -> CatalogClient:
        assert self._session is not None, "start() opens the session first"
        return CatalogClient(
            self._session,
            base_url=config.api.base_url,
            auth=self._auth_factory(config.api.auth),
            timeout_seconds=config.api.timeout_seconds,
            max_response_bytes=config.api.max_response_bytes,
            metrics=self.api_metrics,
        )
