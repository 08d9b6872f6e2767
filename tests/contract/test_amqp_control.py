"""Remote control over RabbitMQ with a Celery-style peer.

A Celery 5 worker (kombu's pidbox) reads requests from the fanout exchange ``<mailbox>``
and answers by publishing to the direct exchange ``reply.<mailbox>`` with the request's
``reply_to`` routing key (the client's oid), declaring that exchange first as kombu
does. The peer here is plain pika playing that part, so the test needs no Celery: it
checks that qops's client side (``qops.control.broadcast``) declares everything the way
kombu does (no 406 either way) and that the reply finds the client's reply queue.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pytest

from qops import App
from qops.control import broadcast
from qops.transports.amqp import AMQPTransport

pytestmark = pytest.mark.amqp

#: kombu's pidbox worker queue arguments (docs/protocol.md §4)
PIDBOX_QUEUE_ARGS = {"x-expires": 10000, "x-message-ttl": 300000}


class CeleryStyleNode(threading.Thread):
    """Answers every request addressed to it the way a Celery worker does."""

    def __init__(self, url: str, mailbox: str, hostname: str, *,
                 reply: dict[str, Any] | None = None) -> None:
        super().__init__(daemon=True)
        self.hostname = hostname
        self.reply = reply or {"ok": "pong"}
        self.requests: list[dict[str, Any]] = []
        self._done = threading.Event()
        self.conn = pika.BlockingConnection(pika.URLParameters(url))
        ch = self.ch = self.conn.channel()
        # declared as kombu declares them
        ch.exchange_declare(mailbox, "fanout", durable=False, auto_delete=False)
        queue = f"{hostname}.{mailbox}"
        ch.queue_declare(queue, exclusive=True, auto_delete=True, arguments=PIDBOX_QUEUE_ARGS)
        ch.queue_bind(queue, mailbox)
        ch.basic_consume(queue, self._on_request, auto_ack=True)

    def _on_request(self, ch: Any, _method: Any, _props: Any, body: bytes) -> None:
        request = json.loads(body)
        self.requests.append(request)
        destination = request.get("destination")
        if destination and self.hostname not in destination:
            return
        reply_to = request.get("reply_to")
        if not reply_to:
            return  # a cast
        exchange = reply_to["exchange"]
        ch.exchange_declare(exchange, "direct", durable=False, auto_delete=False)
        ch.basic_publish(exchange, reply_to["routing_key"],
                         json.dumps({self.hostname: self.reply}).encode(),
                         pika.BasicProperties(content_type="application/json",
                                              headers={"ticket": request["ticket"],
                                                       "clock": 1}))

    def run(self) -> None:
        while not self._done.is_set():
            self.conn.process_data_events(0.1)
        self.conn.close()

    def stop(self) -> None:
        self._done.set()
        self.join(5)


@pytest.fixture
def node_name() -> str:
    return f"celery@fake-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def celery_app(amqp_url: str) -> Iterator[App]:
    app = App("ctl", broker=amqp_url, compat="celery")
    yield app
    app.close()


def test_celery_node_replies_through_the_reply_exchange(
        celery_app: App, amqp_url: str, node_name: str) -> None:
    node = CeleryStyleNode(amqp_url, celery_app.names["mailbox"], node_name)
    node.start()
    try:
        res = broadcast(celery_app, "ping", destination=[node_name], timeout=5.0)
        assert res.replies == {node_name: {"ok": "pong"}}
        assert res.elapsed < 3.0  # returned when the one expected node had answered
        [request] = node.requests
        assert request["reply_to"]["exchange"] == "reply.celery.pidbox"
        # twice: the exchanges and the reply binding are declared again, same way
        again = broadcast(celery_app, "ping", destination=[node_name], timeout=5.0)
        assert again.replies == {node_name: {"ok": "pong"}}
    finally:
        node.stop()


def test_replies_for_another_client_are_not_seen(
        celery_app: App, amqp_url: str, node_name: str) -> None:
    """Two clients at once: each reply queue is bound with its own oid only."""
    node = CeleryStyleNode(amqp_url, celery_app.names["mailbox"], node_name)
    node.start()
    try:
        results: list[Any] = []
        threads = [threading.Thread(target=lambda: results.append(
            broadcast(celery_app, "ping", destination=[node_name], timeout=5.0)))
            for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert [r.replies for r in results] == [{node_name: {"ok": "pong"}}] * 2
        tickets = {r["ticket"] for r in node.requests}
        assert len(tickets) == 2
    finally:
        node.stop()


def test_client_waits_for_the_live_node_count(amqp_url: str, node_name: str) -> None:
    """qops compat: the client counts live nodes (consumers of the presence queue) and
    returns as soon as that many replied, long before the timeout."""
    app = App("ctl", broker=amqp_url)
    registry = AMQPTransport(amqp_url)  # the node's own transport, as a worker has
    node = CeleryStyleNode(amqp_url, app.names["mailbox"], node_name)
    node.start()
    try:
        base = registry.live_nodes()
        registry.register_node(node_name, {}, ttl=10)
        assert app.transport.live_nodes() == base + 1
        if base:
            pytest.skip("other nodes are registered in this vhost")
        started = time.monotonic()
        res = broadcast(app, "ping", timeout=10.0)
        assert res.replies == {node_name: {"ok": "pong"}}
        assert time.monotonic() - started < 5.0
    finally:
        node.stop()
        registry.close()
        app.close()
