"""The per-key token bucket behind 429 + Retry-After."""

from __future__ import annotations

import pytest

from service.ratelimit import RateLimitedError, RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_refill_with_retry_after() -> None:
    clock = Clock()
    limiter = RateLimiter(6, clock=clock)  # 6 per minute: one every 10 s
    for _ in range(6):
        limiter.check("k1")
    with pytest.raises(RateLimitedError) as info:
        limiter.check("k1")
    assert info.value.status_code == 429
    assert info.value.retry_after == 10 and info.value.headers == {"Retry-After": "10"}
    clock.now += 4
    with pytest.raises(RateLimitedError) as again:
        limiter.check("k1")
    assert again.value.retry_after == 6
    clock.now += 6
    limiter.check("k1")


def test_keys_have_their_own_buckets() -> None:
    limiter = RateLimiter(1, clock=Clock())
    limiter.check("a")
    limiter.check("b")
    with pytest.raises(RateLimitedError):
        limiter.check("a")


def test_zero_turns_it_off() -> None:
    limiter = RateLimiter(0)
    assert not limiter.enabled
    for _ in range(1000):
        limiter.check("k")
