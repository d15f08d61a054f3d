"""How late the event loop runs what is due: a periodic tick that records its own lateness.

Anything that holds the loop (a long render, a synchronous write, a big JSON encode) delays
every request the exporter serves, /healthz included, and can get a sidecar killed by its
liveness probe. The tick measures that delay from inside the loop; it never acts on it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

#: Seconds between ticks: often enough to catch a stall of a few hundred ms, cheap enough
#: (four wake-ups a second) to leave on.
TICK_SECONDS = 0.25


async def measure_loop_lag(
    observe: Callable[[float], None],
    *,
    interval: float = TICK_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Sleep `interval`, then `observe` how many seconds later than due the loop woke us;
    until cancelled."""
    while True:
        due = clock() + interval
        await sleep(interval)
        observe(max(0.0, clock() - due))
