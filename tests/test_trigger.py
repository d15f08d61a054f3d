"""Poller.trigger: a poll now, ahead of the heap, through the rate limiter, merged when due."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry

from exporter.config import PollingConfig
from exporter.metrics import ExporterMetrics, UploadMetrics
from exporter.models import StatusReport
from exporter.ratelimit import AdaptiveRateLimiter
from exporter.scheduler import Poller, Trigger
from exporter.uploads import UploadStore
from tests.conftest import supervise_poller, wait_for

INTERVAL = 600.0


class FakeTime:
    """A clock whose sleep advances it: the limiter's waits cost no real time."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept = 0.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds


class NoJitter(random.Random):
    """Every draw is its lower bound: first polls due at once, intervals never shortened."""

    def uniform(self, a: float, b: float) -> float:
        return a


@dataclass
class FakeClient:
    """Answers INPROGRESS; polls of ids in `gates` wait until their event is set."""

    statuses: dict[str, str] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)

    async def fetch_status(self, ingestion_id: str) -> StatusReport:
        self.calls.append(ingestion_id)
        gate = self.gates.get(ingestion_id)
        if gate is not None:
            await gate.wait()
        status = self.statuses.get(ingestion_id, "INPROGRESS")
        return StatusReport(status=status, report_available=False, raw=status)

    def count(self, ingestion_id: str) -> int:
        return self.calls.count(ingestion_id)


@dataclass
class Rig:
    poller: Poller
    client: FakeClient
    time: FakeTime
    store: UploadStore


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    """A poller over three tracked ids, each polled once and next due in 600 s (fake time)."""
    fake = FakeTime()
    registry = CollectorRegistry()
    store = UploadStore()
    client = FakeClient()
    limiter = AdaptiveRateLimiter(1.0, clock=fake.clock, sleep=fake.sleep)
    poller = Poller(
        store=store,
        client=client,  # type: ignore[arg-type]
        limiter=limiter,
        settings=PollingConfig(interval_seconds=INTERVAL),
        max_concurrency=4,
        metrics=ExporterMetrics(registry, rate_limit=lambda: 1.0, poll_lag=lambda: 0.0),
        upload_metrics=UploadMetrics(registry),
        clock=fake.clock,
        rng=NoJitter(),
    )
    for ingestion_id in ("a", "b", "c"):
        store.add(ingestion_id, "config", {})
    supervisor = supervise_poller(poller, grace_seconds=1.0)

    async def first_polls_done() -> bool:
        return len(client.calls) == 3 and poller.lag() == 0.0

    await wait_for(first_polls_done)
    yield Rig(poller, client, fake, store)
    await supervisor.stop()


async def polled(client: FakeClient, ingestion_id: str, times: int) -> None:
    async def condition() -> bool:
        return client.count(ingestion_id) >= times

    await wait_for(condition, timeout=5)


async def settled(rig: Rig, sentinel: str) -> None:
    """Trigger `sentinel` and wait until its poll has completed. Triggers are served in the
    order made, each poll's task starting in the order dispatched: once the sentinel's poll is
    done, every poll that an earlier trigger queued has been made and, not waiting on a gate,
    completed. This is the evidence that nothing more is coming, where a test would otherwise
    sleep and then check that nothing happened."""
    done = asyncio.Event()
    assert rig.poller.trigger(sentinel, done.set) is Trigger.TRIGGERED
    await asyncio.wait_for(done.wait(), timeout=5)


async def test_a_trigger_polls_an_id_due_in_ten_minutes_now(rig: Rig) -> None:
    """An id next due in 600 s is polled at once, and then not again until the interval."""
    done: list[str] = []
    assert rig.poller.trigger("b", lambda: done.append("b")) is Trigger.TRIGGERED
    await polled(rig.client, "b", 2)
    await wait_for(lambda: asyncio.sleep(0, bool(done)))
    assert done == ["b"]
    assert rig.client.count("a") == rig.client.count("c") == 1
    assert rig.poller.lag() == 0.0  # its stale heap entry does not count as overdue


async def test_triggered_polls_still_wait_for_rate_limit_tokens(rig: Rig) -> None:
    """Three triggers at 1 request/s with a burst of one take two more seconds of limiter time."""
    rig.time.now += 10.0  # the bucket is full again (one token)
    slept = rig.time.slept
    for ingestion_id in ("a", "b", "c"):
        assert rig.poller.trigger(ingestion_id) is Trigger.TRIGGERED
    for ingestion_id in ("a", "b", "c"):
        await polled(rig.client, ingestion_id, 2)
    assert rig.time.slept - slept == pytest.approx(2.0)


async def test_a_trigger_for_an_id_due_within_a_second_merges_into_that_poll(rig: Rig) -> None:
    """Due in half a second: merged (one poll, moved ahead); its old due time passing while
    that poll is in flight starts no second one."""
    rig.time.now += INTERVAL - 0.5
    gate = rig.client.gates["a"] = asyncio.Event()
    assert rig.poller.trigger("a") is Trigger.MERGED
    await polled(rig.client, "a", 2)
    rig.time.now += 1.0  # past the old due time of "a" (and of "b" and "c")
    assert rig.poller.trigger("c") is Trigger.MERGED  # due too: this wakes the dispatcher
    await polled(rig.client, "c", 2)
    # Due by the heap, after the old entry of "a" (due first, sequenced first): a second poll
    # of "a" from that entry would have been dispatched, and so recorded, before this one.
    await polled(rig.client, "b", 2)
    assert rig.client.count("a") == 2
    gate.set()


async def test_triggers_while_a_poll_is_in_flight_merge_into_it(rig: Rig) -> None:
    """A second and third trigger during a poll join it: one poll, every follower told once."""
    gate = rig.client.gates["b"] = asyncio.Event()
    done: list[int] = []
    assert rig.poller.trigger("b", lambda: done.append(1)) is Trigger.TRIGGERED
    await polled(rig.client, "b", 2)
    assert rig.poller.trigger("b", lambda: done.append(2)) is Trigger.MERGED
    assert rig.poller.trigger("b", lambda: done.append(3)) is Trigger.MERGED
    assert done == []
    gate.set()

    async def told() -> bool:
        return len(done) == 3

    await wait_for(told)
    await settled(rig, "a")  # a merged trigger queued a poll of its own would come first
    assert sorted(done) == [1, 2, 3]
    assert rig.client.count("b") == 2


async def test_triggers_for_untracked_and_terminal_ids_poll_nothing(rig: Rig) -> None:
    """An untracked id is NOT_TRACKED, a finished one TERMINAL; neither is polled."""
    rig.client.statuses["c"] = "DONE"
    assert rig.poller.trigger("c") is Trigger.TRIGGERED
    await wait_for(lambda: asyncio.sleep(0, rig.store.get("c").terminal))  # type: ignore[union-attr]
    assert rig.poller.trigger("c") is Trigger.TERMINAL
    assert rig.poller.trigger("stranger") is Trigger.NOT_TRACKED
    await settled(rig, "a")
    assert rig.client.count("c") == 2
    assert "stranger" not in rig.client.calls


async def test_an_untracked_id_loses_its_pending_trigger(rig: Rig) -> None:
    """Released before its triggered poll ran: not polled, its follower never called."""
    rig.time.now += 10.0
    gate = rig.client.gates["a"] = asyncio.Event()
    assert rig.poller.trigger("a") is Trigger.TRIGGERED  # holds the dispatcher's only token
    await polled(rig.client, "a", 2)
    done: list[str] = []
    assert rig.poller.trigger("b", lambda: done.append("b")) is Trigger.TRIGGERED
    rig.store.remove("b")
    rig.poller.untrack(["b"])
    gate.set()
    await settled(rig, "c")  # triggered after "b": its poll would have come first
    assert rig.client.count("b") == 1
    assert done == []
