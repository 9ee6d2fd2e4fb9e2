"""The worker's shared claim statement: each run id goes to one caller, however it is batched."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, cast

from service.config import Settings
from service.store import Store
from service.worker import RunHandler, WorkerMonitor


class ClaimOnceStore:
    """Claims like the SQL does: a queued run once, then never again (stub for unit tests)."""

    def __init__(self, queued: set[int], gate: threading.Event | None = None) -> None:
        self.queued = queued
        self.gate = gate
        self.batches: list[list[int]] = []
        self._lock = threading.Lock()

    def claim_runs(self, run_ids: Sequence[int], *, worker: str) -> dict[int, dict[str, Any]]:
        if self.gate is not None:
            self.gate.wait(5)
        with self._lock:
            self.batches.append(list(run_ids))
            won = {i for i in run_ids if i in self.queued}
            self.queued -= won
        return {i: {"id": i, "worker": worker} for i in won}


def handler(store: ClaimOnceStore) -> RunHandler:
    monitor = cast(WorkerMonitor, SimpleNamespace(name="w1"))
    return RunHandler(cast(Store, store), monitor, Settings())


def test_a_run_id_twice_in_one_batch_is_claimed_for_its_first_caller_only() -> None:
    store = ClaimOnceStore({7, 8})
    results = handler(store)._claim_batch([7, 8, 7])
    assert [r and r["id"] for r in results] == [7, 8, None]


def test_two_deliveries_of_one_run_on_two_threads_execute_it_once() -> None:
    gate = threading.Event()
    store = ClaimOnceStore({1, 5}, gate)
    h = handler(store)
    got: dict[str, dict[str, Any] | None] = {}
    leader = threading.Thread(target=lambda: got.update(leader=h._claim(1)))
    leader.start()  # its batch waits at the gate, so the two deliveries of run 5 queue together
    while not h._claims._busy:
        pass
    twins = [threading.Thread(target=lambda n=n: got.update({n: h._claim(5)})) for n in "ab"]
    for t in twins:
        t.start()
    while len(h._claims._pending) < 2:
        pass
    gate.set()
    for t in [leader, *twins]:
        t.join(10)
    assert store.batches == [[1], [5, 5]]
    assert got["leader"] is not None
    assert sorted(got[n] is not None for n in "ab") == [False, True]
