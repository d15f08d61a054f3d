"""Start-up and shutdown of a running exporter: listeners, signals, the reloader, gc.freeze.

The CLI parses and validates; this module turns a `Config` into listening applications and
runs them until SIGTERM or SIGINT (SIGHUP reloads). The demo uses the same `serve`, so both
start and stop the same way. It never parses arguments and never prints usage.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import disable_created_metrics

from exporter.admin import TOKEN as ADMIN_TOKEN
from exporter.admin import create_admin_app
from exporter.config import Config, ServerConfig
from exporter.logs import SecretMask, configure_logging
from exporter.proxy import ProxyDeps, create_proxy_app
from exporter.reload import ConfigReloader
from exporter.server import create_app
from exporter.service import Exporter

log = structlog.get_logger("exporter.runtime")

#: sys.setswitchinterval once serving: how long a thread may keep the GIL from the loop.
SWITCH_INTERVAL_SECONDS = 0.001

EXIT_OK, EXIT_FAILURE = 0, 1


class CannotListen(OSError):
    """A listener could not be opened (address in use, no permission...)."""


@dataclass(frozen=True, slots=True)
class Listener:
    """A second application on its own address (the admin API)."""

    app: web.Application
    host: str
    port: int


def run_until_stopped(run: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """Run `run()` on a new event loop; the process exit code (1 when it cannot listen).

    No `_created` series are exposed: they double the counter and histogram lines with
    timestamps no dashboard or rule reads. The switch is process-wide in prometheus_client,
    so it is thrown here, at the process's entry, not in `serve` (tests serve in-process).
    """
    disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client
    try:
        asyncio.run(run())
    except CannotListen:
        return EXIT_FAILURE
    return EXIT_OK


def run_config(config: Config, config_path: Path, *, port: int | None = None) -> int:
    """Serve the exporter `config` describes (and its admin API) until stopped."""
    mask = SecretMask()
    configure_logging(config.logging.level, config.logging.format, mask=mask)
    exporter = Exporter(config, secret_mask=mask)
    reloader = ConfigReloader(config_path, exporter)
    admin = None
    if config.admin.enabled:
        admin_app = create_admin_app(
            exporter.tracker,
            token_file=config.admin.token_file,
            body_timeout=config.server.idle_timeout_seconds,
            allowed_hosts=config.admin.allowed_hosts,
            reports=exporter.fetch_report,
        )
        admin_auth = admin_app.get(ADMIN_TOKEN)
        if admin_auth is not None:
            mask.watch("admin", admin_auth.held_secrets)
        admin = Listener(admin_app, config.admin.host, config.admin.port)
    proxy = proxy_listener(exporter, config)
    return run_until_stopped(
        lambda: serve(
            create_app(exporter, reloader),
            config.server.host,
            config.server.port if port is None else port,
            admin=admin,
            proxy=proxy,
            on_reload=reloader.request,
            idle_timeout=config.server.idle_timeout_seconds,
        )
    )


# COORDINATOR (issue 24): the proxy's wiring, the one place it meets the running exporter.
# Call it from the composition root and open the Listener it returns (None: proxy.enabled is
# false) beside the admin API's; close it first on shutdown (no new uploads while stopping).
def proxy_listener(exporter: Exporter, config: Config) -> Listener | None:
    """The signing proxy's listener (docs/proxy.md), or None when `proxy.enabled` is false."""
    if not config.proxy.enabled:
        return None
    deps = ProxyDeps(
        api=lambda: exporter.config.api,
        auth_factory=exporter.auth_factory,
        limiter=exporter.limiter,
        register=exporter.tracker.register,
        observe_status=exporter.observed_status,
        registry=exporter.registry,
        secret_mask=exporter.secret_mask,
        body_timeout=config.server.idle_timeout_seconds,
    )
    app = create_proxy_app(deps, config.proxy)
    return Listener(app, config.proxy.host, config.proxy.port)


def app_runner(app: web.Application, idle_timeout: float) -> web.AppRunner:
    """How every listener serves its app (tests serve the admin API the same way).

    aiohttp's `handler_cancellation` stays off (its default; aiohttp's TestServer turns it on):
    a POST waiting for its fsync must not be cut short by a client that leaves. The one
    long-running handler, the admin report route, watches its client itself.
    """
    return web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=idle_timeout)


async def _listen(runner: web.AppRunner, host: str, port: int) -> str:
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        # Logged here, before the cleanup that stops the exporter logs exporter_stopped.
        log.error("cannot_listen", host=host, port=port, error=str(exc))
        raise CannotListen(str(exc)) from exc
    bound_host, bound_port = runner.addresses[0][:2]
    # A wildcard address is not something to click on: show loopback instead.
    shown_host = "127.0.0.1" if bound_host in {"0.0.0.0", "::"} else bound_host  # noqa: S104
    return f"http://{shown_host}:{bound_port}"


async def serve(
    app: web.Application,
    host: str,
    port: int,
    *,
    admin: Listener | None = None,
    proxy: Listener | None = None,
    on_reload: Callable[[], None] | None = None,
    on_listening: Callable[[str, str | None], None] | None = None,
    idle_timeout: float = ServerConfig().idle_timeout_seconds,
) -> None:
    """Serve `app` (and the admin API) until SIGTERM or SIGINT; SIGHUP calls `on_reload`.

    `on_listening` gets the URL of `app` and that of the admin API (None without one).

    `idle_timeout` closes connections that sit idle or stall halfway through a request.
    Raises `CannotListen` (after logging `cannot_listen`) when an address cannot be bound.
    """
    runner = app_runner(app, idle_timeout)
    admin_runner = app_runner(admin.app, idle_timeout) if admin else None
    proxy_runner = app_runner(proxy.app, idle_timeout) if proxy else None
    await runner.setup()
    try:
        url = await _listen(runner, host, port)
        log.info("listening", url=url, metrics=f"{url}/metrics")
        admin_url = None
        if admin is not None and admin_runner is not None:
            await admin_runner.setup()
            admin_url = await _listen(admin_runner, admin.host, admin.port)
            log.info("admin_api_listening", url=f"{admin_url}/api/v1/ingestions")
        if proxy is not None and proxy_runner is not None:
            await proxy_runner.setup()
            proxy_url = await _listen(proxy_runner, proxy.host, proxy.port)
            log.info("proxy_listening", url=proxy_url)
        # What start-up loaded (up to 100,000 uploads and their lines) lives as long as the
        # process: keep it out of the cyclic GC's full collections, which would otherwise
        # pause the event loop for tens of milliseconds now and then (scrape p99;
        # BENCHMARKS.md). Frozen objects are still freed by reference counting.
        gc.collect()
        gc.freeze()
        gc.enable()  # off during start-up when run from the command line (cli.main)
        # Worker threads (config parsing on reload, the state writer, directory reads, gzip)
        # share the GIL with the loop; each time the loop lets go of it (every socket call),
        # getting it back may wait a whole switch interval. 1 ms instead of 5 keeps a
        # request's few turns of the loop from adding up to hundreds of ms (BENCHMARKS.md).
        sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
        if on_listening is not None:
            on_listening(url, admin_url)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        if on_reload is not None:
            loop.add_signal_handler(signal.SIGHUP, on_reload)
        await stop.wait()
        log.info("shutting_down")
    finally:
        if proxy_runner is not None and proxy_runner.server is not None:
            await proxy_runner.cleanup()  # no new uploads while the exporter stops
            log.info("proxy_stopped")
        if admin_runner is not None and admin_runner.server is not None:
            await admin_runner.cleanup()  # no registrations while the exporter stops
            log.info("admin_api_stopped")
        await runner.cleanup()
