"""A full API outage: every request answered 503, then nothing listening at all.

The exporter must stay up and ready, back off so that the outage costs a bounded request
rate, show that its data is going stale, and recover by itself when the API returns. CI runs
it with `OUTAGE_SECONDS=10` per phase; `OUTAGE_SECONDS=300 .venv/bin/pytest -m soak -s
tests/test_outage.py` is the long form (DEVELOPERS.md, RELIABILITY.md).
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from aiohttp import web

from exporter.simulator import Fault, FaultKind, Simulator
from exporter.simulator import create_app as create_simulator_app
from tests.conftest import ExporterFactory, RunningExporter, fast_config, free_port, value

pytestmark = [pytest.mark.soak, pytest.mark.slow]

PHASE_SECONDS = float(os.environ.get("OUTAGE_SECONDS", "10"))
UPLOADS = 50
INTERVAL = 0.5
MAX_BACKOFF = 4.0
#: With full jitter an upload at the backoff ceiling waits MAX_BACKOFF / 2 on average.
OUTAGE_RATE_BOUND = 1.5 * UPLOADS * 2 / MAX_BACKOFF


class Upstream:
    """The simulator on a fixed loopback port that can be taken down and brought back."""

    def __init__(self, simulator: Simulator, port: int) -> None:
        self.simulator = simulator
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(create_simulator_app(self.simulator), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def sample(running: RunningExporter) -> dict[str, float]:
    samples = await running.scrape()

    def total(name: str) -> float:
        return sum(v for (n, _), v in samples.items() if n == name)

    return {
        "requests": total("catalog_api_requests_total"),
        "server_error": value(samples, "catalog_api_errors_total", kind="server_error") or 0.0,
        "connection": value(samples, "catalog_api_errors_total", kind="connection") or 0.0,
        "last_success": value(samples, "catalog_exporter_last_successful_poll_timestamp_seconds")
        or 0.0,
    }


async def hold_outage(running: RunningExporter, kind: str) -> float:
    """Run one outage phase; return the request rate after the backoff reached its ceiling.

    All along, /healthz and /readyz answer 200 and the last successful poll stays put.
    """
    before = await sample(running)
    settle = min(MAX_BACKOFF * 2, PHASE_SECONDS / 2)
    await asyncio.sleep(settle)
    settled = await sample(running)
    started = time.monotonic()
    while time.monotonic() - started < PHASE_SECONDS - settle:
        assert (await running.get("/healthz"))[0] == 200
        assert (await running.get("/readyz"))[0] == 200
        await asyncio.sleep(0.5)
    after = await sample(running)
    elapsed = time.monotonic() - started
    assert after["last_success"] == before["last_success"], "a poll succeeded mid-outage"
    assert time.time() - after["last_success"] >= PHASE_SECONDS * 0.9  # staleness shows
    assert after[kind] - settled[kind] == after["requests"] - settled["requests"]
    return (after["requests"] - settled["requests"]) / elapsed


async def test_a_long_outage_is_survived_with_a_bounded_request_rate_and_recovered_from(
    start_exporter: ExporterFactory,
) -> None:
    sim = Simulator(rate_limit=None)
    ids = [f"outage-{i:03d}" for i in range(UPLOADS)]
    for ingestion_id in ids:
        sim.add_upload(ingestion_id, [("INPROGRESS", 0)])
    upstream = Upstream(sim, free_port())
    await upstream.start()
    try:
        config = fast_config(
            f"http://127.0.0.1:{upstream.port}",
            ids,
            polling={
                "interval_seconds": INTERVAL,
                "initial_backoff_seconds": 0.2,
                "max_backoff_seconds": MAX_BACKOFF,
            },
            api={"timeout_seconds": 1},
            logging={"level": "info"},
        )
        running = await start_exporter(config)
        healthy_started = time.monotonic()
        await asyncio.sleep(3)
        healthy_rate = len(sim.requests) / (time.monotonic() - healthy_started)
        assert [await running.status_of(i) for i in ids[:3]] == ["INPROGRESS"] * 3

        # Phase 1: every request answered 503 with an HTML page.
        sim.inject(Fault(FaultKind.SERVER_ERROR_HTML, status=503))
        rate_503 = await hold_outage(running, "server_error")

        # Phase 2: nothing listens; meanwhile half the uploads finish upstream.
        await upstream.stop()
        for ingestion_id in ids[::2]:
            sim.set_status(ingestion_id, "FATAL")
        rate_refused = await hold_outage(running, "connection")
        assert await running.status_of(ids[0]) == "INPROGRESS"  # last known, not guessed

        # The API returns: the exporter recovers without a restart, within the backoff ceiling.
        sim.clear_faults()
        await upstream.start()
        returned = time.monotonic()

        async def all_current() -> bool:
            samples = await running.scrape()
            return all(
                value(samples, "catalog_upload_status", ingestion_id=i, status=s) == 1.0
                for i, s in (
                    (i, "FATAL" if n % 2 == 0 else "INPROGRESS") for n, i in enumerate(ids)
                )
            )

        while not await all_current():
            assert time.monotonic() - returned < MAX_BACKOFF + 10, "no recovery"
            await asyncio.sleep(0.2)
        recovered_after = time.monotonic() - returned
        fresh = await sample(running)
        assert time.time() - fresh["last_success"] < 2
    finally:
        await upstream.stop()

    print(
        f"\noutage: healthy {healthy_rate:.1f} req/s; 503 phase {rate_503:.1f} req/s; "
        f"refused phase {rate_refused:.1f} req/s (bound {OUTAGE_RATE_BOUND:.1f}); "
        f"recovered {recovered_after:.1f} s after the API returned"
    )
    assert rate_503 <= OUTAGE_RATE_BOUND
    assert rate_refused <= OUTAGE_RATE_BOUND
    assert max(rate_503, rate_refused) < healthy_rate / 2
