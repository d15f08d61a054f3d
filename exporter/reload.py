"""Configuration reloads: on SIGHUP and when the file's content changes on disk.

A new config is validated in full before anything is applied; an invalid one is logged,
the running config is kept, and `catalog_exporter_config_valid` and
`catalog_exporter_config_last_reload_successful` drop to 0. What a valid one is applied to is
a `ReloadTarget`: the running exporter (`ExporterReloads`), or the stand-by that
`--on-invalid-config=serve` runs until the file is valid (`runtime`).
The content is compared (not the mtime) because Kubernetes updates a mounted ConfigMap by
swapping a symlink, which some filesystems report with an unchanged mtime.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import structlog

from exporter.config import Config, ConfigError, load_config
from exporter.service import Exporter
from exporter.yamlfile import MAX_CONFIG_BYTES

log = structlog.get_logger("exporter.reload")


def _digest(path: Path) -> str | None:
    """The content's hash; an oversize file is hashed no further than the loader reads it."""
    try:
        with path.open("rb") as file:
            return hashlib.sha256(file.read(MAX_CONFIG_BYTES + 1)).hexdigest()
    except OSError:
        return None


class Trigger(enum.StrEnum):
    """What asked for a reload (the `trigger` of its log line)."""

    SIGHUP = "sighup"
    FILE = "file"


class ReloadTarget(Protocol):
    """What the file is reloaded into."""

    @property
    def watch_interval(self) -> float:
        """Seconds between checks of the file's content (0: SIGHUP only)."""

    def loaded(self, *, ok: bool) -> None:
        """Record whether the file read was valid (the config gauges)."""

    def apply(self, config: Config) -> Mapping[str, object]:
        """Apply a valid config; what to add to the `config_reloaded` log line."""


class ExporterReloads:
    """The running exporter as a `ReloadTarget`."""

    def __init__(self, exporter: Exporter) -> None:
        self._exporter = exporter

    @property
    def watch_interval(self) -> float:
        """The running config's `reload.watch_interval_seconds`."""
        return self._exporter.config.reload.watch_interval_seconds

    def loaded(self, *, ok: bool) -> None:
        """Set the exporter's config gauges."""
        self._exporter.metrics.config_loaded(ok=ok)

    def apply(self, config: Config) -> Mapping[str, object]:
        """Apply `config` to the exporter; the ids it added and removed."""
        change = self._exporter.apply(config)
        return {"ids_added": change.added, "ids_removed": change.removed}


class ConfigReloader:
    """Reloads `path` into `target` when asked (SIGHUP) or when the file changes; `load`
    reads and validates the file (`config.load_config`, with the CLI's options)."""

    def __init__(
        self,
        path: Path,
        target: ReloadTarget,
        *,
        load: Callable[[Path], Config] = load_config,
    ) -> None:
        self._path = path
        self._target = target
        self._load = load
        self._requested = asyncio.Event()
        self._digest = _digest(path)

    def request(self) -> None:
        """Ask for a reload; safe to call from a signal handler on the loop."""
        self._requested.set()

    async def run(self) -> None:
        """Wait for requests or file changes, forever; cancel to stop."""
        while True:
            interval = self._target.watch_interval
            try:
                await asyncio.wait_for(self._requested.wait(), interval or None)
            except TimeoutError:
                digest = await asyncio.to_thread(_digest, self._path)
                if digest is None or digest == self._digest:
                    continue
                log.info("config_file_changed", path=str(self._path))
                trigger = Trigger.FILE
            else:
                trigger = Trigger.SIGHUP
            self._requested.clear()
            await self.reload(trigger)

    async def reload(self, trigger: Trigger = Trigger.SIGHUP) -> bool:
        """Load, validate and apply the file; keep the running config if it is invalid."""
        self._digest = await asyncio.to_thread(_digest, self._path)
        try:
            config = await asyncio.to_thread(self._load, self._path)
        except ConfigError as exc:
            self._target.loaded(ok=False)
            log.error(
                "config_reload_failed",
                path=str(self._path),
                trigger=trigger.value,
                problems=list(exc.problems),
            )
            return False
        applied = self._target.apply(config)
        self._target.loaded(ok=True)
        log.info("config_reloaded", path=str(self._path), trigger=trigger.value, **applied)
        return True
