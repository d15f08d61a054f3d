"""Virtual time for the scheduler and the limiter: a clock, its sleep, and a driver.

Time moves only when the test says so, and then straight to the next sleeper's wake-up, so
schedules are checked exactly (no slack) and a minute of polling takes milliseconds.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable

import pytest

#: Loop steps that let every ready task run to its next wait before time moves. A poll with a
#: fake client takes a handful; extra steps cost microseconds and change nothing.
SETTLE_STEPS = 50


class VirtualTime:
    """A monotonic clock and the sleep that goes with it; `run_until` advances both."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        #: Called each time the clock moves, before anything woken runs: a probe of the state
        #: the sleepers wake up to (the poller's lag, say).
        self.on_tick: Callable[[], None] = lambda: None

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + max(0.0, seconds), next(self._seq), future))
        await future

    async def settle(self) -> None:
        """Let every task that can run do so, without moving time."""
        for _ in range(SETTLE_STEPS):
            await asyncio.sleep(0)

    async def run_until(self, condition: Callable[[], bool], *, limit: float) -> None:
        """Wake sleepers in time order until `condition()` holds; fail after `limit` seconds
        of virtual time, or when nothing sleeps and nothing can happen any more."""
        end = self.now + limit
        while True:
            await self.settle()
            if condition():
                return
            self._drop_cancelled()
            if not self._sleepers:
                pytest.fail(f"condition not met and nothing is waiting (t={self.now})")
            due = self._sleepers[0][0]
            if due > end:
                pytest.fail(f"condition not met within {limit} virtual seconds")
            self._wake(due)

    async def advance(self, seconds: float) -> None:
        """Let `seconds` of virtual time pass, waking every sleeper due in that time."""
        end = self.now + seconds
        while True:
            await self.settle()
            self._drop_cancelled()
            if not self._sleepers or self._sleepers[0][0] > end:
                break
            self._wake(self._sleepers[0][0])
        self.now = end
        await self.settle()

    def _wake(self, due: float) -> None:
        self.now = max(self.now, due)
        self.on_tick()
        while self._sleepers and self._sleepers[0][0] <= self.now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)

    def _drop_cancelled(self) -> None:
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)
