"""The composition root: one builder for a running exporter, its process settings and its order
of start-up and shutdown.

`build` turns a `Config` into a `Runtime`: logging, the `Exporter` (whose background work runs
under its `Supervisor`), the config reloader, the metrics and admin listeners. `Runtime.run`
serves until SIGTERM or SIGINT (SIGHUP reloads). The command line (`run_config`), the demo and
the in-process tests all go through `build`, so they start, tune the process (GC, switch
interval) and stop the same way. It never parses arguments and never prints usage.

Start-up: the cyclic GC is off from `build` (or `load_to_serve`) on; the web config, if any,
is read (a bad one stops the start: exit 2); the exporter starts (state, polls, sources), then
the reloader, the web config's watcher and the loop lag tick, then the listeners (metrics,
over TLS with the web config's, then admin); then what start-up built is frozen out of the
GC and the switch interval is set.
Shutdown (RELIABILITY.md, "Shutdown"): `shutting_down`; the admin listener (no new
registrations: `admin_api_stopped`), the metrics listener; then the supervisor's stages
(reloader and loop lag tick, directory watcher and SQS receiver, the poller and its polls in
flight, the state writer's last commit and the exposition); `exporter_stopped`.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import signal
import ssl
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import structlog
from aiohttp import web
from prometheus_client import disable_created_metrics

from exporter.admin import TOKEN as ADMIN_TOKEN
from exporter.admin import create_admin_app
from exporter.config import Config, ConfigError, load_config
from exporter.logs import SecretMask, configure_logging
from exporter.looplag import measure_loop_lag
from exporter.metrics import WebConfigMetrics
from exporter.reload import ConfigReloader
from exporter.server import create_app
from exporter.service import Exporter
from exporter.supervisor import Stage
from exporter.webconfig import WebConfigWatcher, install

#: Paths of the metrics listener that basic auth leaves open (TLS still applies): the
#: kubelet's probes cannot easily send credentials, and they answer nothing secret.
PROBE_PATHS = ("/healthz", "/readyz")

log = structlog.get_logger("exporter.runtime")

#: sys.setswitchinterval once serving: how long a thread may keep the GIL from the loop.
SWITCH_INTERVAL_SECONDS = 0.001

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

#: What a `Runtime` calls once listening: the metrics URL and the admin API's (None without).
OnListening = Callable[[str, str | None], None]


class CannotListen(OSError):
    """A listener could not be opened (address in use, no permission...)."""


@dataclass(frozen=True, slots=True)
class Listener:
    """An application and the address it is served on."""

    app: web.Application
    host: str
    port: int


def run_until_stopped(run: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """Run `run()` on a new event loop; the process exit code (1 when it cannot listen).

    No `_created` series are exposed: they double the counter and histogram lines with
    timestamps no dashboard or rule reads. The switch is process-wide in prometheus_client,
    so it is thrown here, at the process's entry, not in `build` (tests build in-process).
    """
    disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client
    try:
        asyncio.run(run())
    except CannotListen:
        return EXIT_FAILURE
    except ConfigError:  # the web config, read at start (logged as web_config_invalid)
        return EXIT_USAGE
    return EXIT_OK


def load_to_serve(path: Path) -> Config:
    """`load_config` for a process that goes on to serve: the cyclic GC goes off first.

    Start-up builds up to 100,000 uploads (the config's ids, then the state's): full
    collections of a growing heap, which finds no garbage, cost about 1 s of it
    (BENCHMARKS.md). `Runtime.start` turns the collector back on once it has frozen what
    start-up built.
    """
    gc.disable()
    return load_config(path)


def run_config(
    config: Config,
    config_path: Path,
    *,
    port: int | None = None,
    host: str | None = None,
    web_config_file: str | None = None,
) -> int:
    """Serve the exporter `config` describes (and its admin API) until stopped."""
    runtime = build(config, config_path, port=port, host=host, web_config_file=web_config_file)
    return run_until_stopped(runtime.run)


def build(
    config: Config,
    config_path: Path | None = None,
    *,
    port: int | None = None,
    host: str | None = None,
    web_config_file: str | None = None,
    log_stream: TextIO | None = None,
    on_listening: OnListening | None = None,
    **parts: Any,
) -> Runtime:
    """Everything one exporter process runs, built from `config`, not started yet.

    `config_path` is what SIGHUP and changes of the file reload (none: no reloader). `port`
    and `host` replace `server.port` and `server.host` (`--port`, `--web.listen-address`;
    host "" is every interface, IPv4 and IPv6), `web_config_file` replaces
    `server.web_config_file` (`--web.config.file`). Logs go to `log_stream` (stdout by default).
    `parts` go to `Exporter` (`auth_factory`, `rng`, `rebuild_pause`, `aws_session_factory`):
    the demo's simulator credentials, the tests' clocks.
    """
    gc.disable()  # until start() has frozen what start-up built (`load_to_serve`)
    mask = SecretMask()
    configure_logging(config.logging.level, config.logging.format, log_stream, mask=mask)
    exporter = Exporter(config, secret_mask=mask, log_stream=log_stream, **parts)
    reloader = None if config_path is None else ConfigReloader(config_path, exporter)
    server = config.server
    metrics = Listener(
        create_app(exporter),
        server.host if host is None else host,
        server.port if port is None else port,
    )
    web_config = server.web_config_file if web_config_file is None else web_config_file
    admin = None
    if config.admin.enabled:
        admin_app = create_admin_app(
            exporter.tracker,
            token_file=config.admin.token_file,
            body_timeout=server.idle_timeout_seconds,
            allowed_hosts=config.admin.allowed_hosts,
            reports=exporter.fetch_report,
        )
        admin_auth = admin_app.get(ADMIN_TOKEN)
        if admin_auth is not None:
            mask.watch("admin", admin_auth.held_secrets)
        admin = Listener(admin_app, config.admin.host, config.admin.port)
    return Runtime(
        exporter,
        metrics,
        admin=admin,
        reloader=reloader,
        on_listening=on_listening,
        idle_timeout=server.idle_timeout_seconds,
        web_config_file=web_config or None,
    )


def app_runner(app: web.Application, idle_timeout: float) -> web.AppRunner:
    """How every listener serves its app (tests serve an admin API the same way).

    aiohttp's `handler_cancellation` stays off (its default; aiohttp's TestServer turns it on):
    a POST waiting for its fsync must not be cut short by a client that leaves. The one
    long-running handler, the admin report route, watches its client itself.
    """
    return web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=idle_timeout)


class Runtime:
    """One built exporter: `run()` in a process, `start()`/`stop()` in tests."""

    def __init__(
        self,
        exporter: Exporter,
        metrics: Listener,
        *,
        admin: Listener | None,
        reloader: ConfigReloader | None,
        on_listening: OnListening | None,
        idle_timeout: float,
        web_config_file: str | None = None,
    ) -> None:
        self.exporter = exporter
        self.reloader = reloader
        self._metrics = metrics
        self._admin = admin
        self._on_listening = on_listening
        self._idle_timeout = idle_timeout
        self._web_config_file = web_config_file
        #: The metrics listener's web config (TLS, basic auth, headers), once started.
        self.web_config: WebConfigWatcher | None = None
        self._runners: list[tuple[str, web.AppRunner]] = []
        #: Where the metrics app and the admin API listen, once started (loopback shown for
        #: a wildcard address).
        self.url: str | None = None
        self.admin_url: str | None = None
        self._switch_interval: float | None = None
        self._stopped = False

    async def run(self) -> None:
        """Start, serve until SIGTERM or SIGINT (SIGHUP reloads), stop.

        Raises `CannotListen` (after logging `cannot_listen`, and stopping) when an address
        cannot be bound.
        """
        await self.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        handled = [signal.SIGTERM, signal.SIGINT]
        for signum in handled:
            loop.add_signal_handler(signum, stop.set)
        if self.reloader is not None:
            loop.add_signal_handler(signal.SIGHUP, self.reloader.request)
            handled.append(signal.SIGHUP)
        try:
            await stop.wait()
        finally:
            for signum in handled:
                loop.remove_signal_handler(signum)
            await self.stop()

    async def start(self) -> None:
        """Start the exporter and its background work, open the listeners, then settle the
        process for serving (GC frozen, switch interval); on failure, stop what started."""
        try:
            # First: a bad web config refuses to start before the exporter opens its state.
            if self._web_config_file is not None:
                self.web_config = await self._read_web_config(self._web_config_file)
            await self.exporter.start()
            supervisor = self.exporter.supervisor
            if self.reloader is not None:
                supervisor.start("config-reloader", self.reloader.run, Stage.CONTROL)
            if self.web_config is not None:
                supervisor.start("web-config-watcher", self.web_config.watch, Stage.CONTROL)
            ticks = functools.partial(measure_loop_lag, self.exporter.metrics.loop_lag.observe)
            supervisor.start("loop-lag", ticks, Stage.CONTROL)
            tls = None if self.web_config is None else self.web_config.listener_context
            self.url = await self._listen("metrics", self._metrics, ssl_context=tls)
            log.info("listening", url=self.url, metrics=f"{self.url}/metrics")
            if self._admin is not None:
                self.admin_url = await self._listen("admin", self._admin)
                log.info("admin_api_listening", url=f"{self.admin_url}/api/v1/ingestions")
        except BaseException:
            await self.stop()
            raise
        finally:
            gc.enable()
        self._settle()
        if self._on_listening is not None:
            self._on_listening(self.url, self.admin_url)

    async def stop(self) -> None:
        """Stop in the documented order (see the module's docstring); once."""
        if self._stopped:
            return
        self._stopped = True
        log.info("shutting_down")
        for name, runner in reversed(self._runners):  # admin first: no new registrations
            await runner.cleanup()
            if name == "admin":
                log.info("admin_api_stopped")
        await self.exporter.stop()
        self._unsettle()

    async def _read_web_config(self, path: str) -> WebConfigWatcher:
        """The web config's watcher, read in a thread (files, the bcrypt dummy hash), and its
        guard on the metrics app: TLS, client SANs, basic auth (not on the probes), headers.

        The admin API does not take it: it has its own bearer token in the same
        Authorization header, and listens on loopback by default (docs/security.md)."""
        metrics = WebConfigMetrics(self.exporter.registry)
        try:
            watcher = await asyncio.to_thread(WebConfigWatcher, path, metrics=metrics)
        except ConfigError as error:
            log.error("web_config_invalid", path=path, problems=list(error.problems))
            raise
        install(self._metrics.app, lambda: watcher.settings, open_paths=PROBE_PATHS)
        return watcher

    async def _listen(
        self, name: str, listener: Listener, *, ssl_context: ssl.SSLContext | None = None
    ) -> str:
        runner = app_runner(listener.app, self._idle_timeout)
        await runner.setup()
        self._runners.append((name, runner))
        try:
            site = web.TCPSite(runner, listener.host, listener.port, ssl_context=ssl_context)
            await site.start()
        except OSError as exc:
            # Logged here, before the stop that logs exporter_stopped.
            log.error("cannot_listen", host=listener.host, port=listener.port, error=str(exc))
            raise CannotListen(str(exc)) from exc
        bound_host, bound_port = runner.addresses[0][:2]
        # A wildcard address is not something to click on: show loopback instead.
        shown_host = "127.0.0.1" if bound_host in {"0.0.0.0", "::"} else bound_host  # noqa: S104
        if ":" in shown_host:
            shown_host = f"[{shown_host}]"
        scheme = "http" if ssl_context is None else "https"
        return f"{scheme}://{shown_host}:{bound_port}"

    def _settle(self) -> None:
        # What start-up loaded (up to 100,000 uploads and their lines) lives as long as the
        # process: keep it out of the cyclic GC's full collections, which would otherwise
        # pause the event loop for tens of milliseconds now and then (scrape p99;
        # BENCHMARKS.md). Frozen objects are still freed by reference counting.
        gc.collect()
        gc.freeze()
        # Worker threads (config parsing on reload, the state writer, directory reads, gzip)
        # share the GIL with the loop; each time the loop lets go of it (every socket call),
        # getting it back may wait a whole switch interval. 1 ms instead of 5 keeps a
        # request's few turns of the loop from adding up to hundreds of ms (BENCHMARKS.md).
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)

    def _unsettle(self) -> None:
        """Undo `_settle` once stopped: a process that goes on (a test session) collects
        what this exporter left, and keeps its own switch interval."""
        if self._switch_interval is not None:
            gc.unfreeze()
            sys.setswitchinterval(self._switch_interval)
