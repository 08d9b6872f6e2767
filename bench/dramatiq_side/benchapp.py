"""The Dramatiq side of the benchmarks: ``dramatiq benchapp -p 2 -t 8 -Q <queue>``.

Runs in the benchmark's own Dramatiq venv (bench/.dramatiq-venv). Configured from the
environment by bench/throughput.py and bench/latency.py (BENCH_BROKER_URL: redis:// or
amqp://, BENCH_QUEUE, BENCH_RESULT_URL: a Redis URL for Dramatiq's Results
middleware). Everything else is Dramatiq's default (8 threads per process, its default
prefetch, its default middleware: retries, time limit, age limit, ...). Dramatiq acks
after the actor ran (like acks_late).

The actors are wrapped so that the shared producer and round-trip scripts call them as
``add.delay(x, y)`` and ``rt_add.delay(x, y).get(timeout=...)``.
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq
from benchcounter import count, tick

BROKER_URL = os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/14")
QUEUE = os.environ.get("BENCH_QUEUE", "bench")
RESULT_URL = os.environ.get("BENCH_RESULT_URL") or None

if BROKER_URL.startswith("amqp"):
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker: Any = RabbitmqBroker(url=BROKER_URL)
else:
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=BROKER_URL)
if RESULT_URL:
    from dramatiq.results import Results
    from dramatiq.results.backends.redis import RedisBackend

    broker.add_middleware(Results(backend=RedisBackend(url=RESULT_URL)))
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name="bench.add", queue_name=QUEUE)
def _add(x: int, y: int) -> int:
    count()
    return x + y


@dramatiq.actor(actor_name="bench.noop", queue_name=QUEUE)
def _noop(x: int, y: int) -> None:
    tick()


@dramatiq.actor(actor_name="bench.rt_add", queue_name=QUEUE,
                **({"store_results": True} if RESULT_URL else {}))
def _rt_add(x: int, y: int) -> int:
    return x + y


class _Sent:
    def __init__(self, message: Any) -> None:
        self.message = message

    def get(self, timeout: float = 30) -> Any:
        return self.message.get_result(block=True, timeout=int(timeout * 1000))


class _Caller:
    """``actor.delay(...)`` as the shared scripts call it (Dramatiq's ``send``)."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def delay(self, *args: Any) -> _Sent:
        return _Sent(self.actor.send(*args))


add, noop, rt_add = _Caller(_add), _Caller(_noop), _Caller(_rt_add)
