"""The supervisor of background work: restarts with backoff, replacements, the stop order; and
the runtime that builds it, as production runs it."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from exporter.logs import configure_logging
from exporter.runtime import SWITCH_INTERVAL_SECONDS
from exporter.supervisor import Stage, Supervisor
from tests.conftest import ExporterFactory, SimulatorFactory, fast_config, wait_for
from tests.virtual_time import VirtualTime

RESTARTS = "catalog_exporter_background_task_restarts_total"


def events(logs: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in logs.getvalue().splitlines() if line.startswith("{")]


@pytest.fixture
def logs() -> io.StringIO:
    stream = io.StringIO()
    configure_logging("debug", "json", stream)
    return stream


def counted(registry: CollectorRegistry) -> tuple[Counter, Supervisor, VirtualTime]:
    counter = Counter("catalog_exporter_background_task_restarts", "r", ["task"], registry=registry)
    time = VirtualTime()
    supervisor = Supervisor(
        restarts=counter, clock=time.clock, sleep=time.sleep, rng=TopOfTheWindow()
    )
    return counter, supervisor, time


class TopOfTheWindow(random.Random):
    """Draws every jittered delay at its ceiling, so restarts land on whole seconds."""

    def uniform(self, a: float, b: float) -> float:
        return b


async def test_a_task_that_raises_is_logged_counted_and_restarted_with_backoff(
    logs: io.StringIO,
) -> None:
    """Three failures in a row: restarted 1, 2 and 4 virtual seconds later, each logged with
    its delay and counted under the task's name; not running while it waits."""
    registry = CollectorRegistry()
    _, supervisor, time = counted(registry)
    starts: list[float] = []
    forever = asyncio.Event()

    async def flaky() -> None:
        starts.append(time.now)
        if len(starts) <= 3:
            raise RuntimeError(f"failure {len(starts)}")
        await forever.wait()

    supervisor.start("flaky", flaky, Stage.SOURCES)
    assert registry.get_sample_value(RESTARTS, {"task": "flaky"}) == 0.0
    await time.settle()
    assert not supervisor.running("flaky")  # waiting for its restart
    await time.run_until(lambda: len(starts) == 4, limit=10)
    assert supervisor.running("flaky")
    t0 = starts[0]
    assert [s - t0 for s in starts] == [0.0, 1.0, 3.0, 7.0]
    assert registry.get_sample_value(RESTARTS, {"task": "flaky"}) == 3.0
    failed = [e for e in events(logs) if e["event"] == "background_task_failed"]
    assert [e["restart_in_seconds"] for e in failed] == [1.0, 2.0, 4.0]
    assert all(e["task"] == "flaky" and "RuntimeError" in e["exception"] for e in failed)
    assert failed[0]["error"] == "RuntimeError('failure 1')"
    await supervisor.stop()
    assert not supervisor.running("flaky")


async def test_a_task_that_ran_a_while_before_failing_restarts_after_the_first_delay() -> None:
    """After a minute of running, a failure counts as the first in a row again."""
    registry = CollectorRegistry()
    _, supervisor, time = counted(registry)
    starts: list[float] = []

    async def fails_at_once_then_after_a_minute() -> None:
        starts.append(time.now)
        if len(starts) < 3:
            raise RuntimeError("at once")
        if len(starts) == 3:
            await time.sleep(60)
            raise RuntimeError("after a minute")
        await asyncio.Event().wait()

    supervisor.start("task", fails_at_once_then_after_a_minute, Stage.OUTPUT)
    await time.run_until(lambda: len(starts) == 4, limit=100)
    t0 = starts[0]
    assert [s - t0 for s in starts] == [0.0, 1.0, 3.0, 64.0]  # 1, 2, then 60 s of work + 1
    await supervisor.stop()


async def test_a_task_that_returns_is_done_and_not_restarted() -> None:
    """One-off work (the exposition's first precompression) ends without being counted."""
    registry = CollectorRegistry()
    _, supervisor, time = counted(registry)
    runs: list[int] = []

    async def once() -> None:
        runs.append(1)

    supervisor.start("once", once, Stage.OUTPUT)
    await time.settle()
    assert runs == [1]
    assert supervisor.names() == []
    assert registry.get_sample_value(RESTARTS, {"task": "once"}) == 0.0


async def test_tasks_stop_stage_by_stage_in_start_order_and_none_starts_afterwards(
    logs: io.StringIO,
) -> None:
    """Control, then sources, then polling (with its drain after it), then output; a task
    of one stage stops only once those before it have ended."""
    supervisor = Supervisor()
    order: list[str] = []

    def task(name: str) -> Any:
        async def work() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                order.append(name)

        return work

    async def drain() -> None:
        order.append("poller-drained")

    supervisor.start("state-writer", task("state-writer"), Stage.OUTPUT)
    supervisor.start("poller", task("poller"), Stage.POLLING, after=drain)
    supervisor.start("directory-watcher", task("directory-watcher"), Stage.SOURCES)
    supervisor.start("config-reloader", task("config-reloader"), Stage.CONTROL)
    supervisor.start("notifications", task("notifications"), Stage.SOURCES)
    supervisor.start("exposition-rebuilder", task("exposition-rebuilder"), Stage.OUTPUT)
    await asyncio.sleep(0)
    await supervisor.stop()
    expected = [
        "config-reloader",
        "directory-watcher",
        "notifications",
        "poller",
        "poller-drained",
        "state-writer",
        "exposition-rebuilder",
    ]
    assert order == expected
    stopped = [e["task"] for e in events(logs) if e["event"] == "background_task_stopped"]
    assert stopped == [name for name in expected if name != "poller-drained"]
    supervisor.start("late", task("late"), Stage.SOURCES)
    assert supervisor.names() == []


async def test_two_quick_replacements_start_only_the_newest_after_the_old_task_ended() -> None:
    """Replace A by B, then at once by C: the old task ends first, then C alone starts."""
    supervisor = Supervisor()
    log: list[str] = []

    def watcher(name: str) -> Any:
        async def work() -> None:
            log.append(f"{name} started")
            try:
                await asyncio.Event().wait()
            finally:
                log.append(f"{name} ended")

        return work

    def start(name: str) -> Any:
        return lambda: supervisor.start("watcher", watcher(name), Stage.SOURCES)

    start("a")()
    await asyncio.sleep(0)
    supervisor.replace("watcher", start("b"))
    supervisor.replace("watcher", start("c"))
    await wait_for(_true(lambda: "c started" in log))
    await asyncio.sleep(0)
    assert log == ["a started", "a ended", "c started"]
    assert supervisor.names() == ["watcher"]
    await supervisor.stop()


def _true(predicate: Any) -> Any:
    async def condition() -> bool:
        return bool(predicate())

    return condition


async def test_an_exporter_stops_listeners_then_sources_then_polls_then_the_state(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory, tmp_path: Path
) -> None:
    """A built exporter with every kind of task (reloader, watcher, poller, state writer)
    logs its shutdown in the documented order (RELIABILITY.md)."""
    sim, url = await start_simulator()
    sim.add_upload("up-1", [("INPROGRESS", 0)])
    (tmp_path / "ids").mkdir()
    config = fast_config(
        url,
        ["up-1"],
        ingestions={"directory": str(tmp_path / "ids")},
        state={"path": str(tmp_path / "state.db")},
    )
    config_file = tmp_path / "config.yaml"
    config_file.write_text("{}")
    running = await start_exporter(config, config_path=config_file)
    await wait_for(running.status_is("up-1", "INPROGRESS"))
    await running.stop()
    names = [
        e["task"] if e["event"] == "background_task_stopped" else e["event"]
        for e in events(running.logs)
        if e["event"]
        in {"shutting_down", "admin_api_stopped", "background_task_stopped", "exporter_stopped"}
    ]
    assert names == [
        "shutting_down",
        "admin_api_stopped",
        "config-reloader",
        "loop-lag",
        "directory-watcher",
        "poller",
        "state-writer",
        "exposition-rebuilder",
        "exporter_stopped",
    ], names


async def test_in_process_exporters_run_with_the_production_process_settings(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """While it runs, what start-up built is frozen out of the GC and the switch interval is
    production's; a stop gives the test process its own settings back."""
    _, url = await start_simulator()
    before = sys.getswitchinterval()
    running = await start_exporter(fast_config(url, []))
    assert sys.getswitchinterval() == SWITCH_INTERVAL_SECONDS
    assert gc.get_freeze_count() > 0
    assert gc.isenabled()
    await running.stop()
    assert sys.getswitchinterval() == before
    assert gc.get_freeze_count() == 0
