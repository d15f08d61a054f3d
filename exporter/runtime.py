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
over TLS with the web config's, then admin, then the signing proxy); then what start-up built
is frozen out of the GC and the switch interval is set.
Shutdown (RELIABILITY.md, "Shutdown"): `shutting_down`; the proxy and the admin listener (no new
registrations: `admin_api_stopped`), the metrics listener; then the supervisor's stages
(reloader and loop lag tick, directory watcher and SQS receiver, the poller and its polls in
flight, the state writer's last commit and the exposition); `exporter_stopped`.

With `--on-invalid-config=serve` (the sidecar), a config file that is invalid at start-up
does not end the process: `run_standby` serves a `Standby` (alive, not ready, the config
gauges at 0) until the file is valid, then hands over to `build` in the same process.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import signal
import ssl
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, TypeVar

import pydantic
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, disable_created_metrics

from exporter.admin import TOKEN as ADMIN_TOKEN
from exporter.admin import create_admin_app
from exporter.config import (
    Config,
    ConfigError,
    LoggingConfig,
    ReloadConfig,
    ServerConfig,
    load_config,
)
from exporter.logs import SecretMask, configure_logging
from exporter.looplag import measure_loop_lag
from exporter.metrics import ConfigMetrics, WebConfigMetrics, register_build_info
from exporter.proxy import ProxyDeps, create_proxy_app, upstream_session
from exporter.reload import ConfigReloader, ExporterReloads
from exporter.server import create_app, create_standby_app
from exporter.service import Exporter
from exporter.supervisor import Stage, Supervisor
from exporter.webconfig import WebConfigWatcher, install
from exporter.yamlfile import YamlFileError, read_yaml

#: Paths of the metrics listener that basic auth leaves open (TLS still applies): the
#: kubelet's probes cannot easily send credentials, and they answer nothing secret.
PROBE_PATHS = ("/healthz", "/readyz")

log = structlog.get_logger("exporter.runtime")

#: sys.setswitchinterval once serving: how long a thread may keep the GIL from the loop.
SWITCH_INTERVAL_SECONDS = 0.001

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

_Section = TypeVar("_Section", bound=pydantic.BaseModel)

#: What a `Runtime` calls once listening, with the runtime: its `url`, `admin_url` and
#: `proxy_url` (None for a listener it does not have).
OnListening = Callable[["Runtime"], None]


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


def load_to_serve(path: Path, *, token_files_may_be_absent: bool = False) -> Config:
    """`load_config` for a process that goes on to serve: the cyclic GC goes off first.

    Start-up builds up to 100,000 uploads (the config's ids, then the state's): full
    collections of a growing heap, which finds no garbage, cost about 1 s of it
    (BENCHMARKS.md). `Runtime.start` turns the collector back on once it has frozen what
    start-up built.
    """
    gc.disable()
    return load_config(path, token_files_may_be_absent=token_files_may_be_absent)


def run_config(
    config: Config,
    config_path: Path,
    *,
    port: int | None = None,
    host: str | None = None,
    web_config_file: str | None = None,
    token_files_may_be_absent: bool = False,
) -> int:
    """Serve the exporter `config` describes (and its admin API) until stopped."""
    runtime = build(
        config,
        config_path,
        port=port,
        host=host,
        web_config_file=web_config_file,
        token_files_may_be_absent=token_files_may_be_absent,
    )
    return run_until_stopped(runtime.run)


def run_standby(
    config_path: Path,
    problems: Sequence[str],
    *,
    port: int | None = None,
    host: str | None = None,
    web_config_file: str | None = None,
) -> int:
    """Serve a `Standby` until `config_path` is valid, then the exporter it describes."""
    standby = Standby(config_path, problems, port=port, host=host, web_config_file=web_config_file)
    return run_until_stopped(standby.run)


def build(
    config: Config,
    config_path: Path | None = None,
    *,
    port: int | None = None,
    host: str | None = None,
    web_config_file: str | None = None,
    log_stream: TextIO | None = None,
    on_listening: OnListening | None = None,
    token_files_may_be_absent: bool = False,
    **parts: Any,
) -> Runtime:
    """Everything one exporter process runs, built from `config`, not started yet.

    `config_path` is what SIGHUP and changes of the file reload (none: no reloader), with
    `token_files_may_be_absent` as at start-up (`--on-invalid-config=serve`). `port`
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
    reloader = None
    if config_path is not None:
        load = functools.partial(load_config, token_files_may_be_absent=token_files_may_be_absent)
        reloader = ConfigReloader(config_path, ExporterReloads(exporter), load=load)
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
        proxy=proxy_listener(exporter, config),
        reloader=reloader,
        on_listening=on_listening,
        idle_timeout=server.idle_timeout_seconds,
        web_config_file=web_config or None,
    )


def proxy_listener(exporter: Exporter, config: Config) -> Listener | None:
    """The signing proxy's listener (docs/proxy.md), or None when `proxy.enabled` is false."""
    if not config.proxy.enabled:
        return None
    deps = ProxyDeps(
        api=lambda: exporter.config.api,
        auth=lambda: exporter.auth,
        limiter=exporter.limiter,
        register=exporter.tracker.register,
        observe_status=exporter.observed_status,
        registry=exporter.registry,
        body_timeout=config.server.idle_timeout_seconds,
    )
    app = create_proxy_app(deps, config.proxy)
    app.cleanup_ctx.append(upstream_session)
    return Listener(app, config.proxy.host, config.proxy.port)


def app_runner(app: web.Application, idle_timeout: float) -> web.AppRunner:
    """How every listener serves its app (tests serve an admin API the same way).

    aiohttp's `handler_cancellation` stays off (its default; aiohttp's TestServer turns it on):
    a POST waiting for its fsync must not be cut short by a client that leaves. The one
    long-running handler, the admin report route, watches its client itself.
    """
    return web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=idle_timeout)


#: The log line each listener's close is reported with (the metrics listener's is silent).
_STOPPED_EVENTS = {"admin": "admin_api_stopped", "proxy": "proxy_stopped"}


async def open_site(
    runner: web.AppRunner, host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> str:
    """Listen on `host`:`port` with a set-up `runner`; the URL to show for it (loopback for
    a wildcard address, an IPv6 host in brackets). Raises `CannotListen` after logging
    `cannot_listen` (before the stop that logs exporter_stopped)."""
    try:
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    except OSError as exc:
        log.error("cannot_listen", host=host, port=port, error=str(exc))
        raise CannotListen(str(exc)) from exc
    bound_host, bound_port = runner.addresses[0][:2]
    # A wildcard address is not something to click on: show loopback instead.
    shown_host = "127.0.0.1" if bound_host in {"0.0.0.0", "::"} else bound_host  # noqa: S104
    if ":" in shown_host:
        shown_host = f"[{shown_host}]"
    scheme = "http" if ssl_context is None else "https"
    return f"{scheme}://{shown_host}:{bound_port}"


async def guard_with_web_config(
    path: str, app: web.Application, registry: CollectorRegistry
) -> WebConfigWatcher:
    """The web config's watcher, read in a thread (files, the bcrypt dummy hash), its
    gauges on `registry`, and its guard on `app`: TLS, client SANs, basic auth (not on the
    probes), headers. Raises `ConfigError` after logging `web_config_invalid`.

    The admin API does not take it: it has its own bearer token in the same Authorization
    header, and listens on loopback by default (docs/security.md)."""
    metrics = WebConfigMetrics(registry)
    try:
        watcher = await asyncio.to_thread(WebConfigWatcher, path, metrics=metrics)
    except ConfigError as error:
        log.error("web_config_invalid", path=path, problems=list(error.problems))
        raise
    install(app, lambda: watcher.settings, open_paths=PROBE_PATHS)
    return watcher


class Runtime:
    """One built exporter: `run()` in a process, `start()`/`stop()` in tests."""

    def __init__(
        self,
        exporter: Exporter,
        metrics: Listener,
        *,
        admin: Listener | None,
        proxy: Listener | None = None,
        reloader: ConfigReloader | None,
        on_listening: OnListening | None,
        idle_timeout: float,
        web_config_file: str | None = None,
    ) -> None:
        self.exporter = exporter
        self.reloader = reloader
        self._metrics = metrics
        self._admin = admin
        self._proxy = proxy
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
        self.proxy_url: str | None = None
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
                self.web_config = await guard_with_web_config(
                    self._web_config_file, self._metrics.app, self.exporter.registry
                )
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
            if self._proxy is not None:
                self.proxy_url = await self._listen("proxy", self._proxy)
                log.info("proxy_listening", url=self.proxy_url)
        except BaseException:
            await self.stop()
            raise
        finally:
            gc.enable()
        self._settle()
        if self._on_listening is not None:
            self._on_listening(self)

    async def stop(self) -> None:
        """Stop in the documented order (see the module's docstring); once."""
        if self._stopped:
            return
        self._stopped = True
        log.info("shutting_down")
        # The proxy, then the admin API first: no new uploads or registrations while stopping.
        for name, runner in reversed(self._runners):
            await runner.cleanup()
            if name in _STOPPED_EVENTS:
                log.info(_STOPPED_EVENTS[name])
        await self.exporter.stop()
        self._unsettle()

    async def _listen(
        self, name: str, listener: Listener, *, ssl_context: ssl.SSLContext | None = None
    ) -> str:
        runner = app_runner(listener.app, self._idle_timeout)
        await runner.setup()
        self._runners.append((name, runner))
        return await open_site(runner, listener.host, listener.port, ssl_context)

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


class Standby:
    """The process while its config file is invalid (`--on-invalid-config=serve`).

    It logs the problems once (`config_invalid`), serves /healthz (200), /readyz (503) and
    /metrics (`catalog_exporter_config_valid` 0, build info, process metrics) on the address
    of the file's `server` section if that section alone is valid, else the defaults (`port`,
    the `--port` flag, wins either way). It reloads the file as the running exporter does
    (SIGHUP, and content changes checked every `reload.watch_interval_seconds`, the file's
    value if that section alone is valid, else the default), and once the file is valid
    closes its listener and runs `build(config)` in the same process: no restart.
    """

    def __init__(
        self,
        config_path: Path,
        problems: Sequence[str],
        *,
        port: int | None = None,
        host: str | None = None,
        web_config_file: str | None = None,
        log_stream: TextIO | None = None,
    ) -> None:
        self._path = config_path
        self._problems = tuple(problems)
        self._port = port
        self._host = host
        self._web_config_file = web_config_file
        self._log_stream = log_stream
        document = _read_document(config_path)
        self._server = _valid_section(document, "server", ServerConfig)
        self._logging = _valid_section(document, "logging", LoggingConfig)
        self._reload = _valid_section(document, "reload", ReloadConfig)
        self.registry = CollectorRegistry(auto_describe=True)
        self._config_metrics = ConfigMetrics(self.registry)
        self._config_metrics.loaded(ok=False)
        register_build_info(self.registry)
        self._config: Config | None = None
        self._done: asyncio.Event | None = None

    @property
    def watch_interval(self) -> float:
        """`ReloadTarget`: how often the file's content is checked."""
        return self._reload.watch_interval_seconds

    def loaded(self, *, ok: bool) -> None:
        """`ReloadTarget`: the config gauges."""
        self._config_metrics.loaded(ok=ok)

    def apply(self, config: Config) -> Mapping[str, object]:
        """`ReloadTarget`: a valid config at last; `run` hands over to it."""
        self._config = config
        if self._done is not None:
            self._done.set()
        return {"handed_over_to": "exporter"}

    async def run(self) -> None:
        """Stand by until SIGTERM or SIGINT, or until the file is valid: then run the exporter
        (`Runtime.run`). Raises `CannotListen` as `Runtime.run` does."""
        gc.enable()  # `load_to_serve` turned it off; `build` does again for its start-up
        configure_logging(self._logging.level, self._logging.format, self._log_stream)
        log.error(
            "config_invalid",
            path=str(self._path),
            problems=list(self._problems),
            consequence="serving /healthz, /readyz (503) and /metrics "
            "(catalog_exporter_config_valid 0) until the file is valid; then the exporter "
            "starts, with no restart",
        )
        self._done = done = asyncio.Event()
        load = functools.partial(load_config, token_files_may_be_absent=True)
        reloader = ConfigReloader(self._path, self, load=load)
        supervisor = Supervisor()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, done.set)
        loop.add_signal_handler(signal.SIGHUP, reloader.request)
        port = self._server.port if self._port is None else self._port
        host = self._server.host if self._host is None else self._host
        app = create_standby_app(self.registry)
        tls = await self._web_config(app)
        runner = app_runner(app, self._server.idle_timeout_seconds)
        try:
            await runner.setup()
            url = await open_site(runner, host, port, tls)
            log.info("standby_listening", url=url, path=str(self._path))
            supervisor.start("config-reloader", reloader.run, Stage.CONTROL)
            await done.wait()
        finally:
            await supervisor.stop()
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            await runner.cleanup()
        if self._config is None:
            log.info("standby_stopped")
            return
        log.info("standby_handing_over", path=str(self._path))
        runtime = build(
            self._config,
            self._path,
            port=self._port,
            host=self._host,
            web_config_file=self._web_config_file,
            log_stream=self._log_stream,
            token_files_may_be_absent=True,
        )
        await runtime.run()

    async def _web_config(self, app: web.Application) -> ssl.SSLContext | None:
        """The stand-by's listener speaks what the exporter's will (TLS, basic auth, headers),
        so probes and scrapes set up for it keep working; a web config that cannot be read
        yet leaves it plain HTTP (logged): the exporter proper reports it when it starts."""
        path = self._web_config_file
        if path is None:
            path = self._server.web_config_file
        if not path:
            return None
        try:
            watcher = await guard_with_web_config(path, app, self.registry)
        except ConfigError:
            return None
        return watcher.listener_context


def _read_document(path: Path) -> object:
    """The config file's document, or None when it cannot be read as YAML."""
    try:
        return read_yaml(path)
    except YamlFileError:
        return None


def _valid_section(document: object, name: str, model: type[_Section]) -> _Section:
    """Section `name` of `document` if it is valid on its own, else its defaults."""
    value = document.get(name) if isinstance(document, dict) else None
    try:
        return model.model_validate({} if value is None else value)
    except pydantic.ValidationError:
        return model()
