"""100,000 queued tasks: the worker's memory is bounded by its prefetch (issue item 6).

The queue is filled the fast way for each broker (rows in one transaction on SQLite, a
pipeline of LPUSHes of kombu envelopes on Redis, pika without confirms on RabbitMQ),
then a worker runs part of it. Its resident memory after ~20,000 more tasks must not
have grown with the queue, and the queue must still hold most of the messages (the
worker did not slurp it).
"""

from __future__ import annotations

import time

from qops import protocol
from qops.protocol import encode_envelope
from tests.faults.conftest import Broker, rss_kb
from tests.helpers import wait_until

N = 100_000
WARM_UP = 3_000  # tasks run before the first measurement (imports, caches, buffers)
MORE = 20_000
GROWTH_LIMIT_KB = 30 * 1024


def fill(broker: Broker, transport: object, queue: str, n: int) -> None:
    template = protocol.build_task_message("proj.tasks.add", [1, 2], ignore_result=True)
    old_id = template.headers["id"]

    def messages():  # the same message with a new id each time (fast to make)
        import uuid

        for _ in range(n):
            new_id = str(uuid.uuid4())
            headers = {**template.headers, "id": new_id, "root_id": new_id}
            props = {**template.properties, "correlation_id": new_id}
            yield type(template)(body=template.body, headers=headers, properties=props,
                                 content_type=template.content_type,
                                 content_encoding=template.content_encoding)

    assert old_id
    if broker.kind == "sqlite":
        rows = ((queue, 0, encode_envelope(queue, m)) for m in messages())
        with transport.db.write() as conn:  # type: ignore[attr-defined]
            conn.execute("INSERT OR IGNORE INTO queues (name) VALUES (?)", (queue,))
            conn.executemany("INSERT INTO messages (queue, priority, payload) "
                             "VALUES (?, ?, ?)", rows)
    elif broker.kind == "redis":
        transport.bind([queue])  # type: ignore[attr-defined]
        client = transport._client  # type: ignore[attr-defined]
        pipe = client.pipeline(transaction=False)
        for i, m in enumerate(messages(), 1):
            name, raw = transport.encode(queue, m)  # type: ignore[attr-defined]
            pipe.lpush(name, raw)
            if i % 5000 == 0:
                pipe.execute()
        pipe.execute()
    else:
        import pika

        conn = pika.BlockingConnection(pika.URLParameters(broker.url.split("?")[0]))
        try:
            ch = conn.channel()
            ch.queue_declare(queue, durable=True)
            # pika's blocking channel flushes every publish; its underlying channel
            # writes without waiting, and the connection is pumped every 2,000
            raw_channel = ch._impl
            for i, m in enumerate(messages(), 1):
                raw_channel.basic_publish("", queue, m.body, pika.BasicProperties(
                    content_type=m.content_type, content_encoding=m.content_encoding,
                    headers={k: v for k, v in m.headers.items() if v is not None},
                    correlation_id=m.properties.get("correlation_id"), delivery_mode=2))
                if i % 2000 == 0:
                    conn.process_data_events(0)
            conn.process_data_events(0)
        finally:
            conn.close()


def test_memory_is_bounded_by_prefetch_not_queue_length(app, broker, workers, queue):
    transport = app.transport
    t0 = time.monotonic()
    fill(broker, transport, queue, N)

    def stats():
        [s] = transport.queue_stats([queue])
        return s

    assert wait_until(lambda: stats().ready == N, timeout=30), stats()
    filled = time.monotonic() - t0
    # 4 threads, prefetch 16
    w = workers.start("w", "-Q", queue, "-P", "threads", "-c", "4", level="WARNING")

    def done() -> int:
        s = stats()
        return N - s.ready - s.in_flight

    try:
        assert wait_until(lambda: done() >= WARM_UP, timeout=60, interval=0.1), \
            workers.log(w)[-2000:]
        before, at = rss_kb(w.pid), done()
        t1 = time.monotonic()
        assert wait_until(lambda: done() >= at + MORE, timeout=90, interval=0.1), \
            workers.log(w)[-2000:]
        after, s = rss_kb(w.pid), stats()
        ran = done() - at
        took = time.monotonic() - t1
    finally:
        w.stop()
        transport.purge(queue)
    print(f"\n{broker.kind}: {N} queued in {filled:.1f}s; RSS {before / 1024:.1f} MB -> "
          f"{after / 1024:.1f} MB after {ran} more tasks ({ran / took:.0f}/s); "
          f"{s.ready} ready, {s.in_flight} in flight")
    assert after - before < GROWTH_LIMIT_KB, (before, after)
    assert s.ready > N - WARM_UP - 2 * MORE  # the rest still waits in the queue
    if broker.kind != "amqp":  # (RabbitMQ can't count another process's unacked ones)
        assert s.in_flight < 1000, s
