"""The Combiner: calls from many threads share batches, each caller gets its own result."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from service.batching import Combiner


def test_a_lone_call_is_served_at_once_on_its_own_thread() -> None:
    threads: list[str] = []

    def serve(items: Sequence[int]) -> list[int]:
        threads.append(threading.current_thread().name)
        return [i * 2 for i in items]

    assert Combiner(serve)(21) == 42
    assert threads == [threading.current_thread().name]


def test_concurrent_calls_share_batches_and_get_their_own_results() -> None:
    batches: list[list[int]] = []
    gate = threading.Event()

    def serve(items: Sequence[int]) -> list[int]:
        batches.append(list(items))
        gate.wait(5)  # hold the first batch so the other calls queue behind it
        return [i + 1000 for i in items]

    combiner: Combiner[int, int] = Combiner(serve)
    results: dict[int, int] = {}

    def call(i: int) -> None:
        results[i] = combiner(i)

    workers = [threading.Thread(target=call, args=(i,)) for i in range(20)]
    for w in workers:
        w.start()
    time.sleep(0.2)
    gate.set()
    for w in workers:
        w.join(10)
    assert results == {i: i + 1000 for i in range(20)}
    assert sorted(i for b in batches for i in b) == list(range(20))  # each served exactly once
    assert len(batches) < 20  # the calls queued behind the first batch were combined
    assert max(len(b) for b in batches) > 1


def test_max_batch_bounds_a_batch() -> None:
    batches: list[int] = []
    gate = threading.Event()

    def serve(items: Sequence[int]) -> list[int]:
        batches.append(len(items))
        gate.wait(5)
        return list(items)

    combiner: Combiner[int, int] = Combiner(serve, max_batch=3)
    workers = [threading.Thread(target=combiner, args=(i,)) for i in range(10)]
    for w in workers:
        w.start()
    time.sleep(0.2)
    gate.set()
    for w in workers:
        w.join(10)
    assert sum(batches) == 10 and max(batches) <= 3


def test_an_error_reaches_every_caller_of_the_batch_and_the_next_batch_still_runs() -> None:
    fail = {"on": True}

    def serve(items: Sequence[int]) -> list[int]:
        if fail["on"]:
            raise ConnectionError("database away")
        return list(items)

    combiner: Combiner[int, int] = Combiner(serve)
    with pytest.raises(ConnectionError):
        combiner(1)
    fail["on"] = False
    assert combiner(2) == 2  # the lead was released after the failure


def test_a_wrong_number_of_results_is_an_error_not_a_mismatch() -> None:
    combiner: Combiner[int, int] = Combiner(lambda items: [])
    with pytest.raises(RuntimeError, match="0 results for 1 calls"):
        combiner(1)
