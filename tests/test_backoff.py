"""backoff_delay: the one retry wait of the poller, the SQS loop and the report command."""

from __future__ import annotations

import random

import pytest

from exporter.backoff import backoff_delay


class Fixed(random.Random):
    """A random source whose every draw is at one end of the range (0.0 low, 1.0 high)."""

    def __init__(self, at: float) -> None:
        super().__init__()
        self.at = at

    def random(self) -> float:
        return self.at


def test_the_ceiling_doubles_from_base_and_stops_at_the_cap() -> None:
    """With the draw at the top, the waits are base * 2^(attempt - 1), at most `cap`."""
    top = Fixed(1.0)
    waits = [backoff_delay(n, base=0.5, cap=5.0, rng=top) for n in range(1, 8)]
    assert waits == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_the_least_wait_is_half_the_ceiling() -> None:
    """Equal jitter: a draw at the bottom still waits half the ceiling, never 0."""
    bottom = Fixed(0.0)
    waits = [backoff_delay(n, base=1.0, cap=8.0, rng=bottom) for n in range(1, 6)]
    assert waits == [0.5, 1.0, 2.0, 4.0, 4.0]


def test_seeded_draws_spread_over_the_upper_half_of_the_ceiling() -> None:
    """Many seeded draws all lie in [ceiling / 2, ceiling] and cover most of it."""
    rng = random.Random(42)
    draws = [backoff_delay(3, base=1.0, cap=60.0, rng=rng) for _ in range(2000)]
    assert all(2.0 <= d <= 4.0 for d in draws)
    assert min(draws) < 2.05 and max(draws) > 3.95


def test_the_same_seed_gives_the_same_waits() -> None:
    """The random source is the caller's: a seed replays a schedule (virtual-time tests)."""
    first = [backoff_delay(n, base=0.1, cap=5.0, rng=random.Random(7)) for n in range(1, 20)]
    again = [backoff_delay(n, base=0.1, cap=5.0, rng=random.Random(7)) for n in range(1, 20)]
    assert first == again


def test_a_huge_attempt_number_is_the_cap_not_an_overflow() -> None:
    """Ten thousand failures in a row: 2**9999 would overflow a float; the wait is the cap."""
    assert backoff_delay(10_000, base=1.0, cap=300.0, rng=Fixed(1.0)) == 300.0


@pytest.mark.parametrize("attempt", [0, -3])
def test_an_attempt_below_one_waits_as_the_first(attempt: int) -> None:
    """No negative exponent: attempt 0 (or less) is treated as the first retry."""
    assert backoff_delay(attempt, base=2.0, cap=10.0, rng=Fixed(1.0)) == 2.0


def test_retry_after_is_a_floor_honoured_up_to_the_cap() -> None:
    """A Retry-After longer than the jittered wait is waited; one past the cap waits the cap;
    a shorter one does not shorten the backoff."""
    top = Fixed(1.0)
    assert backoff_delay(1, base=1.0, cap=10.0, rng=top, retry_after=3.0) == 3.0
    assert backoff_delay(1, base=1.0, cap=10.0, rng=top, retry_after=365 * 86400.0) == 10.0
    assert backoff_delay(4, base=1.0, cap=10.0, rng=top, retry_after=0.5) == 8.0
