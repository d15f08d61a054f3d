"""A full API outage: every request answered 503, then nothing listening at all.

The exporter must stay up and ready, back off so that the outage costs a bounded request
rate, show that its data is going stale, and recover by itself when the API returns. CI runs
it with `OUTAGE_SECONDS=10` per phase; `OUTAGE_SECONDS=300 .venv/bin/pytest -m soak -s
tests/test_outage.py` is the long form (DEVELOPERS.md, RELIABILITY.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter

import pytest
from aiohttp import web

from exporter.simulator import Fault, FaultKind, Simulator
from exporter.simulator import create_app as create_simulator_app
from tests.conftest import (
    ExporterFactory,
    RunningExporter,
    fast_config,
    free_port,
    value,
    wait_for,
)

pytestmark = [pytest.mark.soak, pytest.mark.slow]

PHASE_SECONDS = float(os.environ.get("OUTAGE_SECONDS", "10"))
UPLOADS = 50
INTERVAL = 0.5
MAX_BACKOFF = 4.0
#: With equal jitter (exporter.backoff) an upload at the backoff ceiling waits 3/4 of
#: MAX_BACKOFF on average; the bound allows half as much again.
OUTAGE_RATE_BOUND = 1.5 * UPLOADS / (0.75 * MAX_BACKOFF)


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


#: Consecutive failures after which an upload's backoff ceiling is max_backoff_seconds:
#: initial_backoff_seconds * 2 ** (n - 1) >= MAX_BACKOFF.
FAILURES_TO_CEILING = 6


def failures_by_id(running: RunningExporter, since: int, kind: str | None = None) -> Counter[str]:
    """The poll_failed lines (of `kind`, or any) logged per upload after offset `since`."""
    failed: Counter[str] = Counter()
    for line in running.logs.getvalue()[since:].splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "poll_failed" and kind in {None, event.get("kind")}:
            failed[event["ingestion_id"]] += 1
    return failed


async def hold_outage(
    running: RunningExporter, kind: str, ids: list[str], outage_began: int
) -> float:
    """Run one outage phase; return the request rate after the backoff reached its ceiling.
    `outage_began` is the log's length when the outage began (failures since then count
    towards the backoff: no poll has succeeded in between).

    All along, /healthz and /readyz answer 200 and the last successful poll stays put.
    """
    before = await sample(running)
    began, since = time.monotonic(), len(running.logs.getvalue())

    # Evidence that every upload's backoff is at its ceiling and meets this phase's fault:
    # enough failures since the outage began logged for each, one of them of this kind (the
    # exporter's own account, which the simulator's log matches below).
    async def at_ceiling() -> bool:
        failed, this_phase = (
            failures_by_id(running, outage_began),
            failures_by_id(running, since, kind),
        )
        return all(failed[i] >= FAILURES_TO_CEILING and this_phase[i] for i in ids)

    await wait_for(at_ceiling, timeout=60, interval=0.2)
    settled = await sample(running)
    started, held_from = time.monotonic(), time.time()
    # A wall-clock wait that stays: holding the outage for PHASE_SECONDS of real time is what
    # this soak is (its long form is the same test with a bigger number), with the probes
    # answering all along; the rate is measured over at least half of it.
    hold = max(PHASE_SECONDS / 2, PHASE_SECONDS - (started - began))
    while time.monotonic() - started < hold:
        assert (await running.get("/healthz"))[0] == 200
        assert (await running.get("/readyz"))[0] == 200
        await asyncio.sleep(0.5)
    after = await sample(running)
    elapsed = time.monotonic() - started
    assert after["last_success"] == before["last_success"], "a poll succeeded mid-outage"
    assert after["last_success"] < held_from  # staleness shows: older than the whole hold
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

        async def each_polled_thrice() -> bool:
            polls = Counter(r.ingestion_id for r in sim.requests)
            return all(polls[i] >= 3 for i in ids)

        await wait_for(each_polled_thrice, timeout=30, interval=0.1)
        healthy_rate = len(sim.requests) / (time.monotonic() - healthy_started)
        assert [await running.status_of(i) for i in ids[:3]] == ["INPROGRESS"] * 3

        # Phase 1: every request answered 503 with an HTML page.
        outage_began = len(running.logs.getvalue())
        sim.inject(Fault(FaultKind.SERVER_ERROR_HTML, status=503))
        rate_503 = await hold_outage(running, "server_error", ids, outage_began)

        # Phase 2: nothing listens; meanwhile half the uploads finish upstream.
        await upstream.stop()
        for ingestion_id in ids[::2]:
            sim.set_status(ingestion_id, "FATAL")
        rate_refused = await hold_outage(running, "connection", ids, outage_began)
        assert await running.status_of(ids[0]) == "INPROGRESS"  # last known, not guessed

        # The API returns: the exporter recovers without a restart, within the backoff ceiling.
        sim.clear_faults()
        returned_at = time.time()
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

        # A wall-clock bound that stays: recovering within the backoff ceiling (every upload
        # waits at most MAX_BACKOFF for its next try) is a property in real time; the 10 s on
        # top absorb a loaded machine.
        while not await all_current():
            assert time.monotonic() - returned < MAX_BACKOFF + 10, "no recovery"
            await asyncio.sleep(0.2)
        recovered_after = time.monotonic() - returned
        fresh = await sample(running)
        assert fresh["last_success"] >= returned_at  # a success since the API came back
    finally:
        await upstream.stop()

    print(
        f"\noutage: healthy {healthy_rate:.1f} req/s; 503 phase {rate_503:.1f} req/s; "
        f"refused phase {rate_refused:.1f} req/s (bound {OUTAGE_RATE_BOUND:.1f}); "
        f"recovered {recovered_after:.1f} s after the API returned"
    )
    # Wall-clock bounds that stay: what an outage costs the API is a request rate, per second
    # of real time. Both are upper bounds, which a slow machine only makes easier to meet.
    assert rate_503 <= OUTAGE_RATE_BOUND
    assert rate_refused <= OUTAGE_RATE_BOUND
    assert max(rate_503, rate_refused) < healthy_rate / 2
