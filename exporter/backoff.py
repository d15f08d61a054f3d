"""The wait before a retry: exponential backoff with "equal jitter", for every retry loop.

The poller's failed uploads, the SQS receive loop, the report link polls and the supervisor's
task restarts all wait through `backoff_delay`, each with its own base, cap and random
generator (a seeded one in tests, so a schedule can be replayed in virtual time).
"""

from __future__ import annotations

import random

__all__ = ["backoff_delay"]

#: Past this many doublings the ceiling is the cap anyway; it keeps 2**n a small float.
_MAX_DOUBLINGS = 30


def backoff_delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    rng: random.Random,
    retry_after: float | None = None,
) -> float:
    """Seconds to wait before retry number `attempt` (1 for the first retry).

    The ceiling is `base * 2**(attempt - 1)`, at most `cap`, and the wait is drawn uniformly
    from its upper half, `[ceiling / 2, ceiling]`: "equal jitter". Why that policy: it never
    retries at once (full jitter, `[0, ceiling]`, may draw ~0 at any attempt, a hot loop
    against a dependency that is down, the SQS loop's worry), the least wait still doubles
    with each failure, and the spread over half the window is enough to keep uploads that
    failed together (an API outage) from retrying together. A server's Retry-After is a
    floor, honoured up to `cap`: a date in 2099 must not park anything.
    """
    ceiling = min(cap, base * 2.0 ** min(max(attempt - 1, 0), _MAX_DOUBLINGS))
    delay = ceiling * rng.uniform(0.5, 1.0)
    if retry_after is None:
        return delay
    return max(delay, min(retry_after, cap))
