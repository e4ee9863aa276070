"""The retry policy for a transient per-URL failure: how long the row waits before its next try.

Exponential, so a struggling site gets fewer requests the longer it struggles; jittered, so
the URLs that failed together do not all come back in the same instant; capped, so a row is
retried within hours rather than days; and never sooner than the site's own Retry-After.
"""

from __future__ import annotations

import random

MAX_BACKOFF_SECONDS = 6 * 3600


def backoff_seconds(
    attempt: int, base: float, *, retry_after: float | None = None, rng: random.Random | None = None
) -> float:
    """Exponential backoff with full jitter in [0.5, 1.5), never shorter than Retry-After."""
    jitter = (rng or random).uniform(0.5, 1.5)
    delay = min(base * (2 ** max(attempt - 1, 0)) * jitter, MAX_BACKOFF_SECONDS)
    return max(delay, retry_after or 0.0)
