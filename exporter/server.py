"""The exporter's HTTP face: /metrics, /healthz, /readyz and a landing page.

Handlers only read state the poller keeps up to date; none of them waits on the Catalog
API. Nothing here starts or stops anything: `runtime` does, and serves this app, or the
stand-by's (`create_standby_app`) while the config file is invalid.
"""

from __future__ import annotations

import asyncio
import html

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from exporter import __version__
from exporter.service import Exporter

EXPORTER = web.AppKey("exporter", Exporter)
STANDBY_REGISTRY = web.AppKey("standby_registry", CollectorRegistry)

#: /readyz of the stand-by. The problems are in the log only: /readyz is open to anyone who
#: reaches the port.
STANDBY_NOT_READY = (
    "not ready: the configuration file is invalid (the log names every problem); "
    "it is loaded once it is fixed\n"
)

log = structlog.get_logger("exporter.server")

#: The exporter's own endpoints take no request bodies worth more than this.
MAX_REQUEST_BYTES = 64 * 1024

_LANDING = """<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>catalog-upload-exporter</title></head>
<body>
<h1>catalog-upload-exporter</h1>
<p>Prometheus exporter for HAQM Catalog API upload status. Version {version}.</p>
<p>Tracking {tracked} uploads against <code>{base_url}</code>.</p>
<ul>
<li><a href="metrics">Metrics</a></li>
<li><a href="healthz">Health</a> (alive)</li>
<li><a href="readyz">Readiness</a> (config loaded and poll loop running)</li>
</ul>
</body>
</html>
"""


def create_app(exporter: Exporter) -> web.Application:
    """The aiohttp application serving `exporter`'s endpoints (`runtime` starts the exporter)."""
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    app[EXPORTER] = exporter
    app.router.add_get("/", landing)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def metrics(request: web.Request) -> web.StreamResponse:
    """Current state in the text format, or OpenMetrics when the scraper asks for it.

    The body goes out in the exposition's pieces, never joined into one copy (tens of MB at
    100,000 uploads), gzip-encoded from precompressed pieces when the scraper accepts gzip
    (pieces not compressed yet are compressed in a worker thread).
    It is written under `server.write_timeout_seconds`: a client that stops reading is
    disconnected rather than left holding the response.
    """
    _, content_type = choose_encoder(request.headers.get("Accept", ""))
    exporter = request.app[EXPORTER]
    openmetrics = content_type.startswith("application/openmetrics-text")
    gzipped = accepts_gzip(request.headers.get("Accept-Encoding", ""))
    exposition = exporter.exposition
    if gzipped:
        chunks = await exposition.gzip_chunks_off_loop(exporter.registry, openmetrics=openmetrics)
    else:
        chunks = exposition.chunks(exporter.registry, openmetrics=openmetrics)
    response = web.StreamResponse(headers={"Content-Type": content_type, "Vary": "Accept-Encoding"})
    if gzipped:
        response.headers["Content-Encoding"] = "gzip"
    response.content_length = sum(map(len, chunks))
    try:
        async with asyncio.timeout(exporter.config.server.write_timeout_seconds):
            await response.prepare(request)
            for chunk in chunks:
                await response.write(chunk)
            await response.write_eof()
    except ConnectionError:
        log.debug("scrape_client_gone", peer=request.remote)
    except TimeoutError:
        exporter.metrics.scrape_clients_dropped.inc()
        log.warning("scrape_client_too_slow", peer=request.remote)
        if request.transport is not None:
            request.transport.abort()
    return response


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header allows gzip (`gzip` or `*`, not with q=0)."""
    for item in accept_encoding.split(","):
        coding, *params = (part.strip().lower() for part in item.split(";"))
        if coding not in {"gzip", "*"}:
            continue
        qualities = [p.removeprefix("q=") for p in params if p.startswith("q=")]
        try:
            return not qualities or float(qualities[0]) > 0
        except ValueError:
            return False
    return False


async def healthz(request: web.Request) -> web.Response:
    """Alive: the event loop answers."""
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    """Ready: a valid config is loaded and the poll loop runs."""
    if request.app[EXPORTER].ready:
        return web.Response(text="ready\n")
    return web.Response(status=503, text="not ready: poll loop not running\n")


async def landing(request: web.Request) -> web.Response:
    """A small page linking the endpoints, like node_exporter's."""
    exporter = request.app[EXPORTER]
    page = _LANDING.format(
        version=html.escape(__version__),
        tracked=len(exporter.store),
        base_url=html.escape(exporter.config.api.base_url),
    )
    return web.Response(text=page, content_type="text/html")


def create_standby_app(registry: CollectorRegistry) -> web.Application:
    """What `--on-invalid-config=serve` serves until the config file is valid: /healthz 200,
    /readyz 503 and `registry` (the config gauges at 0, build info) on /metrics."""
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    app[STANDBY_REGISTRY] = registry
    app.router.add_get("/metrics", standby_metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", standby_readyz)
    return app


async def standby_metrics(request: web.Request) -> web.Response:
    """The stand-by's few metrics, in the format the scraper asks for."""
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encoder(request.app[STANDBY_REGISTRY])
    return web.Response(body=body, headers={"Content-Type": content_type})


async def standby_readyz(request: web.Request) -> web.Response:
    """Never ready: no valid config, no poll loop."""
    return web.Response(status=503, text=STANDBY_NOT_READY)
