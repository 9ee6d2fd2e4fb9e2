"""Rules about what follows a run: retry attempts with capped, jittered exponential backoff."""

from __future__ import annotations

import random

RETRY_CAP_SECONDS = 3600.0
RETRY_JITTER = 0.1
RETRYABLE = frozenset({"failed", "timed_out"})


def backoff_seconds(base: float, attempt: int, *, cap: float = RETRY_CAP_SECONDS) -> float:
    """Delay before attempt `attempt + 1`: base * 2^(attempt-1), capped, with ±10% jitter."""
    delay = min(cap, base * (2 ** max(0, attempt - 1)))
    return max(0.0, delay * (1 + random.uniform(-RETRY_JITTER, RETRY_JITTER)))


def retry_delay(*, status: str, attempt: int, max_retries: int, base: float) -> float | None:
    """Seconds until the next attempt, or None when no attempt follows."""
    if status not in RETRYABLE or attempt > max_retries:
        return None
    return backoff_seconds(base, attempt)
