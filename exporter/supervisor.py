"""The one owner of the exporter's background work: starts, restarts and stops every task.

No background task is fire-and-forget. Each runs under a `Supervisor`, which
- restarts one that raises, after the exporter's one backoff (`backoff.backoff_delay`: from
  1 s, doubling up to 60 s, equal jitter; reset once it has run a minute), and logs
  (`background_task_failed`) and counts it (`catalog_exporter_background_task_restarts_total`);
- serialises replacements (`replace`): a reload that rebuilds a task from a new config waits
  for the old task's end, and of reloads in quick succession only the newest is started;
- stops everything in the order of `Stage` (RELIABILITY.md, "Shutdown"): what reconfigures
  first, then what brings in ids, then the poller, then what writes out.
It knows nothing of what the tasks do; the clock, the sleep and the random source are
injected for tests.
"""

from __future__ import annotations

import asyncio
import enum
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client import Counter

from exporter.backoff import backoff_delay

log = structlog.get_logger("exporter.supervisor")

Work = Callable[[], Coroutine[Any, Any, None]]

#: The first restart's delay; it doubles with each failure in a row, up to the maximum.
INITIAL_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 60.0


class Stage(enum.IntEnum):
    """When a task stops at shutdown: lower stages first, tasks of a stage in start order."""

    #: The config reloader, replacements under way, the loop lag tick: nothing reconfigures
    #: the exporter while it stops.
    CONTROL = 0
    #: The directory watcher and the SQS receiver: no new ids once they have stopped.
    SOURCES = 1
    #: The poller's dispatcher; then the polls in flight get `api.timeout_seconds` to end.
    POLLING = 2
    #: The state writer (it commits what is left when stopped) and the exposition's rebuilds.
    OUTPUT = 3


@dataclass(slots=True)
class _Job:
    name: str
    work: Work
    stage: Stage
    restart: bool
    after: Callable[[], Awaitable[None]] | None
    task: asyncio.Task[None] | None = None
    up: bool = True


class Supervisor:
    """Runs named background tasks; see the module's docstring."""

    def __init__(
        self,
        *,
        restarts: Counter | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        initial_backoff: float = INITIAL_BACKOFF_SECONDS,
        max_backoff: float = MAX_BACKOFF_SECONDS,
        rng: random.Random | None = None,
    ) -> None:
        self._restarts = restarts
        self._clock = clock
        self._sleep = sleep
        self._initial = initial_backoff
        self._max = max_backoff
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._jobs: dict[str, _Job] = {}
        # The start function each pending replacement (by task name) will call: the newest.
        self._wanted: dict[str, Callable[[], None]] = {}
        self._stopping = False

    def start(
        self,
        name: str,
        work: Work,
        stage: Stage,
        *,
        restart: bool = True,
        after: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Run `work()` as task `name` until it returns or is stopped; when it raises it is
        restarted (with `restart`) after a backoff. `after` is awaited once the task has
        stopped at shutdown (the poller's grace period). Nothing starts once `stop` began."""
        if self._stopping:
            log.debug("background_task_not_started", task=name, reason="stopping")
            return
        if name in self._jobs:
            raise ValueError(f"background task {name!r} is already running")
        job = _Job(name, work, stage, restart, after)
        if self._restarts is not None and restart:
            self._restarts.labels(name)  # the series exists from the start, at 0
        self._jobs[name] = job
        job.task = asyncio.create_task(self._keep_running(job), name=name)

    def replace(self, name: str, start: Callable[[], None]) -> None:
        """Stop task `name` (if running), then call `start()`, which may start it anew.

        Replacements in quick succession share one task (`<name>-restart`): it waits for the
        old task's end and then calls the newest `start` only, so a reload never leaves a
        task of an older config running beside the newest one.
        """
        self._wanted[name] = start
        if f"{name}-restart" not in self._jobs:
            self.start(f"{name}-restart", lambda: self._replace(name), Stage.CONTROL, restart=False)

    async def _replace(self, name: str) -> None:
        while True:
            start = self._wanted[name]
            await self.stop_task(name)
            if start is self._wanted[name]:  # else another replace came meanwhile: again
                del self._wanted[name]
                self._jobs.pop(f"{name}-restart", None)  # done: `start` may replace again
                start()
                return

    def running(self, name: str) -> bool:
        """Whether task `name` runs its work now (not stopped, not waiting to restart)."""
        job = self._jobs.get(name)
        return job is not None and job.up

    def names(self) -> list[str]:
        """The tasks, in the order they will be stopped."""
        return [job.name for job in self._in_stop_order()]

    async def stop_task(self, name: str) -> None:
        """Cancel task `name` and wait for its end (nothing if it is not running)."""
        job = self._jobs.pop(name, None)
        if job is not None and job.task is not None:
            job.task.cancel()
            await asyncio.gather(job.task, return_exceptions=True)

    async def stop(self) -> None:
        """Stop every task, stage by stage (`Stage`), each after the one before has ended."""
        self._stopping = True
        for job in self._in_stop_order():
            await self.stop_task(job.name)
            if job.after is not None:
                await job.after()
            log.debug("background_task_stopped", task=job.name, stage=job.stage.name.lower())

    def _in_stop_order(self) -> list[_Job]:
        return sorted(self._jobs.values(), key=lambda job: job.stage)  # stable: start order

    async def _keep_running(self, job: _Job) -> None:
        failures = 0
        while True:
            started = self._clock()
            job.up = True
            try:
                await job.work()
            except asyncio.CancelledError:
                job.up = False
                raise
            except Exception as exc:  # whatever it was: logged, counted, restarted
                job.up = False
                if not job.restart:
                    log.error("background_task_failed", task=job.name, error=repr(exc))
                    break
                # A task that ran a while before failing starts again from the first delay.
                failures = 1 if self._clock() - started >= self._max else failures + 1
                delay = backoff_delay(failures, base=self._initial, cap=self._max, rng=self._rng)
                log.error(
                    "background_task_failed",
                    task=job.name,
                    error=repr(exc),
                    restart_in_seconds=delay,
                    exc_info=exc,
                )
                if self._restarts is not None:
                    self._restarts.labels(job.name).inc()
                await self._sleep(delay)
                log.info("background_task_restarted", task=job.name, failures=failures)
                continue
            job.up = False
            break
        if self._jobs.get(job.name) is job:
            del self._jobs[job.name]
