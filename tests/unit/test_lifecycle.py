"""service.lifecycle: retry backoff and whether a run is followed by another attempt."""

from __future__ import annotations

import pytest

from service.lifecycle import RETRY_CAP_SECONDS, RETRY_JITTER, backoff_seconds, retry_delay


def within_jitter(value: float, expected: float) -> bool:
    return expected * (1 - RETRY_JITTER) <= value <= expected * (1 + RETRY_JITTER)


@pytest.mark.parametrize(("attempt", "expected"), [(1, 10), (2, 20), (3, 40), (4, 80), (6, 320)])
def test_backoff_grows_exponentially(attempt: int, expected: float) -> None:
    for _ in range(50):
        assert within_jitter(backoff_seconds(10, attempt), expected)


def test_backoff_is_capped() -> None:
    for attempt in (20, 50, 100):
        for _ in range(20):
            assert within_jitter(backoff_seconds(60, attempt), RETRY_CAP_SECONDS)
    assert within_jitter(backoff_seconds(10, 10, cap=100), 100)


def test_backoff_jitter_is_within_ten_percent_and_actually_varies() -> None:
    values = [backoff_seconds(100, 1) for _ in range(500)]
    assert all(90 <= v <= 110 for v in values)
    assert len(set(values)) > 100  # jittered, not a constant
    assert min(values) < 97 and max(values) > 103  # spreads over the band


def test_backoff_of_zero_base_is_zero() -> None:
    assert backoff_seconds(0, 5) == 0.0


@pytest.mark.parametrize("status", ["failed", "timed_out"])
def test_retry_delay_with_attempts_left(status: str) -> None:
    delay = retry_delay(status=status, attempt=1, max_retries=2, base=30)
    assert delay is not None and within_jitter(delay, 30)
    delay = retry_delay(status=status, attempt=2, max_retries=2, base=30)
    assert delay is not None and within_jitter(delay, 60)


@pytest.mark.parametrize("status", ["failed", "timed_out"])
def test_retry_delay_none_when_attempts_exhausted(status: str) -> None:
    # attempt counts from 1, so max_retries=2 allows attempts 1, 2 and 3.
    assert retry_delay(status=status, attempt=3, max_retries=2, base=30) is None
    assert retry_delay(status=status, attempt=1, max_retries=0, base=30) is None


@pytest.mark.parametrize("status", ["succeeded", "cancelled", "missed", "queued", "running"])
def test_retry_delay_none_for_other_statuses(status: str) -> None:
    assert retry_delay(status=status, attempt=1, max_retries=5, base=30) is None
