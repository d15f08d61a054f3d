"""The client-side rate limit shared by every poll: an adaptive token bucket.

It owns pacing only; who is polled next is the scheduler's business. The rate is the
configured maximum until the API throttles us; each 429 cuts it (multiplicative decrease,
at most once per `decrease_hold_seconds` so one burst of 429s counts once) and honours
Retry-After by pausing everyone, for at most `max_pause_seconds` (`polling.max_backoff_seconds`:
a far-future date must not stop all polling); then it climbs back linearly (additive increase).

Two lanes share the one bucket: the app's own calls through the proxy take tokens in the
priority lane, ahead of every poll (an upload never waits behind a poll), and the polls take
theirs in arrival order from what the priority lane leaves.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable


class AdaptiveRateLimiter:
    """Token bucket whose rate reacts to throttling (AIMD)."""

    def __init__(
        self,
        max_rate: float,
        *,
        burst_seconds: float = 0.1,
        min_rate: float = 0.1,
        decrease_factor: float = 0.5,
        recovery_seconds: float = 30.0,
        decrease_hold_seconds: float = 1.0,
        max_pause_seconds: float = math.inf,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._max_rate = max_rate
        self._min_rate = min(min_rate, max_rate)
        self._burst_seconds = burst_seconds
        self._burst = self._burst_for(max_rate)
        self._decrease_factor = decrease_factor
        self._recovery_seconds = recovery_seconds
        self._decrease_hold = decrease_hold_seconds
        self._max_pause = max_pause_seconds
        now = clock()
        self._rate = max_rate
        self._tokens = self._burst
        self._updated = now
        self._paused_until = now
        self._last_decrease = -float("inf")
        self._lock = asyncio.Lock()
        self._priority_lock = asyncio.Lock()
        self._priority_waiting = 0
        self._priority_idle = asyncio.Event()
        self._priority_idle.set()

    @property
    def max_rate(self) -> float:
        """The configured ceiling, `api.max_requests_per_second`."""
        return self._max_rate

    @property
    def rate(self) -> float:
        """The rate in force now, in requests per second."""
        self._advance(self._clock())
        return self._rate

    def set_max_rate(self, max_rate: float) -> None:
        """Apply a reloaded limit at once; after a recent 429, a higher one is still climbed to."""
        now = self._clock()
        self._advance(now)
        raised = max_rate > self._max_rate
        self._max_rate = max_rate
        self._min_rate = min(self._min_rate, max_rate)
        if raised and now - self._last_decrease >= self._recovery_seconds:
            # Not recovering from a 429: a raised ceiling applies at once, as a reload promises.
            self._rate = max_rate
        self._rate = min(self._rate, max_rate)
        self._burst = self._burst_for(max_rate)

    def set_max_pause(self, seconds: float) -> None:
        """Apply a reloaded `polling.max_backoff_seconds`; a pause in force is cut to it."""
        now = self._clock()
        self._max_pause = seconds
        self._paused_until = min(self._paused_until, now + seconds)

    async def acquire(self, *, priority: bool = False) -> None:
        """Wait for a token; callers are served in arrival order within their lane.

        A `priority` caller (the app's call through the proxy) is served before any poll
        waiting: a poll about to take a token yields while a priority caller waits.
        """
        if not priority:
            async with self._lock:
                await self._take(yield_to_priority=True)
            return
        self._priority_waiting += 1
        self._priority_idle.clear()
        try:
            async with self._priority_lock:
                await self._take(yield_to_priority=False)
        finally:
            self._priority_waiting -= 1
            if self._priority_waiting == 0:
                self._priority_idle.set()

    async def _take(self, *, yield_to_priority: bool) -> None:
        while True:
            if yield_to_priority and self._priority_waiting:
                await self._priority_idle.wait()
                continue
            now = self._clock()
            self._advance(now)
            wait = self._paused_until - now
            if wait <= 0:
                # A hair below one token is one token: float rounding must not leave a
                # caller waiting for ever-smaller amounts of time.
                if self._tokens >= 1.0 - 1e-9:
                    self._tokens = max(0.0, self._tokens - 1.0)
                    return
                wait = (1.0 - self._tokens) / self._rate
            await self._sleep(wait)

    def on_throttled(self, retry_after: float | None) -> None:
        """The API answered 429: slow down, and pause everyone for Retry-After if given,
        but no longer than `max_pause_seconds`."""
        now = self._clock()
        self._advance(now)
        if now - self._last_decrease >= self._decrease_hold:
            self._rate = max(self._min_rate, self._rate * self._decrease_factor)
            self._last_decrease = now
        self._tokens = min(self._tokens, 0.0)
        if retry_after is not None:
            pause = min(retry_after, self._max_pause)
            self._paused_until = max(self._paused_until, now + pause)

    def _burst_for(self, max_rate: float) -> float:
        """Tokens that may be spent at once: 100 ms worth, at least one. At 5 requests/s that
        is one (evenly spaced requests); at 1,000/s, a hundred, so that pacing does not cost a
        timer per request."""
        return max(1.0, max_rate * self._burst_seconds)

    def _advance(self, now: float) -> None:
        elapsed = max(0.0, now - self._updated)
        self._updated = now
        if self._rate < self._max_rate:
            step = self._max_rate / self._recovery_seconds
            self._rate = min(self._max_rate, self._rate + step * elapsed)
        self._tokens = min(self._burst, self._tokens + elapsed * self._rate)


class RateShare:
    """A small slice of another limiter's budget, for callers that must never starve it.

    At most `fraction` of the limiter's rate in force (so it shrinks with the limiter after a
    429), a burst of one; each caller then also takes the limiter's own token, so the total
    never exceeds the limiter's and the rest of its budget stays with its other callers
    (however many wait here, they enter the limiter's queue one share-token at a time).
    """

    def __init__(
        self,
        limiter: AdaptiveRateLimiter,
        fraction: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not 0 < fraction <= 1:
            msg = f"fraction must be in (0, 1], got {fraction}"
            raise ValueError(msg)
        self._limiter = limiter
        self._fraction = fraction
        self._clock = clock
        self._sleep = sleep
        self._tokens = 1.0
        self._updated = clock()
        self._lock = asyncio.Lock()

    @property
    def rate(self) -> float:
        """The share's rate now, in requests per second."""
        return self._limiter.rate * self._fraction

    async def acquire(self) -> None:
        """Wait for a token of the share, then for one of the limiter."""
        async with self._lock:
            while True:
                now = self._clock()
                rate = self.rate
                elapsed = max(0.0, now - self._updated)
                self._updated = now
                self._tokens = min(1.0, self._tokens + elapsed * rate)
                if self._tokens >= 1.0 - 1e-9:
                    self._tokens = max(0.0, self._tokens - 1.0)
                    break
                await self._sleep((1.0 - self._tokens) / rate)
        await self._limiter.acquire()
