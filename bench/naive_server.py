"""The naive baseline: the per-upload metrics written the obvious way, for bench_scrape.py.

`python bench/naive_server.py --port P --uploads N [--updates-per-second U]` keeps the same
per-upload families as the exporter in labelled `prometheus_client.Gauge`s on a registry of
its own (`catalog_upload_status{ingestion_id,status}` one-hot over the 7 known statuses, the
status-changed and last-success timestamps, report availability), sets them with
`.labels(...).set()` per upload, and serves `generate_latest(registry)` from a tiny aiohttp
handler (gzip when asked, like the exporter). A background task re-sets U random uploads per
second, standing in for poll results. It does no HTTP polling. Runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
import time

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, generate_latest

STATUSES = ("INQUEUE", "INPROGRESS", "DONE", "CANCELLED", "FATAL", "INVALID", "UNKNOWN")
REGISTRY = web.AppKey("registry", CollectorRegistry)


class NaiveMetrics:
    """Labelled gauges, one child per series, set one upload at a time."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.status = Gauge(
            "catalog_upload_status",
            "Upload status, one-hot.",
            ["ingestion_id", "status"],
            registry=registry,
        )
        self.changed = Gauge(
            "catalog_upload_status_changed_timestamp_seconds",
            "When the current status was first seen.",
            ["ingestion_id"],
            registry=registry,
        )
        self.last_success = Gauge(
            "catalog_upload_last_success_timestamp_seconds",
            "Last successful poll.",
            ["ingestion_id"],
            registry=registry,
        )
        self.report = Gauge(
            "catalog_upload_report_available",
            "1 when a report link was returned.",
            ["ingestion_id"],
            registry=registry,
        )

    def set(self, ingestion_id: str, status: str, now: float) -> None:
        """Record one poll result for one upload."""
        for known in STATUSES:
            self.status.labels(ingestion_id, known).set(1.0 if known == status else 0.0)
        self.changed.labels(ingestion_id).set(now)
        self.last_success.labels(ingestion_id).set(now)
        self.report.labels(ingestion_id).set(0.0)


async def metrics(request: web.Request) -> web.Response:
    """The obvious handler: render the whole registry in the handler."""
    response = web.Response(body=generate_latest(request.app[REGISTRY]))
    response.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
    if "gzip" in request.headers.get("Accept-Encoding", ""):
        response.enable_compression(web.ContentCoding.gzip)
    return response


async def healthz(request: web.Request) -> web.Response:
    """Alive (and filled: the gauges are set before the listener opens)."""
    return web.Response(text="ok\n")


async def update(gauges: NaiveMetrics, ingestion_ids: list[str], per_second: float) -> None:
    """Re-set `per_second` random uploads each second, in 20 batches."""
    rng = random.Random(1)
    batch = max(1, round(per_second / 20))
    while True:
        await asyncio.sleep(0.05)
        now = time.time()
        for ingestion_id in rng.sample(ingestion_ids, min(batch, len(ingestion_ids))):
            gauges.set(ingestion_id, rng.choice(("INQUEUE", "INPROGRESS")), now)


async def serve(args: argparse.Namespace) -> None:
    """Fill the gauges, then serve until a signal."""
    registry = CollectorRegistry()
    gauges = NaiveMetrics(registry)
    ingestion_ids = [f"sim-{i:06d}" for i in range(1, args.uploads + 1)]
    now = time.time()
    for i, ingestion_id in enumerate(ingestion_ids):
        gauges.set(ingestion_id, "INQUEUE" if i % 2 == 0 else "INPROGRESS", now)
    app = web.Application()
    app[REGISTRY] = registry
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await runner.setup()
    updater = None
    if args.updates_per_second > 0 and ingestion_ids:
        updater = asyncio.create_task(update(gauges, ingestion_ids, args.updates_per_second))
    try:
        await web.TCPSite(runner, "127.0.0.1", args.port).start()
        print(f"naive_server ready on {args.port} with {len(ingestion_ids)} uploads", flush=True)
        await stop.wait()
    finally:
        if updater is not None:
            updater.cancel()
            await asyncio.gather(updater, return_exceptions=True)
        await runner.cleanup()


def main() -> int:
    """Parse the arguments and serve."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--uploads", type=int, default=1000)
    p.add_argument("--updates-per-second", type=float, default=500.0)
    asyncio.run(serve(p.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
