"""A bulk send whose connection is cut half way: the error names every message the
broker did not confirm, and every other one is on the queue, once."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from qops.errors import PublishManyError
from qops.protocol import Message
from qops.transports.base import from_url
from tests.contract import FAST
from tests.failover.servers import free_port, need_binaries
from tests.faults.conftest import BrokerProxy
from tests.helpers import drain, wait_until


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


def test_redis_batch_refused_for_memory_half_way(tmp_path: Path) -> None:
    """A private redis-server whose maxmemory (noeviction) fills during a bulk send:
    Redis refuses the LPUSH of a chunk as it queues it (OOM), so that chunk's
    transaction does nothing. The error names that chunk and every later one; the
    chunks before are on the queue, whole and once."""
    need_binaries("redis-server")
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--maxmemory", "6mb", "--maxmemory-policy", "noeviction",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    t = None
    try:
        url = f"redis://127.0.0.1:{port}/0"
        assert wait_until(lambda: _answers(url), timeout=10), "the private redis-server"
        t = from_url(url, FAST)
        n = 8000  # 4 chunks of ~3 MB: the first fits in 6 MB, not all of them
        pad = "x" * 1000
        with pytest.raises(PublishManyError) as info:
            t.publish_many([("q", replace(msg(i), body=f'[["{pad}"], {{}}, {{}}]'.encode()))
                            for i in range(n)])
        unconfirmed = info.value.unconfirmed
        assert "maxmemory" in str(info.value)
        first = unconfirmed[0]
        assert first > 0 and first % 2000 == 0 and unconfirmed == list(range(first, n))
        c = t.consumer(["q"], prefetch=1000)
        got: list[str] = []
        while batch := drain(c, 1000, timeout=1.0):
            got.extend(d.message.headers["id"] for d in batch)
            for d in batch:
                c.ack(d)
        c.close()
        assert sorted(got) == sorted(f"id-{i}" for i in range(first))
    finally:
        if t is not None:
            t.close()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except redis.RedisError:
        return False
