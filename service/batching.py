"""Combine calls made by many threads into batches, served by whichever caller comes first.

A worker process runs several runs at once, and each needs the same two statements (claim, finish).
`Combiner` lets those threads share statements: the first caller becomes the *leader* and serves
every call queued so far in one batch; calls arriving meanwhile wait, and the next of them leads the
following batch. There is no timer and no extra thread, so a lone call is served at once on its own
thread, and under load a batch holds whatever queued during the previous one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class _Call(Generic[In, Out]):
    __slots__ = ("done", "error", "item", "lead", "result")

    def __init__(self, item: In) -> None:
        self.item = item
        self.done = threading.Event()
        self.lead = False  # set with `done` when this caller must serve the next batch
        self.result: Out | None = None
        self.error: BaseException | None = None

    def outcome(self) -> Out:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


class Combiner(Generic[In, Out]):
    """`combiner(item)` returns `serve([…, item, …])`'s element for `item`.

    `serve` takes a batch of items and returns one result per item, in order. If it raises, every
    call of that batch raises the same error (callers retry on their own).
    """

    def __init__(self, serve: Callable[[Sequence[In]], Sequence[Out]], *, max_batch: int = 64):
        self._serve = serve
        self._max = max_batch
        self._lock = threading.Lock()
        self._pending: list[_Call[In, Out]] = []
        self._busy = False  # a leader is serving a batch

    def __call__(self, item: In) -> Out:
        call: _Call[In, Out] = _Call(item)
        with self._lock:
            self._pending.append(call)
            lead = not self._busy
            self._busy = True
        if not lead:
            call.done.wait()
            if not call.lead:
                return call.outcome()
        self._lead()
        return call.outcome()

    def _lead(self) -> None:
        """Serve one batch (it holds the leader's own call), then pass the lead on."""
        with self._lock:
            batch = self._pending[: self._max]
            del self._pending[: self._max]
        try:
            self._run(batch)
        finally:
            with self._lock:
                if self._pending:
                    successor = self._pending[0]
                    successor.lead = True
                    successor.done.set()
                else:
                    self._busy = False

    def _run(self, batch: list[_Call[In, Out]]) -> None:
        try:
            results = self._serve([c.item for c in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"served {len(results)} results for {len(batch)} calls")
        except BaseException as exc:  # every caller of the batch sees the error
            for call in batch:
                call.error = exc
                call.done.set()
            if not isinstance(exc, Exception):
                raise
            return
        for call, result in zip(batch, results, strict=True):
            call.result = result
            call.done.set()
