"""The worker checks every control value itself, before it applies it: requests sent
straight to the broker (past the client's checks, as another tool or Celery's client
could) get an error reply and change nothing, and no malformed message stops the
control thread. On each real broker."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from qops.app import App
from qops.control import reply_queue_name
from qops.protocol import Message
from qops.worker.worker import Worker
from tests.helpers import wait_until


class Node:
    """A worker (threads pool) running in this process, and a raw control client."""

    def __init__(self, url: str) -> None:
        self.app = app = App("vt", broker=url, worker_heartbeat_interval=0.5,
                             worker_heartbeat_ttl=3)

        @app.task(name="vt.add")
        def add(x: int, y: int) -> int:
            return x + y

        self.task = add
        self.name = f"w{uuid.uuid4().hex[:6]}@vt"
        self.queue = f"vt-{uuid.uuid4().hex[:6]}"
        self.worker = Worker(app, hostname=self.name, queues=[self.queue], pool="threads",
                             concurrency=2, task_events=False)
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.worker.start()
        except BaseException as exc:
            self.errors.append(exc)

    def send(self, request: dict[str, Any], headers: dict[str, Any] | None = None,
             *, wait: float = 10.0) -> Any:
        """Broadcast ``request`` as it is; this node's reply, or None (none within
        ``wait`` seconds)."""
        t = self.app.transport
        oid, ticket = uuid.uuid4().hex, str(uuid.uuid4())
        reply_to = {"exchange": "reply.qops.pidbox", "routing_key": oid}
        body = {"method": "ping", "arguments": {}, "destination": [self.name],
                "ticket": ticket, "reply_to": reply_to, **request}
        consumer = t.reply_consumer(reply_queue_name(reply_to),
                                    exchange=reply_to["exchange"], routing_key=oid)
        try:
            t.broadcast("qops.pidbox", Message(body=json.dumps(body).encode(),
                                               headers={"clock": 1} if headers is None
                                               else headers))
            deadline = time.monotonic() + wait
            while (left := deadline - time.monotonic()) > 0:
                d = consumer.get(left)
                if d is None:
                    continue
                consumer.ack(d)
                if d.message is not None and d.message.headers.get("ticket") == ticket:
                    return json.loads(d.message.body).get(self.name)
            return None
        finally:
            consumer.close()

    def command(self, method: str, **arguments: Any) -> Any:
        return self.send({"method": method, "arguments": arguments})

    def alive(self) -> bool:
        control = self.worker.control
        return (control is not None and control._thread.is_alive()
                and self.command("ping") == {"ok": "pong"})


@pytest.fixture
def node(real_broker_url: str) -> Iterator[Node]:
    n = Node(real_broker_url)
    n.thread.start()
    try:
        assert wait_until(lambda: n.worker.control is not None and
                          n.command("ping") == {"ok": "pong"}, timeout=30), n.errors
        yield n
    finally:
        n.worker.request_stop()
        n.thread.join(30)
        n.app.close()
    assert not n.errors, n.errors


BAD = [
    ("time_limit", {"task_name": "vt.add", "soft": -1}, "greater than 0"),
    ("time_limit", {"task_name": "vt.add", "soft": 10, "hard": 5}, "less than"),
    ("time_limit", {"task_name": "vt.add", "soft": "soon"}, "number"),
    ("rate_limit", {"task_name": "vt.add", "rate_limit": -1}, "invalid rate limit"),
    ("rate_limit", {"task_name": "vt.add", "rate_limit": "5/x"}, "invalid rate limit"),
    ("pool_grow", {"n": 0}, "at least 1"),
    ("pool_grow", {"n": 100000}, "at most 1024"),
    ("pool_shrink", {"n": "x"}, "whole number"),
    ("autoscale", {"max": 1, "min": 3}, "at least min"),
    ("add_consumer", {"queue": "amq.nope"}, "reserved"),
    ("add_consumer", {"queue": ""}, "queue name"),
    ("revoke", {"task_id": "r1", "terminate": True, "signal": "NOPE"}, "unknown signal"),
]


def state(n: Node) -> Any:
    loop, pool = n.worker.loop, n.worker.pool
    assert pool is not None
    return (n.task.time_limit, n.task.soft_time_limit, n.task.rate_limit,
            dict(loop.rate_limits.buckets), pool.concurrency, list(loop.consumed_queues),
            set(loop.revoked))


def test_bad_values_past_the_client_get_an_error_and_change_nothing(node: Node) -> None:
    before = state(node)
    for method, arguments, says in BAD:
        reply = node.command(method, **arguments)
        assert isinstance(reply, dict) and says in reply.get("error", ""), (method, reply)
        assert state(node) == before, (method, arguments)
    reply = node.send({"method": "time_limit", "arguments": [1, 2]})
    assert "must be an object" in reply["error"]
    # a good value still goes through
    assert node.command("time_limit", task_name="vt.add", soft=5, hard=10) == \
        {"ok": "time limits set successfully"}
    assert (node.task.soft_time_limit, node.task.time_limit) == (5.0, 10.0)


def test_rate_limit_zero_says_disabled(node: Node) -> None:
    assert node.command("rate_limit", task_name="vt.add", rate_limit="10/m") == \
        {"ok": "new rate limit set successfully"}
    assert node.task.rate_limit == "10/m" and "vt.add" in node.worker.loop.rate_limits.buckets
    for zero in ("0", "0/m", 0):
        assert node.command("rate_limit", task_name="vt.add", rate_limit=zero) == \
            {"ok": "rate limit disabled successfully"}
        assert node.task.rate_limit is None
        assert "vt.add" not in node.worker.loop.rate_limits.buckets


def test_malformed_messages_leave_the_control_thread_running(node: Node) -> None:
    # each is answered with an error (the client wants an answer) and the next
    # command is still heard
    for request, headers in [
        ({"destination": None, "pattern": "(", "matcher": "pcre"}, None),
        ({"destination": None, "pattern": "w*", "matcher": "regex"}, None),
        ({"destination": 42}, None),
        ({}, {"clock": 1, "expires": "soon"}),
        ({}, {"clock": 1, "expires": [1]}),
    ]:
        reply = node.send(request, headers)
        assert reply is not None and "malformed control message" in reply["error"], \
            (request, headers, reply)
        assert node.alive(), (request, headers)
    # no reply wanted, or none possible: logged and ignored
    t = node.app.transport
    for body in (b"not json", b"[1, 2]", json.dumps({"method": "ping", "ticket": "t",
                                                     "reply_to": "garbage"}).encode(),
                 json.dumps({"method": "ping", "ticket": "t",
                             "reply_to": {"exchange": 5}}).encode()):
        t.broadcast("qops.pidbox", Message(body=body, headers={"clock": 1}))
    assert node.alive()


def test_expires_header(node: Node) -> None:
    assert node.send({}, {"clock": 1, "expires": 0}) == {"ok": "pong"}  # kombu: never
    assert node.send({}, {"clock": 1}) == {"ok": "pong"}
    assert node.send({}, {"clock": 1, "expires": time.time() + 60}) == {"ok": "pong"}
    assert node.send({}, {"clock": 1, "expires": time.time() - 1}, wait=1.0) is None


def test_destination_string_is_one_exact_name(node: Node) -> None:
    assert node.send({"destination": node.name}) == {"ok": "pong"}
    assert node.send({"destination": node.name + ".other"}, wait=1.0) is None
    assert node.send({"destination": "x" + node.name}, wait=1.0) is None
