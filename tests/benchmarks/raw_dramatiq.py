"""Baseline: a bare Dramatiq worker process with a no-op actor, same threads and consumer wait.

Run as `python -m tests.benchmarks.raw_dramatiq NAMESPACE THREADS WAIT_MS`; it prints `ready`
and runs until SIGTERM. The actor counts messages and, when given a send time, records latency.
"""

from __future__ import annotations

import signal
import sys
import threading
import time

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from tests.support import REDIS_URL


def make_broker(namespace: str) -> RedisBroker:
    return RedisBroker(url=REDIS_URL, namespace=namespace, middleware=[])


def declare(broker: RedisBroker, namespace: str) -> dramatiq.Actor:
    client = redis.Redis.from_url(REDIS_URL)

    def noop(sent_at: float) -> None:
        if sent_at:
            client.rpush(f"{namespace}:latency", time.time() - sent_at)
        client.incr(f"{namespace}:done")

    return dramatiq.actor(noop, actor_name="noop", broker=broker, queue_name="default")


def main(namespace: str, threads: int, wait_ms: int) -> None:
    broker = make_broker(namespace)
    declare(broker, namespace)
    worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=wait_ms)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    worker.start()
    print("ready", flush=True)
    stop.wait()
    worker.stop()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
