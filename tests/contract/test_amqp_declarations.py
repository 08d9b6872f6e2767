"""Work queues on RabbitMQ are declared as Celery (kombu) declares them under the celery
preset, with the same settings, so that either side can declare them first; quorum
queues; a queue that exists with other arguments is used as it is (docs/protocol.md §3.1).

Celery's side is Celery's own code: its app's queue table declared through kombu."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pytest

from qops import App
from qops.errors import ConfigError
from qops.protocol import Message
from qops.transports.amqp import AMQPTransport

pytestmark = pytest.mark.amqp


@pytest.fixture
def admin(amqp_url: str) -> Iterator[Any]:
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    yield conn
    conn.close()


@pytest.fixture
def names(admin: Any) -> Iterator[list[str]]:
    """Unique names; the queues and exchanges so named are deleted afterwards."""
    made: list[str] = []
    yield made
    ch = admin.channel()
    for name in made:
        ch.queue_delete(name)
        ch.exchange_delete(name)


def new_name(names: list[str]) -> str:
    name = f"decl-{uuid.uuid4().hex[:10]}"
    names.append(name)
    return name


def qops_transport(url: str, **settings: Any) -> tuple[App, AMQPTransport]:
    app = App("decl", broker=url, **settings)
    transport = app.transport
    assert isinstance(transport, AMQPTransport)
    return app, transport


def celery_declare(url: str, queue: str, **conf: Any) -> None:
    """Declare ``queue`` as a Celery client or worker with settings ``conf`` does
    (exchange, queue, binding); kombu raises on a 406."""
    from celery import Celery

    app = Celery("decl", broker=url)
    app.conf.update(conf)
    try:
        with app.connection_for_write() as conn:
            app.amqp.queues[queue].declare(channel=conn.default_channel)
    finally:
        app.close()


def task(n: int) -> Message:
    return Message(body=f"[[{n}], {{}}, {{}}]".encode(), headers={"task": "t", "id": f"id-{n}"},
                   properties={"correlation_id": f"id-{n}"})


def receive(transport: AMQPTransport, queue: str) -> Any:
    c = transport.consumer([queue], prefetch=1)
    try:
        for _ in range(25):
            d = c.get(0.2)
            if d is not None:
                c.ack(d)
                return d
        raise AssertionError("no message arrived")
    finally:
        c.close()


@pytest.mark.parametrize("conf", [
    {},
    {"task_queue_max_priority": 10},
    {"task_default_queue_type": "quorum"},
    {"task_default_exchange": "tasks-x", "task_default_routing_key": "rk"},
], ids=["defaults", "max-priority", "quorum", "exchange"])
@pytest.mark.parametrize("order", ["qops-first", "celery-first"])
def test_celery_preset_declares_the_default_queue_as_celery(
        amqp_url: str, names: list[str], conf: dict[str, Any], order: str,
        caplog: pytest.LogCaptureFixture) -> None:
    queue = new_name(names)
    if "task_default_exchange" in conf:
        names.append(conf["task_default_exchange"])
    settings = {"compat": "celery", "task_default_queue": queue, **conf}
    if order == "celery-first":
        celery_declare(amqp_url, queue, **settings)
    app, transport = qops_transport(amqp_url, **settings)
    try:
        with caplog.at_level(logging.WARNING):
            transport.publish(queue, task(1))
            assert receive(transport, queue).message.headers["id"] == "id-1"
        assert "other arguments" not in caplog.text  # no 406 on either side
    finally:
        app.close()
    celery_declare(amqp_url, queue, **settings)  # raises on any difference


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_celery_preset_declares_other_queues_as_celery(
        amqp_url: str, names: list[str], queue_type: str) -> None:
    """A queue that is not the default one: Celery makes it "missing", with an exchange
    of its own name and task_create_missing_queue_type."""
    queue = new_name(names)
    settings = {"compat": "celery", "task_create_missing_queue_type": queue_type}
    app, transport = qops_transport(amqp_url, **settings)
    try:
        transport.publish(queue, task(1))
    finally:
        app.close()
    celery_declare(amqp_url, queue, **settings)
    ch = pika.BlockingConnection(pika.URLParameters(amqp_url)).channel()
    try:  # the exchange and the binding were made: a message published to it arrives
        ch.confirm_delivery()
        ch.basic_publish(queue, queue, b"[[], {}, {}]",
                         pika.BasicProperties(headers={"task": "t", "id": "via-x"}))
        assert ch.queue_declare(queue, passive=True).method.message_count == 2
    finally:
        ch.connection.close()


def test_qops_preset_declares_priorities_when_asked(amqp_url: str, admin: Any,
                                                    names: list[str]) -> None:
    with_prio, without = new_name(names), new_name(names)
    app, transport = qops_transport(amqp_url, task_queue_max_priority=9)
    app2, transport2 = qops_transport(amqp_url)  # the default: none, as Celery
    try:
        transport.publish(with_prio, task(1))
        transport2.publish(without, task(1))
    finally:
        app.close()
        app2.close()
    ch = admin.channel()
    ch.queue_declare(with_prio, durable=True, arguments={"x-max-priority": 9})
    ch.queue_declare(without, durable=True)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker):  # the qops preset: no exchange
        ch.exchange_declare(with_prio, passive=True)


def test_quorum_queue_is_declared_and_consumed_with_a_per_consumer_prefetch(
        amqp_url: str, admin: Any, names: list[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """task_default_queue_type quorum (both presets): x-queue-type quorum, no
    x-max-priority; the consumer starts with a per-consumer prefetch instead of being
    refused a channel-wide one (no reconnect)."""
    queue = new_name(names)
    app, transport = qops_transport(amqp_url, task_default_queue=queue,
                                    task_default_queue_type="quorum")
    try:
        transport.publish(queue, task(1))
        transport.publish(queue, task(2))
        c = transport.consumer([queue], prefetch=1)
        try:
            assert c._global_qos is False
            with caplog.at_level(logging.INFO):
                got = [c.get(5.0) for _ in range(1)]
                assert got[0] is not None and c.get(0.3) is None  # prefetch 1 holds
                c.ack(got[0])
                second = c.get(5.0)
                assert second is not None
                c.ack(second)
            assert "refuses a channel-wide prefetch" not in caplog.text
        finally:
            c.close()
    finally:
        app.close()
    admin.channel().queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})


def test_a_queue_with_other_arguments_is_used_as_it_is_with_one_warning(
        amqp_url: str, admin: Any, names: list[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """Made by someone else with other arguments: a 406 for our declare, then a passive
    one; the warning names the queue and the argument, and nothing loops."""
    queue = new_name(names)
    admin.channel().queue_declare(queue, durable=True, arguments={"x-max-priority": 3})
    app, transport = qops_transport(amqp_url, compat="celery")
    try:
        with caplog.at_level(logging.WARNING):
            transport.publish(queue, task(1))
            transport.publish(queue, task(2))
            assert receive(transport, queue).message.headers["id"] == "id-1"
    finally:
        app.close()
    warnings = [r.getMessage() for r in caplog.records if "other arguments" in r.getMessage()]
    assert len(warnings) == 2, warnings  # one per connection: the publisher's, the consumer's
    assert queue in warnings[0] and "x-max-priority" in warnings[0]
    assert "task_queue_max_priority set to its x-max-priority" in warnings[0]  # the way out


@pytest.mark.parametrize(("setting", "value"), [
    ("task_default_queue_type", "qourum"),
    ("task_create_missing_queue_type", "stream"),
    ("task_default_exchange_type", "headers"),
    ("task_queue_max_priority", 256),
])
def test_bad_declaration_settings_are_one_line_config_errors(setting: str, value: Any) -> None:
    with pytest.raises(ConfigError) as err:
        App("bad", **{setting: value})
    text = str(err.value)
    assert setting in text and "\n" not in text
