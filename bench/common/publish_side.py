"""One side of bench/publish.py, in that side's own interpreter:

    python publish_side.py MODE WARMUP N      ->  {"seconds": ..., "n": N}

``MODE``:

- ``one``: ``add.delay(i, i)`` N times (``benchapp`` is the side's module: qops, Celery
  or Dramatiq, whose ``delay`` is its ``send``);
- ``bulk``: ``add.delay_many`` of N calls (qops);
- the floors, with the qops interpreter: the bare client sending the bytes qops sends
  for ``add(1, 1)`` (built once, by qops): ``lpush`` (redis-py, one LPUSH a message),
  ``lpush-pipe`` (redis-py, pipelined, 2000 a round trip), ``pika-confirm`` (pika's
  BlockingChannel in confirm mode: one confirm a message, mandatory, persistent -- qops's
  guarantee), ``pika`` (no confirms), ``sqlite`` (one transaction a message, the pragmas
  qops uses), ``sqlite-bulk`` (one executemany in one transaction),
  ``confirms-prebuilt`` (RabbitMQ's side of a confirmed bulk send: that message's
  frames, built once, written N times on qops's confirm channel and all confirmed).

Only the N measured sends are timed; the WARMUP before them open the connection, declare
the queue and warm the code paths.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import benchapp

QUEUE = os.environ.get("BENCH_QUEUE", "bench")
URL = os.environ.get("BENCH_BROKER_URL", "")


def timed(warmup: int, n: int, send: Callable[[int], Any]) -> float:
    for i in range(warmup):
        send(i)
    start = time.perf_counter()
    for i in range(n):
        send(i)
    return time.perf_counter() - start


def qops_message() -> Any:
    queue, message = benchapp.add.message((1, 1))
    return queue, message


def floor(mode: str, warmup: int, n: int) -> float:  # noqa: C901 - one branch a client
    queue, message = qops_message()
    transport = benchapp.app.transport
    if mode.startswith("lpush"):
        import redis

        name, raw = transport.encode(queue, message)
        key = transport.key(name)
        client = redis.Redis.from_url(URL)
        if mode == "lpush":
            return timed(warmup, n, lambda _i: client.lpush(key, raw))
        client.lpush(key, *([raw] * warmup))
        start = time.perf_counter()
        for first in range(0, n, 2000):
            pipe = client.pipeline(transaction=False)
            pipe.lpush(key, *([raw] * min(2000, n - first)))
            pipe.execute()
        return time.perf_counter() - start
    if mode == "confirms-prebuilt":
        # the broker's side of a confirmed bulk send: one pre-built message's frames
        # written N times by qops's confirm channel, the confirms collected
        from qops.transports.amqp.wire import encode_properties

        transport.publish(queue, message)  # the connection, the queue declared
        link, _ = transport._link()
        item = ("", queue, message.body, encode_properties(message, 2), True, None)
        link.confirms().publish_many([item] * warmup)
        start = time.perf_counter()
        out = link.confirms().publish_many([item] * n)
        seconds = time.perf_counter() - start
        if not out.ok:
            raise SystemExit(f"not all confirmed: {out}")
        return seconds
    if mode.startswith("pika"):
        import pika

        from qops.transports.amqp.props import _basic_properties

        conn = pika.BlockingConnection(pika.URLParameters(URL))
        ch = conn.channel()
        ch.queue_declare(queue, durable=True)  # as qops declares it
        props = _basic_properties(message, 2)
        confirm = mode == "pika-confirm"
        if confirm:
            ch.confirm_delivery()
        seconds = timed(warmup, n, lambda _i: ch.basic_publish(
            "", queue, message.body, props, mandatory=confirm))
        conn.close()
        return seconds
    if mode.startswith("sqlite"):
        import sqlite3

        from qops.protocol import encode_envelope

        raw = encode_envelope(queue, message)
        transport.publish(queue, message)  # the file and its tables
        db = sqlite3.connect(str(transport.path), isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        sql = "INSERT INTO messages (queue, priority, payload) VALUES (?, ?, ?)"

        def one(_i: int) -> None:
            db.execute("BEGIN IMMEDIATE")
            db.execute(sql, (queue, 0, raw))
            db.execute("COMMIT")

        if mode == "sqlite":
            return timed(warmup, n, one)
        for i in range(warmup):
            one(i)
        start = time.perf_counter()
        db.execute("BEGIN IMMEDIATE")
        db.executemany(sql, [(queue, 0, raw)] * n)
        db.execute("COMMIT")
        return time.perf_counter() - start
    raise SystemExit(f"unknown mode {mode!r}")


def main() -> None:
    mode, warmup, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    add = benchapp.add
    if mode == "one":
        seconds = timed(warmup, n, lambda i: add.delay(i, i))
    elif mode == "bulk":
        add.delay_many([(0, i) for i in range(warmup)])
        start = time.perf_counter()
        add.delay_many([(i, i) for i in range(n)])
        seconds = time.perf_counter() - start
    else:
        seconds = floor(mode, warmup, n)
    print(json.dumps({"seconds": seconds, "n": n}), flush=True)


if __name__ == "__main__":
    main()
