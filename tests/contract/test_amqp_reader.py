"""A consumer's deliveries read off the socket by qops (rawio.DeliveryReader,
frames.deliveries) and its settlements written by qops (wire.settlements): the same
bytes and the same deliveries as pika's, anything else left to pika in order, and acks
that reach the broker while the caller works. The parsers need no broker; the rest runs
against the real one, in the session's private vhost."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pytest
from pika.spec import Basic

from qops.protocol import Message
from qops.transports.amqp import AMQPTransport, rawio
from qops.transports.amqp.frames import deliveries
from qops.transports.amqp.wire import settlements
from qops.transports.base import TransportOptions

pytestmark = pytest.mark.amqp


def delivery_frames(channel: int, ctag: str, tag: int, body: bytes, props: Any,
                    frame_body: int = 131072 - 8) -> bytes:
    """A delivery as RabbitMQ sends it, marshalled by pika (the body cut into frames)."""
    out = [pika.frame.Method(channel, Basic.Deliver(ctag, tag, tag % 2 == 0, "ex",
                                                    f"rk{tag}")).marshal(),
           pika.frame.Header(channel, len(body), props).marshal()]
    for start in range(0, len(body), frame_body):
        out.append(pika.frame.Body(channel, body[start:start + frame_body]).marshal())
    return b"".join(out)


def test_deliveries_are_parsed_whole_and_the_rest_left_to_pika() -> None:
    props = pika.BasicProperties(content_type="application/json", delivery_mode=2,
                                 headers={"task": "t", "n": 5, "l": [1, "x"]},
                                 correlation_id="c\u00e9", priority=3)
    big = bytes(range(256)) * 50  # three body frames of 5000 bytes at most
    one = delivery_frames(1, "c1", 1, b"[[1], {}, {}]", props)
    two = delivery_frames(1, "c2", 2, big, props, frame_body=5000)
    empty = delivery_frames(1, "c1", 3, b"", pika.BasicProperties())
    data = one + two + empty
    taken, used, frames = deliveries(data, 1, {"c1", "c2"})
    assert used == len(data) and frames == 3 + 5 + 2
    assert [(t[0], t[1], t[2], t[3], t[5]) for t in taken] == [
        ("c1", 1, False, "rk1", b"[[1], {}, {}]"), ("c2", 2, True, "rk2", big),
        ("c1", 3, False, "rk3", b"")]
    assert vars(taken[0][4]) == vars(taken[1][4]) == vars(props)
    # a delivery not all here yet: the whole ones before it, nothing of it
    for cut in range(1, len(two)):
        taken, used, frames = deliveries(one + two[:cut], 1, {"c1", "c2"})
        assert (len(taken), used, frames) == (1, len(one), 3)
    # whatever is not a delivery of ours stops the parse: pika reads it, in order
    for other in (pika.frame.Heartbeat().marshal(),
                  pika.frame.Method(1, Basic.CancelOk("c1")).marshal(),
                  delivery_frames(2, "c1", 4, b"x", props),  # another channel
                  delivery_frames(1, "gone", 4, b"x", props)):  # a cancelled consumer
        taken, used, _ = deliveries(one + other + one, 1, {"c1", "c2"})
        assert (len(taken), used) == (1, len(one))
    assert deliveries(b"", 1, {"c1"}) == ([], 0, 0)


def test_settlement_frames_are_pikas_bytes() -> None:
    frames = settlements(3, [1, 2, 5, 7], [6], floor=4)
    assert frames == [
        pika.frame.Method(3, Basic.Ack(5, multiple=False)).marshal(),
        pika.frame.Method(3, Basic.Ack(7, multiple=False)).marshal(),
        pika.frame.Method(3, Basic.Ack(2, multiple=True)).marshal(),
        pika.frame.Method(3, Basic.Nack(6, multiple=False, requeue=True)).marshal(),
    ]
    assert settlements(1, [], [], floor=1) == []


# -- against the broker -------------------------------------------------------------------


@pytest.fixture
def transport(amqp_url: str) -> Iterator[AMQPTransport]:
    t = AMQPTransport(amqp_url, TransportOptions())
    yield t
    t.close()


@pytest.fixture
def queue(amqp_url: str) -> Iterator[str]:
    """A unique queue name; it and ``<name>-other`` are deleted afterwards."""
    name = f"reader-{uuid.uuid4().hex[:10]}"
    yield name
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    for q in (name, f"{name}-other"):
        conn.channel().queue_delete(q)
    conn.close()


def task(n: int, body: bytes = b"") -> Message:
    return Message(body=body or f"[[{n}], {{}}, {{}}]".encode(),
                   headers={"task": "t", "id": f"id-{n}"}, properties={"correlation_id": f"{n}"})


def four_held(transport: AMQPTransport, queue: str) -> tuple[Any, list[Any]]:
    """8 messages queued; a consumer (prefetch 4, acks in pairs) holding the first 4."""
    for i in range(8):
        transport.publish(queue, task(i))
    c = transport.consumer([queue], prefetch=4)
    c.ack_batch = 2
    held = [c.get(5) for _ in range(4)]
    assert all(held)
    return c, held


@pytest.fixture
def long_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """get() and DeliveryReader wait 30 s a slice: a lost wake-up shows as a long get()."""
    import qops.transports.amqp.consumer as consumer_module

    monkeypatch.setattr(consumer_module, "PUMP_SLICE", 30.0)
    monkeypatch.setattr(rawio, "TIMER_SLICE", 30.0)


def ready(transport: AMQPTransport, queue: str, want: int) -> int:
    deadline = time.monotonic() + 5
    while (n := transport.queue_stats([queue])[0].ready) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return n


def test_acks_reach_the_broker_while_the_caller_works(transport: AMQPTransport,
                                                      queue: str) -> None:
    """A pool child takes what the broker sent, then runs the tasks, calling get(0)
    between them: each batch of ``ack_batch`` acks goes out then, so the broker refills
    the window while the other tasks run (not once they all ran)."""
    c, held = four_held(transport, queue)
    try:
        assert ready(transport, queue, 4) == 4
        c.ack(held[0])
        assert c.get(0) is None  # one ack: it waits for the batch
        time.sleep(0.2)
        assert ready(transport, queue, 4) == 4
        c.ack(held[1])
        assert c.get(0) is None  # the batch goes out; nothing pumped here
        assert ready(transport, queue, 2) == 2  # the broker sent two more
        more = [c.get(5) for _ in range(2)]
        assert [d.message.properties["correlation_id"] for d in more] == ["4", "5"]
        for d in held[2:] + more:
            c.ack(d)
    finally:
        c.close()
    assert ready(transport, queue, 2) == 2


def test_large_and_small_deliveries_arrive_whole_and_in_order(transport: AMQPTransport,
                                                               queue: str) -> None:
    """Bodies over a frame (several body frames, reads that end mid-delivery, which
    pika then finishes) mixed with small ones: every one whole, in order, counted as
    read for pika's heartbeat checker."""
    bodies = [(b"%d-" % i) * (70000 if i % 3 == 0 else 3) for i in range(30)]
    for i, body in enumerate(bodies):
        transport.publish(queue, task(i, body))
    c = transport.consumer([queue], prefetch=10)
    try:
        got = []
        while len(got) < len(bodies):
            d = c.get(5)
            assert d is not None, f"{len(got)} of {len(bodies)} arrived"
            got.append(d.message.body)
            c.ack(d)
        assert got == bodies
        assert c._link.conn._impl.bytes_received > sum(map(len, bodies))
    finally:
        c.close()
    assert ready(transport, queue, 0) == 0


def test_heartbeats_keep_an_idle_consumer_connected(amqp_url: str, queue: str) -> None:
    """While get() waits on the socket itself, pika's timers still run: with a 1-second
    heartbeat the broker would drop a silent connection within ~2 s."""
    t = AMQPTransport(amqp_url + "?heartbeat=1", TransportOptions())
    c = t.consumer([queue], prefetch=4)
    try:
        link = c._link
        assert c.get(4.0) is None
        t.publish(queue, task(1))
        d = c.get(5)
        assert d is not None and c._link is link  # the same connection all along
        c.ack(d)
    finally:
        c.close()
        t.close()


@pytest.mark.parametrize("itself", [True, False], ids=["reader-waits", "pika-waits"])
@pytest.mark.usefixtures("long_slices")
def test_another_thread_wakes_the_waiting_consumer_at_once(
        transport: AMQPTransport, queue: str, itself: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An ack or a queue change from another thread ends get()'s wait on the socket,
    whoever waits: DeliveryReader (a byte down pika's wake-up socket) or pika's loop
    (TLS, a write pending: a callback). With the pump's slices made long, a lost
    wake-up would show as a get() that takes one whole."""
    from qops.transports.amqp.rawio import DeliveryReader

    if not itself:
        monkeypatch.setattr(DeliveryReader, "waits_itself", lambda self: False)
    other = f"{queue}-other"
    for i in range(2):
        transport.publish(queue, task(i))
    transport.publish(other, task(9))
    c = transport.consumer([queue], prefetch=1)
    try:
        first = c.get(5)
        assert first is not None
        threading.Timer(0.2, c.ack, args=(first,)).start()
        started = time.monotonic()
        second = c.get(20)  # held back by the prefetch until the other thread acks
        assert second is not None and time.monotonic() - started < 5
        assert second.message.properties["correlation_id"] == "1"
        c.ack(second)
        threading.Timer(0.2, c.add_queue, args=(other,)).start()
        started = time.monotonic()
        third = c.get(20)
        assert third is not None and third.queue == other
        assert time.monotonic() - started < 5
        c.ack(third)
    finally:
        c.close()


@pytest.mark.usefixtures("long_slices")
def test_acks_from_other_threads_wake_a_waiting_get_for_a_batch(
        transport: AMQPTransport, queue: str) -> None:
    """Pool threads settle while get() waits for the broker: with ``ack_batch`` 2 the
    first ack does not wake it (one write and one wake-up for the pair), the second
    does; the last delivery held wakes it at once. The pump's slice is made long, so
    a wake-up missed or made too early shows."""
    c, held = four_held(transport, queue)
    try:
        threading.Timer(0.2, c.ack, args=(held[0],)).start()
        threading.Timer(0.8, c.ack, args=(held[1],)).start()
        started = time.monotonic()
        d = c.get(20)  # the window is full until the pair of acks is out
        elapsed = time.monotonic() - started
        assert d is not None and 0.7 < elapsed < 5, elapsed
        for x in [*held[2:], d, c.get(5)]:
            c.ack(x)
    finally:
        c.close()
    c = transport.consumer([queue], prefetch=1)
    c.ack_batch = 2
    try:
        last = c.get(5)
        assert last is not None
        threading.Timer(0.2, c.ack, args=(last,)).start()
        started = time.monotonic()
        d = c.get(20)  # nothing else held: the single ack goes at once
        assert d is not None and time.monotonic() - started < 5
        c.ack(d)
    finally:
        c.close()


def test_publish_and_consume_with_more_than_1024_files_open(transport: AMQPTransport,
                                                            queue: str) -> None:
    """A busy web server has more than 1024 files open: the sockets qops then opens are
    ones select() refuses (ValueError), so waiting for a confirm or a delivery uses
    poll()."""
    import resource
    import socket

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1200
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"the open-file limit here is {hard}, below {want}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    filler = [socket.socket() for _ in range(1100)]
    try:
        t = AMQPTransport(transport.url, TransportOptions())
        try:
            t.publish(queue, task(1))  # waits for its confirm
            c = t.consumer([queue], prefetch=4)
            try:
                d = c.get(5)
                assert d is not None and c._link.conn._impl._transport._sock.fileno() > 1024
                c.ack(d)
            finally:
                c.close()
        finally:
            t.close()
    finally:
        for s in filler:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
