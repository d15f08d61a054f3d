"""Event loop lag is measured and exported, with the process, platform and GC collectors."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry, Histogram

from exporter.looplag import measure_loop_lag
from exporter.metrics import LOOP_LAG_BUCKETS
from tests.conftest import ExporterFactory, SimulatorFactory, fast_config, value, wait_for

LAG = "catalog_exporter_event_loop_lag_seconds"


def lag_histogram(registry: CollectorRegistry) -> Histogram:
    return Histogram(LAG, "lag", buckets=LOOP_LAG_BUCKETS, registry=registry)


class FakeTime:
    """A clock that a fake sleep moves forward: by the interval, plus a lateness per tick."""

    def __init__(self, lateness: list[float]) -> None:
        self.now = 1000.0
        self.lateness = lateness
        self.ticks = 0
        self.done = asyncio.Event()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        if self.ticks == len(self.lateness):
            self.done.set()
            await asyncio.Event().wait()  # parked until cancelled
        self.now += seconds + self.lateness[self.ticks]
        self.ticks += 1
        await asyncio.sleep(0)


async def test_each_tick_records_how_late_it_ran() -> None:
    """One observation per tick, of the time past its due time, in the matching bucket."""
    registry = CollectorRegistry()
    histogram = lag_histogram(registry)
    fake = FakeTime([0.0, 0.002, 0.0, 0.7, 0.03])
    ticker = asyncio.create_task(
        measure_loop_lag(histogram.observe, interval=0.25, clock=fake.clock, sleep=fake.sleep)
    )
    await asyncio.wait_for(fake.done.wait(), 5)
    ticker.cancel()
    await asyncio.gather(ticker, return_exceptions=True)

    def bucket(le: str) -> float | None:
        return registry.get_sample_value(f"{LAG}_bucket", {"le": le})

    assert registry.get_sample_value(f"{LAG}_count") == 5
    assert registry.get_sample_value(f"{LAG}_sum") == pytest.approx(sum(fake.lateness))
    assert bucket("0.001") == 2
    assert bucket("0.0025") == 3
    assert bucket("0.05") == 4
    assert bucket("0.5") == 4
    assert bucket("1.0") == 5


async def test_a_blocked_loop_shows_in_a_high_bucket() -> None:
    """A callback that holds the loop for a second makes the next tick over half a second late."""
    registry = CollectorRegistry()
    histogram = lag_histogram(registry)
    ticker = asyncio.create_task(measure_loop_lag(histogram.observe, interval=0.01))
    asyncio.get_running_loop().call_later(0.05, time.sleep, 1.0)

    async def seen_late() -> bool:
        count = registry.get_sample_value(f"{LAG}_count") or 0.0
        below = registry.get_sample_value(f"{LAG}_bucket", {"le": "0.5"}) or 0.0
        return count - below >= 1

    try:
        await wait_for(seen_late)
    finally:
        ticker.cancel()
        await asyncio.gather(ticker, return_exceptions=True)


async def test_the_exporter_exposes_loop_lag_and_process_metrics(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """A running exporter counts its ticks and has process_*, python_info and python_gc_*."""
    _, url = await start_simulator()
    running = await start_exporter(fast_config(url, []))

    async def ticked_twice() -> bool:
        return (value(await running.scrape(), f"{LAG}_count") or 0.0) >= 2

    await wait_for(ticked_twice)
    samples = await running.scrape()
    resident = value(samples, "process_resident_memory_bytes")
    assert resident is not None and resident > 0
    assert (value(samples, "process_cpu_seconds_total") or 0.0) > 0
    assert value(samples, "process_open_fds") is not None
    assert any(name == "python_info" for name, _ in samples)
    assert any(name == "python_gc_objects_collected_total" for name, _ in samples)
