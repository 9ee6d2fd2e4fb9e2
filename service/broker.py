"""Dramatiq broker setup: one place that knows Redis vs RabbitMQ and our middleware list.

Runs carry only their id. Dramatiq's own retries, time and age limits are left out of the
middleware on purpose: nbcron's attempts and timeouts (stored in Postgres) are the only ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import dramatiq
from dramatiq import Message
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware

from service.config import Settings
from service.errors import UnavailableError

ACTOR_NAME = "execute_run"


def middleware_list(extra: Iterable[Middleware] = ()) -> list[Middleware]:
    """The ordered middleware every nbcron broker runs (ours come last)."""
    return [*extra]


def make_broker(settings: Settings, *, extra: Iterable[Middleware] = ()) -> dramatiq.Broker:
    """A Redis or RabbitMQ broker for `settings.broker_url`."""
    url = settings.broker_url
    if not url:
        raise UnavailableError("NBCRON_BROKER_URL is not set (use `nbcron up` for an embedded one)")
    middleware = middleware_list(extra)
    if url.startswith(("amqp://", "amqps://")):
        return RabbitmqBroker(url=url, middleware=middleware)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisBroker(url=url, namespace=settings.broker_namespace, middleware=middleware)
    raise UnavailableError(f"NBCRON_BROKER_URL must be redis://… or amqp://…, got {url!r}")


def declare_execute_run(
    broker: dramatiq.Broker, handler: Callable[[int], None], queues: Iterable[str]
) -> dramatiq.Actor:
    """Register the execute_run actor and declare every queue this process consumes."""
    actor = dramatiq.actor(handler, actor_name=ACTOR_NAME, broker=broker, queue_name="default")
    for queue in queues:
        broker.declare_queue(queue)
    return actor


def send_run(broker: dramatiq.Broker, run_id: int, *, queue: str) -> None:
    """Put one run id on its queue (the queue is the task's, not the actor's default)."""
    message: Message = Message(
        queue_name=queue, actor_name=ACTOR_NAME, args=(run_id,), kwargs={}, options={}
    )
    broker.enqueue(message)
