"""Per-key rate limiting: a token bucket per API key, answered with 429 and Retry-After.

Each key may make `per_minute` requests in a burst and then `per_minute / 60` per second. The
buckets live in the API process (one bucket per key and process): the limit protects the
process and the database from a runaway client; it is not an accounting system. With several
API processes (`api_workers`, or several `nbcron api` behind a balancer) each keeps its own
buckets, so a key spreading its connections may make up to that many times `per_minute`.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from service.errors import NbcronError


class RateLimitedError(NbcronError):
    """Too many requests from one key; `retry_after` says how many seconds to wait."""

    status_code = 429
    title = "Too many requests"

    def __init__(self, detail: str, *, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after
        self.headers = {"Retry-After": str(retry_after)}


class RateLimiter:
    """Token buckets keyed by caller; `per_minute <= 0` turns limiting off."""

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.clock = clock
        self._buckets: dict[object, tuple[float, float]] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def check(self, who: object) -> None:
        """Take one request from `who`'s bucket, or raise RateLimitedError with Retry-After."""
        if not self.enabled:
            return
        wait = self._take(who)
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            raise RateLimitedError(
                f"rate limit of {int(self.capacity)} requests per minute reached for this key;"
                f" retry in {seconds} s",
                retry_after=seconds,
            )

    def _take(self, who: object) -> float:
        """Seconds to wait before a token is free (0 when one was taken)."""
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.get(who, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[who] = (tokens - 1.0, now)
                return 0.0
            self._buckets[who] = (tokens, now)
            return (1.0 - tokens) / self.rate
