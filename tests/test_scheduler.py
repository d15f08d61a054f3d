"""The poller's schedule in virtual time: jitter, backoff, Retry-After, lag, terminal uploads.

A fake client answers at once and notes when it was asked; the clock, sleep and rng are
injected, so every gap is checked exactly and a minute of polling takes milliseconds.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncIterator, Callable, Iterable

import pytest
from prometheus_client import CollectorRegistry

from exporter.config import PollingConfig
from exporter.metrics import ExporterMetrics, UploadMetrics
from exporter.models import ErrorKind, PollError, PollOutcome, StatusReport
from exporter.ratelimit import AdaptiveRateLimiter
from exporter.scheduler import CREDENTIALS_RETRY_SECONDS, Poller
from exporter.supervisor import Supervisor
from exporter.uploads import UploadStore
from tests.conftest import supervise_poller
from tests.virtual_time import VirtualTime

Answer = Callable[[str, int], PollOutcome]


def status(value: str) -> StatusReport:
    return StatusReport(value, report_available=False, raw=value)


class FakeClient:
    """Answers from `answer(ingestion_id, nth_call)` at once; records (time, id) per call."""

    def __init__(self, time: VirtualTime, answer: Answer) -> None:
        self._time = time
        self._answer = answer
        self.calls: list[tuple[float, str]] = []
        self.on_call: Callable[[], None] = lambda: None

    async def fetch_status(self, ingestion_id: str) -> PollOutcome:
        self.calls.append((self._time.now, ingestion_id))
        self.on_call()
        return self._answer(ingestion_id, self.count(ingestion_id))

    def count(self, ingestion_id: str) -> int:
        return sum(1 for _, i in self.calls if i == ingestion_id)

    def times(self, ingestion_id: str) -> list[float]:
        return [t for t, i in self.calls if i == ingestion_id]


class Harness:
    """A Poller over a fresh store and registry, driven by virtual time and a seeded rng."""

    def __init__(self) -> None:
        self.time = VirtualTime()
        self.supervisors: list[Supervisor] = []

    def start(
        self,
        ids: Iterable[str],
        answer: Answer,
        *,
        max_rate: float = 1000.0,
        seed: int = 7,
        **polling: float,
    ) -> tuple[Poller, FakeClient]:
        settings = PollingConfig(**polling)
        store = UploadStore(clock=self.time.clock)
        for ingestion_id in ids:
            store.add(ingestion_id, "config", {})
        client = FakeClient(self.time, answer)
        limiter = AdaptiveRateLimiter(
            max_rate,
            max_pause_seconds=settings.max_backoff_seconds,
            clock=self.time.clock,
            sleep=self.time.sleep,
        )
        registry = CollectorRegistry()
        poller = Poller(
            store=store,
            client=client,  # type: ignore[arg-type]
            limiter=limiter,
            settings=settings,
            max_concurrency=8,
            metrics=ExporterMetrics(registry, rate_limit=lambda: limiter.rate, poll_lag=lambda: 0),
            upload_metrics=UploadMetrics(registry),
            clock=self.time.clock,
            sleep=self.time.sleep,
            rng=random.Random(seed),
        )
        self.supervisors.append(supervise_poller(poller, grace_seconds=0))
        return poller, client


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    """A harness whose pollers are stopped after the test."""
    h = Harness()
    yield h
    for supervisor in h.supervisors:
        await supervisor.stop()


def always(outcome: PollOutcome) -> Answer:
    return lambda ingestion_id, n: outcome


async def test_jitter_only_shortens_the_interval(harness: Harness) -> None:
    """Every gap lies in [interval * (1 - jitter), interval], and the jitter uses that range."""
    _, client = harness.start(
        ["up-1"], always(status("INPROGRESS")), interval_seconds=0.4, jitter_ratio=0.5
    )
    await harness.time.run_until(lambda: client.count("up-1") >= 50, limit=60)
    gaps = [b - a for a, b in itertools.pairwise(client.times("up-1"))]
    assert all(0.2 <= g <= 0.4 for g in gaps), gaps
    assert min(gaps) < 0.22 and max(gaps) > 0.38  # spread over the range, not one value


async def test_first_polls_are_spread_over_the_first_second(harness: Harness) -> None:
    """New uploads are first polled at random within min(1 s, interval), not all at once."""
    ids = [f"up-{n}" for n in range(20)]
    _, client = harness.start(ids, always(status("INPROGRESS")), interval_seconds=60)
    start = harness.time.now
    await harness.time.run_until(lambda: len(client.calls) >= 20, limit=5)
    firsts = [client.times(i)[0] - start for i in ids]
    assert all(0.0 <= t <= 1.0 for t in firsts)
    assert len(set(firsts)) == 20


async def test_terminal_upload_is_not_polled_again(harness: Harness) -> None:
    """Once DONE, FATAL or CANCELLED an upload gets no more requests; a busy one goes on."""
    answers = {"done": "DONE", "fatal": "FATAL", "cancelled": "CANCELLED", "busy": "INPROGRESS"}
    _, client = harness.start(
        answers, lambda i, n: status(answers[i]), interval_seconds=0.2, jitter_ratio=0.1
    )
    await harness.time.advance(10.0)
    assert client.count("busy") >= 10.0 / 0.2 - 1
    assert {i: client.count(i) for i in ("done", "fatal", "cancelled")} == {
        "done": 1,
        "fatal": 1,
        "cancelled": 1,
    }


async def test_server_errors_back_off_exponentially_with_equal_jitter(harness: Harness) -> None:
    """The k-th retry comes in the upper half of min(max_backoff, initial * 2^(k-1)), far
    rarer than polls."""
    outage = PollError(ErrorKind.SERVER_ERROR, "boom", http_status=500)
    _, client = harness.start(
        ["up-1"],
        always(outage),
        interval_seconds=0.05,
        initial_backoff_seconds=0.1,
        max_backoff_seconds=5.0,
    )
    await harness.time.advance(60.0)
    gaps = [b - a for a, b in itertools.pairwise(client.times("up-1"))]
    ceilings = [min(5.0, 0.1 * 2.0**k) for k in range(len(gaps))]
    paired = list(zip(gaps, ceilings, strict=True))
    assert all(c / 2 <= g <= c for g, c in paired), paired
    # Without backoff: 1,200 requests in a minute (every 0.05 s). With it: a few dozen.
    assert 10 <= len(gaps) < 60


async def test_retry_after_holds_the_next_request_of_every_upload(harness: Harness) -> None:
    """After a 429 with Retry-After: 2, no request at all goes out for 2 s."""
    throttled = PollError(ErrorKind.THROTTLED, "slow down", http_status=429, retry_after=2.0)

    def answer(ingestion_id: str, n: int) -> PollOutcome:
        return throttled if (ingestion_id, n) == ("up-1", 1) else status("INPROGRESS")

    _, client = harness.start(
        ["up-1", "up-2"], answer, interval_seconds=0.1, max_backoff_seconds=5.0
    )
    await harness.time.run_until(lambda: client.count("up-1") >= 2, limit=10)
    first = client.times("up-1")[0]
    after = [t for t, _ in client.calls if t > first]
    assert after and min(after) >= first + 2.0
    assert client.times("up-1")[1] >= first + 2.0


async def test_a_far_future_retry_after_is_honoured_only_up_to_max_backoff(
    harness: Harness,
) -> None:
    """A Retry-After of a year holds the upload for max_backoff_seconds, not a year."""
    throttled = PollError(ErrorKind.THROTTLED, "", http_status=429, retry_after=365 * 86400.0)

    def answer(ingestion_id: str, n: int) -> PollOutcome:
        return throttled if n == 1 else status("INPROGRESS")

    _, client = harness.start(["up-1"], answer, interval_seconds=0.1, max_backoff_seconds=3.0)
    await harness.time.run_until(lambda: client.count("up-1") >= 2, limit=60)
    first, second = client.times("up-1")[:2]
    assert second - first == pytest.approx(3.0)


async def test_invalid_id_is_retried_only_after_invalid_retry_seconds(harness: Harness) -> None:
    """A 400 invalid-id answer makes the next poll wait invalid_retry_seconds (less jitter)."""
    invalid = PollError(ErrorKind.INVALID_INGESTION_ID, "no such id", http_status=400)
    _, client = harness.start(
        ["nosuch"],
        always(invalid),
        interval_seconds=0.2,
        invalid_retry_seconds=60,
        jitter_ratio=0.1,
    )
    await harness.time.run_until(lambda: client.count("nosuch") >= 3, limit=200)
    gaps = [b - a for a, b in itertools.pairwise(client.times("nosuch"))]
    assert all(54.0 <= g <= 60.0 for g in gaps), gaps


async def test_a_poll_refused_for_want_of_credentials_is_retried_within_ten_seconds(
    harness: Harness,
) -> None:
    """No request was sent (a token file not mounted yet): the next try comes within
    CREDENTIALS_RETRY_SECONDS, not a whole interval, so credentials that appear are used
    soon; a 401 from the API itself still waits the interval."""
    unavailable = PollError(ErrorKind.UNAUTHORIZED, "token file cannot be read", logged=True)
    refused = PollError(ErrorKind.UNAUTHORIZED, "Unauthorized", http_status=401)
    _, client = harness.start(
        ["no-token", "refused"],
        lambda ingestion_id, n: unavailable if ingestion_id == "no-token" else refused,
        interval_seconds=60,
        jitter_ratio=0.1,
    )
    await harness.time.run_until(lambda: client.count("refused") >= 3, limit=200)
    fast = [b - a for a, b in itertools.pairwise(client.times("no-token"))]
    assert fast and all(9.0 <= g <= CREDENTIALS_RETRY_SECONDS for g in fast), fast
    slow = [b - a for a, b in itertools.pairwise(client.times("refused"))]
    assert all(54.0 <= g <= 60.0 for g in slow), slow


async def test_poll_lag_stays_zero_within_budget(harness: Harness) -> None:
    """When the rate budget suffices, the dispatcher wakes exactly when a poll is due: lag 0."""
    ids = [f"up-{n}" for n in range(20)]
    poller, client = harness.start(
        ids, always(status("INPROGRESS")), max_rate=1000, interval_seconds=0.2
    )
    lags: list[float] = []
    harness.time.on_tick = lambda: lags.append(poller.lag())
    await harness.time.advance(10.0)
    assert len(client.calls) >= 20 * 10 / 0.2 - 20
    assert lags and max(lags) == 0.0


async def test_poll_lag_climbs_when_the_budget_is_too_small(harness: Harness) -> None:
    """40 uploads every 0.2 s need 200 requests/s; at 10/s each waits ~4 s, and lag shows it."""
    ids = [f"up-{n}" for n in range(40)]
    poller, client = harness.start(
        ids, always(status("INPROGRESS")), max_rate=10, interval_seconds=0.2
    )
    await harness.time.advance(20.0)
    assert len(client.calls) == pytest.approx(10 * 20, abs=2)  # the limiter's pace, exactly
    assert 3.0 < poller.lag() <= 4.0
