"""A bulk send whose connection is cut half way: the error names every message the
broker did not confirm, and every other one is on the queue, once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from qops.errors import PublishManyError
from qops.protocol import Message
from qops.transports.base import from_url
from tests.contract import FAST
from tests.faults.conftest import BrokerProxy
from tests.helpers import drain


def msg(n: int) -> Message:
    return Message(body=f"[[{n}], {{}}, {{}}]".encode(), headers={"task": "t", "id": f"id-{n}"},
                   properties={"correlation_id": f"id-{n}"})


def test_amqp_batch_cut_half_way(amqp_url: str, queue_name: str,
                                 make_proxy: Callable[[str], BrokerProxy]) -> None:
    n = 6000
    proxy = make_proxy(amqp_url)
    t = from_url(proxy.url_for(amqp_url), FAST)
    direct = from_url(amqp_url, FAST)
    stop = threading.Event()

    def cut_when_some_arrived() -> None:  # the batch is under way: cut it
        while not stop.is_set():
            [stats] = direct.queue_stats([queue_name])
            if stats.ready >= 500:
                proxy.cut()
                return
            time.sleep(0.005)

    try:
        t.publish(queue_name, msg(0))  # connected, queue declared
        direct.purge(queue_name)
        watcher = threading.Thread(target=cut_when_some_arrived, daemon=True)
        watcher.start()
        try:
            t.publish_many([(queue_name, msg(i)) for i in range(n)])
            unconfirmed: list[int] = []
        except PublishManyError as exc:
            unconfirmed = exc.unconfirmed
        stop.set()
        watcher.join(10)
        assert proxy.is_cut and unconfirmed, "the cut did not land inside the batch"
        assert unconfirmed == sorted(set(unconfirmed)) and unconfirmed[-1] == n - 1
        # everything on the queue, read until it stays empty for a second (not by its
        # count: with the management plugin on, queue_stats lags by seconds)
        c = direct.consumer([queue_name], prefetch=1000)
        got: list[Any] = []
        try:
            while batch := drain(c, 1000, timeout=1.0):
                got.extend(batch)
                for d in batch:
                    c.ack(d)
        finally:
            c.close()
        on_queue = [d.message.headers["id"] for d in got]
        assert len(on_queue) == len(set(on_queue)), "a message arrived twice"
        confirmed = {f"id-{i}" for i in set(range(n)) - set(unconfirmed)}
        assert confirmed <= set(on_queue), "a confirmed message is not on the queue"
    finally:
        stop.set()
        t.close()
        direct.close()
