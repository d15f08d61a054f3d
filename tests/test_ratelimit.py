"""The adaptive token bucket: pacing, slow-down on 429, Retry-After, recovery."""

from __future__ import annotations

import asyncio

import pytest

from exporter.ratelimit import AdaptiveRateLimiter
from tests.virtual_time import VirtualTime


class FakeTime:
    """A clock whose sleep advances it: rate arithmetic without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def limiter(fake: FakeTime, max_rate: float, **kwargs: float) -> AdaptiveRateLimiter:
    return AdaptiveRateLimiter(max_rate, clock=fake.clock, sleep=fake.sleep, **kwargs)


async def test_acquire_paces_requests_at_the_configured_rate() -> None:
    """Eleven tokens at 5/s with a burst of 1 take two seconds."""
    fake = FakeTime()
    bucket = limiter(fake, 5.0)
    start = fake.now
    for _ in range(11):
        await bucket.acquire()
    assert fake.now - start == pytest.approx(2.0)


async def test_throttle_halves_the_rate_once_per_hold_window() -> None:
    """A burst of 429s in the same second counts as one decrease."""
    fake = FakeTime()
    bucket = limiter(fake, 8.0)
    bucket.on_throttled(None)
    bucket.on_throttled(None)
    assert bucket.rate == pytest.approx(4.0)
    fake.now += 1.0
    bucket.on_throttled(None)
    assert bucket.rate == pytest.approx((4.0 + 8.0 / 30.0) / 2)  # 1 s of recovery, then halved


async def test_rate_recovers_linearly_to_the_maximum() -> None:
    """After a 429 the rate climbs back to the ceiling within recovery_seconds."""
    fake = FakeTime()
    bucket = limiter(fake, 10.0, recovery_seconds=20.0)
    bucket.on_throttled(None)
    fake.now += 10.0
    assert bucket.rate == pytest.approx(10.0)
    assert limiter(fake, 10.0).rate == 10.0


async def test_rate_never_drops_below_the_floor() -> None:
    """Repeated 429s stop at min_rate instead of reaching zero."""
    fake = FakeTime()
    bucket = limiter(fake, 1.0, min_rate=0.1, recovery_seconds=1e9)
    for _ in range(20):
        fake.now += 1.0
        bucket.on_throttled(None)
    assert bucket.rate == pytest.approx(0.1)


async def test_retry_after_pauses_every_caller() -> None:
    """The next token is not handed out before Retry-After has passed."""
    fake = FakeTime()
    bucket = limiter(fake, 100.0)
    await bucket.acquire()
    throttled_at = fake.now
    bucket.on_throttled(7.0)
    await bucket.acquire()
    assert fake.now - throttled_at >= 7.0


async def test_lower_max_rate_from_a_reload_applies_at_once() -> None:
    """set_max_rate caps the current rate immediately."""
    fake = FakeTime()
    bucket = limiter(fake, 10.0)
    bucket.set_max_rate(2.0)
    assert bucket.rate == 2.0
    start = fake.now
    for _ in range(5):
        await bucket.acquire()
    assert fake.now - start == pytest.approx(2.0)


async def test_a_high_rate_allows_a_burst_of_a_tenth_of_a_second() -> None:
    """At 1,000/s, 100 tokens go without waiting: pacing costs no timer per request."""
    fake = FakeTime()
    bucket = limiter(fake, 1000.0)
    start = fake.now
    for _ in range(100):
        await bucket.acquire()
    assert fake.now == start
    await bucket.acquire()
    assert fake.now - start == pytest.approx(0.001)


async def test_a_raised_limit_from_a_reload_applies_at_once() -> None:
    """Raising the ceiling with no recent 429 takes effect immediately, not over 30 s."""
    fake = FakeTime()
    bucket = limiter(fake, 10.0)
    bucket.set_max_rate(50.0)
    assert bucket.rate == 50.0


async def test_a_raised_limit_right_after_a_429_is_still_climbed_to() -> None:
    """While recovering from throttling, a higher ceiling does not reset the slow-down."""
    fake = FakeTime()
    bucket = limiter(fake, 10.0)
    bucket.on_throttled(None)
    bucket.set_max_rate(50.0)
    assert bucket.rate == pytest.approx(5.0)


async def test_a_far_future_retry_after_pauses_no_longer_than_max_pause() -> None:
    """Retry-After of a year pauses everyone only for max_pause_seconds (max_backoff)."""
    fake = FakeTime()
    bucket = limiter(fake, 100.0, max_pause_seconds=30.0)
    await bucket.acquire()
    throttled_at = fake.now
    bucket.on_throttled(365 * 86400.0)
    await bucket.acquire()
    assert fake.now - throttled_at == pytest.approx(30.0)


async def test_a_lower_max_pause_from_a_reload_cuts_a_pause_in_force() -> None:
    """set_max_pause shortens a pause already running, so a reload can un-park polling."""
    fake = FakeTime()
    bucket = limiter(fake, 100.0, max_pause_seconds=600.0)
    bucket.on_throttled(600.0)
    throttled_at = fake.now
    bucket.set_max_pause(5.0)
    await bucket.acquire()
    assert fake.now - throttled_at == pytest.approx(5.0)


async def test_a_partly_refilled_bucket_waits_for_the_rest_of_the_token() -> None:
    """At 5/s, a caller 0.1 s after the last token waits the other 0.1 s, not nothing."""
    fake = FakeTime()
    bucket = limiter(fake, 5.0)
    await bucket.acquire()  # the burst of one
    fake.now += 0.1
    before = fake.now
    await bucket.acquire()
    assert fake.now - before == pytest.approx(0.1)


async def test_a_priority_caller_is_served_before_polls_already_waiting() -> None:
    """Polls queued first still wait: the app's call through the proxy takes the next token."""
    time = VirtualTime()
    bucket = AdaptiveRateLimiter(1.0, clock=time.clock, sleep=time.sleep)
    await bucket.acquire()  # the burst of one is spent
    served: list[str] = []

    async def take(name: str, *, priority: bool = False) -> None:
        await bucket.acquire(priority=priority)
        served.append(name)

    polls = [asyncio.create_task(take(f"poll-{i}")) for i in range(3)]
    await time.settle()
    upload = asyncio.create_task(take("upload", priority=True))
    await time.run_until(lambda: len(served) == 4, limit=10)
    await asyncio.gather(upload, *polls)
    assert served == ["upload", "poll-0", "poll-1", "poll-2"]
    assert time.now == pytest.approx(1004.0)  # one token a second, shared by both lanes


async def test_a_cancelled_priority_caller_lets_the_polls_go_on() -> None:
    """A proxied request that gives up (its client left) does not block the poll lane."""
    time = VirtualTime()
    bucket = AdaptiveRateLimiter(1.0, clock=time.clock, sleep=time.sleep)
    await bucket.acquire()
    poll = asyncio.create_task(bucket.acquire())
    await time.settle()
    upload = asyncio.create_task(bucket.acquire(priority=True))
    await time.settle()
    upload.cancel()
    await time.run_until(poll.done, limit=5)
    assert time.now == pytest.approx(1001.0)
