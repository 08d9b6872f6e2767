"""RabbitMQ-specific behaviour of the AMQP transport (the shared contract is in
test_transport.py). Runs against the real broker, in the session's private vhost."""

from __future__ import annotations

import struct
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pytest

from qops.errors import BrokerUnreachable, PublishError
from qops.protocol import Message
from qops.transports.amqp import AMQPTransport, parse_url
from qops.transports.amqp.deadletters import FIND_AGAIN
from qops.transports.base import TransportOptions
from qops.transports.declare import Declarations

pytestmark = pytest.mark.amqp


# -- URL parsing (no broker needed) ------------------------------------------------------


@pytest.mark.parametrize(("url", "vhost"), [
    ("amqp://guest:guest@localhost:5672//", "/"),
    ("amqp://guest:guest@localhost:5672/", "/"),
    ("amqp://guest:guest@localhost:5672", "/"),
    ("amqp://guest:guest@localhost:5672/prod", "prod"),
    ("amqp://guest:guest@localhost:5672/%2F", "/"),
    ("pyamqp://u@h/a%2Fb", "a/b"),
])
def test_url_vhost_like_kombu(url: str, vhost: str) -> None:
    assert parse_url(url).vhost == vhost


def test_url_parts_and_options() -> None:
    p = parse_url("amqps://us%40er:p%3Ass@rabbit.example:5999/v?heartbeat=20"
                  "&dead_letter_queue=my.dlq")
    assert (p.user, p.password, p.host, p.port, p.tls) == ("us@er", "p:ss", "rabbit.example",
                                                            5999, True)
    assert (p.heartbeat, p.dead_letter_queue) == (20, "my.dlq")
    d = parse_url("amqp://h")
    assert (d.user, d.password, d.port, d.heartbeat, d.dead_letter_queue) == (
        "guest", "guest", 5672, 60, "qops.dlq")


# -- frame decoding (no broker needed) ----------------------------------------------------


def _field(kind: bytes, payload: bytes) -> bytes:
    return kind + payload


def _long_str(raw: bytes) -> bytes:
    return struct.pack(">I", len(raw)) + raw


def _table_bytes(items: list[tuple[bytes, bytes]]) -> bytes:
    """An AMQP field table from (raw key, encoded value), for values pika can't encode."""
    inner = b"".join(bytes([len(k)]) + k + v for k, v in items)
    return struct.pack(">I", len(inner)) + inner


EVERY_KIND = [
    (b"t1", _field(b"t", b"\x01")), (b"t0", _field(b"t", b"\x00")),
    (b"b", _field(b"b", struct.pack(">b", -5))), (b"B", _field(b"B", b"\xfe")),
    (b"U", _field(b"U", struct.pack(">h", -300))), (b"u", _field(b"u", struct.pack(">H", 65000))),
    (b"s", _field(b"s", struct.pack(">h", -2))),
    (b"I", _field(b"I", struct.pack(">i", -70000))), (b"i", _field(b"i", struct.pack(">I", 4_000_000_000))),
    (b"l", _field(b"l", struct.pack(">q", -2 ** 40))), (b"L", _field(b"L", struct.pack(">q", 7))),
    (b"f", _field(b"f", struct.pack(">f", 2.75))), (b"d", _field(b"d", struct.pack(">d", -1.5e9))),
    (b"D", _field(b"D", b"\x03" + struct.pack(">i", -12345))),
    (b"S", _field(b"S", _long_str("h\u00e9llo".encode()))),
    (b"S-bad-utf8", _field(b"S", _long_str(b"\xff\xfe"))),
    (b"x", _field(b"x", _long_str(b"\x00\x01"))),
    (b"T", _field(b"T", struct.pack(">Q", 1716912345))),
    (b"V", b"V"),
    (b"A", _field(b"A", _long_str(b"V" + _field(b"I", struct.pack(">i", 3))
                                  + _field(b"S", _long_str(b"x"))))),
    (b"A-empty", _field(b"A", _long_str(b""))),
    (b"F", _field(b"F", _table_bytes([(b"inner", _field(b"t", b"\x01")),
                                      (b"deep", _field(b"F", _table_bytes([])))]))),
    (b"\xff-bad-key", b"V"),
]


def _header_frame(props: pika.BasicProperties, table: bytes | None = None) -> bytes:
    raw = pika.frame.Header(1, 1234, props).marshal()
    if table is None:
        return raw
    # put a hand-made table in place of the (empty) one pika encoded: it follows the
    # frame header (7), class/weight/body size (12), flags (2), content type/encoding
    pos = 21 + sum(1 + len(v) for v in (props.content_type, props.content_encoding) if v)
    assert raw[pos:pos + 4] == struct.pack(">I", 0)
    payload = raw[7:pos] + table + raw[pos + 4:-1]
    return struct.pack(">BHL", 2, 1, len(payload)) + payload + b"\xce"


def _same(a: Any, b: Any) -> None:
    assert a[0] == b[0]
    fa, fb = a[1], b[1]
    assert type(fa) is type(fb) and fa.channel_number == fb.channel_number
    if isinstance(fa, pika.frame.Header):
        assert fa.body_size == fb.body_size
        assert vars(fa.properties) == vars(fb.properties)
        for k, v in (fa.properties.headers or {}).items():  # same types too (True != 1)
            # ... but a plain int where pika gives its int subclass ``long`` (repr "5L")
            theirs = type(fb.properties.headers[k])
            assert type(v) is (int if theirs is pika.compat.long else theirs), k
    elif isinstance(fa, pika.frame.Method):
        assert type(fa.method) is type(fb.method) and vars(fa.method) == vars(fb.method)
    else:
        assert vars(fa) == vars(fb)


def test_fast_frame_decoder_matches_pika_for_every_field_kind() -> None:
    from pika.frame import decode_frame as pika_decode

    from qops.transports.amqp import decode_frame

    props = pika.BasicProperties(content_type="application/json", content_encoding="utf-8",
                                 headers={}, delivery_mode=2, priority=4,
                                 correlation_id="c\u00e9", reply_to="r", expiration="60000",
                                 message_id="m", timestamp=1716912345, type="t",
                                 user_id="guest", app_id="a", cluster_id="cl")
    frame = _header_frame(props, _table_bytes(EVERY_KIND))
    _same(decode_frame(frame), pika_decode(frame))
    headers = decode_frame(frame)[1].properties.headers
    assert headers["t1"] is True and headers["d"] == -1500000000 and headers["S"] == "h\u00e9llo"
    assert headers["S-bad-utf8"] == b"\xff\xfe" and headers[b"\xff-bad-key"] is None
    # what qops itself sends: every property pika can encode, headers as _amqp_table makes
    from qops.protocol import build_task_message
    from qops.transports.amqp.props import _basic_properties

    msg = build_task_message("proj.add", (1, 2.5), {"k": [1, {"x": None}]}, priority=3)
    msg.headers["sent"] = 1716912345.25
    frame = pika.frame.Header(7, 99, _basic_properties(msg, 2)).marshal()
    _same(decode_frame(frame), pika_decode(frame))
    for bare in (pika.BasicProperties(), pika.BasicProperties(headers={"a": 1})):
        frame = pika.frame.Header(1, 0, bare).marshal()
        _same(decode_frame(frame), pika_decode(frame))


def test_fast_frame_decoder_other_frames_and_partial_data() -> None:
    from pika.frame import decode_frame as pika_decode

    from qops.transports.amqp import decode_frame

    deliver = pika.frame.Method(3, pika.spec.Basic.Deliver(
        "ctag-\u00e9", 2 ** 40, True, "ex", "rk")).marshal()
    frames = [
        deliver,
        pika.frame.Method(3, pika.spec.Basic.Deliver("", 1, False, "", "")).marshal(),
        pika.frame.Method(1, pika.spec.Basic.Ack(5, multiple=True)).marshal(),
        pika.frame.Body(3, b"body bytes").marshal(),
        pika.frame.Heartbeat().marshal(),
        pika.frame.Header(2, 5, pika.BasicProperties()).marshal(),
    ]
    for f in frames:
        _same(decode_frame(f + b"trailing"), pika_decode(f + b"trailing"))
        for cut in range(len(f)):  # incomplete: nothing decoded yet
            assert decode_frame(f[:cut]) == (0, None) == pika_decode(f[:cut])
    assert decode_frame(b"AMQP\x00\x00\x09\x01")[0] == 8  # protocol header: pika's path
    with pytest.raises(pika.exceptions.InvalidFrameError):
        decode_frame(deliver[:-1] + b"\x00")
    bad = _header_frame(pika.BasicProperties(headers={}), _table_bytes([(b"k", b"Z")]))
    with pytest.raises(pika.exceptions.InvalidFieldTypeException):
        decode_frame(bad)


# -- against the broker -------------------------------------------------------------------


@pytest.fixture
def admin(amqp_url: str) -> Iterator[Any]:
    """A raw pika channel in the test vhost, to set things up the way other clients do."""
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    yield conn.channel()
    conn.close()


@pytest.fixture
def queues(admin: Any) -> Iterator[list[str]]:
    """Unique queue names; every one is deleted afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        admin.queue_delete(name)


def new_queue(queues: list[str]) -> str:
    name = f"amqp-{uuid.uuid4().hex[:10]}"
    queues.append(name)
    return name


@pytest.fixture
def transport(amqp_url: str) -> Iterator[AMQPTransport]:
    t = AMQPTransport(amqp_url, TransportOptions())
    yield t
    t.close()


def task(n: int, **props: Any) -> Message:
    return Message(body=f"[[{n}], {{}}, {{}}]".encode(), headers={"task": "t", "id": f"id-{n}"},
                   properties={"correlation_id": f"id-{n}", **props})


def get_one(consumer: Any, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d = consumer.get(0.2)
        if d is not None:
            return d
    raise AssertionError("no message arrived")


def test_queue_declared_by_celery_without_priority_still_works(
        transport: AMQPTransport, admin: Any, queues: list[str]) -> None:
    q = new_queue(queues)
    admin.queue_declare(q, durable=True)  # what Celery does: no x-max-priority
    transport.publish(q, task(1, priority=9))  # our declare gets 406, then goes passive
    assert transport.queue_exists(q)
    c = transport.consumer([q], prefetch=1)  # a fresh connection declares again: same
    try:
        d = get_one(c)
        assert d.message.headers["id"] == "id-1" and d.message.properties["priority"] == 9
        c.ack(d)
    finally:
        c.close()
    # the queue was left as Celery made it
    assert admin.queue_declare(q, durable=True).method.message_count == 0


def test_queues_get_x_max_priority_when_asked(transport: AMQPTransport, admin: Any,
                                              amqp_url: str, queues: list[str],
                                              caplog: pytest.LogCaptureFixture) -> None:
    # (a declare with the same arguments succeeds, any other one is a 406)
    plain = new_queue(queues)
    with caplog.at_level("WARNING", logger="qops.transports.amqp.transport"):
        transport.publish(plain, task(1))  # no priority: nothing to say
        assert not caplog.records
        transport.publish(plain, task(2, priority=5))
        transport.publish(plain, task(3, priority=5))
    admin.queue_declare(plain, durable=True)  # no x-max-priority by default
    [said] = [r.getMessage() for r in caplog.records]  # once per transport
    assert "has a priority" in said and "task_queue_max_priority" in said
    caplog.clear()

    ranked = new_queue(queues)
    options = TransportOptions(declarations=Declarations(max_priority=9))
    with AMQPTransport(amqp_url, options) as t:
        t.publish(ranked, task(1, priority=5))
    admin.queue_declare(ranked, durable=True, arguments={"x-max-priority": 9})
    assert not caplog.records


def test_redelivered_flag(transport: AMQPTransport, queues: list[str]) -> None:
    q = new_queue(queues)
    transport.publish(q, task(1))
    c = transport.consumer([q], prefetch=1)
    first = get_one(c)
    assert first.redelivered is False
    c.close()  # not acked: back to the queue
    c = transport.consumer([q], prefetch=1)
    try:
        again = get_one(c)
        assert again.message.headers["id"] == "id-1" and again.redelivered is True
        c.ack(again)
    finally:
        c.close()


def test_a_consumer_whose_channel_the_broker_closed_consumes_again(
        transport: AMQPTransport, queues: list[str]) -> None:
    """RabbitMQ closes the channel of a delivery held past its consumer_timeout (406
    'delivery acknowledgement on channel 1 timed out') and keeps the connection: the
    consumer reconnects and consumes again (it sat on an open connection with no
    consumer, for good, while status said OK). Provoked here with another 406, an ack of
    an unknown tag on the consumer's channel."""
    q = new_queue(queues)
    transport.publish(q, task(1))
    c = transport.consumer([q], prefetch=2)
    try:
        first = get_one(c)
        assert c._link is not None
        c._link.main().basic_ack(999_999)  # the broker closes the channel for it
        transport.publish(q, task(2))
        ids = {get_one(c).message.headers["id"] for _ in range(2)}
        assert ids == {"id-1", "id-2"}  # the held one came back, and the new one
        c.ack(first)  # from the closed channel: ignored
    finally:
        c.close()


def test_give_back_returns_what_was_taken_without_a_redelivered_flag(
        transport: AMQPTransport, queues: list[str]) -> None:
    """A consumer closing on purpose (a pool child recycled by --max-tasks-per-child, a
    warm shutdown) gives back what it took and did not start -- handed out, or still in
    its buffer -- as copies at the queue's tail, not as redeliveries: a redelivery counts
    as a worker loss, and a child recycled every few tasks had healthy messages
    dead-lettered."""
    q = new_queue(queues)
    for n in range(6):
        transport.publish(q, task(n))
    c = transport.consumer([q], prefetch=4)
    got = [get_one(c) for _ in range(2)]
    c.ack(got[0])
    c.give_back([got[1]])  # the other two are in its buffer
    c = transport.consumer([q], prefetch=10)
    try:
        seen = []
        for _ in range(5):
            d = get_one(c)
            seen.append((d.message.headers["id"], d.redelivered))
            c.ack(d)
        assert not any(redelivered for _, redelivered in seen)
        assert sorted(i for i, _ in seen) == [f"id-{n}" for n in range(1, 6)]
        assert c.get(0.3) is None  # once each
    finally:
        c.close()


def test_ack_from_another_thread_is_applied(transport: AMQPTransport,
                                            queues: list[str]) -> None:
    q = new_queue(queues)
    transport.publish(q, task(1))
    transport.publish(q, task(2))
    c = transport.consumer([q], prefetch=2)
    got = [get_one(c), get_one(c)]
    acker = threading.Thread(target=lambda: [c.ack(d) for d in got])
    acker.start()
    acker.join()
    c.close()  # flushes the acks queued by the other thread before closing
    c = transport.consumer([q], prefetch=2)
    try:
        assert c.get(0.5) is None
    finally:
        c.close()
    [stats] = transport.queue_stats([q])
    assert (stats.ready, stats.in_flight) == (0, 0)


def test_ack_from_another_thread_frees_prefetch_while_get_waits(
        transport: AMQPTransport, queues: list[str]) -> None:
    q = new_queue(queues)
    transport.publish(q, task(1))
    transport.publish(q, task(2))
    c = transport.consumer([q], prefetch=1)
    try:
        first = get_one(c)
        timer = threading.Timer(0.2, c.ack, args=(first,))
        timer.start()
        started = time.monotonic()
        second = c.get(5.0)  # blocked by prefetch until the other thread acks
        assert second is not None and second.message is not None
        assert second.message.headers["id"] == "id-2"
        assert time.monotonic() - started < 2.0
        c.ack(second)
    finally:
        c.close()


def test_add_queue_from_another_thread_while_get_waits(transport: AMQPTransport,
                                                      queues: list[str]) -> None:
    q, other = new_queue(queues), new_queue(queues)
    transport.publish(other, task(7))
    c = transport.consumer([q], prefetch=1)
    try:
        threading.Timer(0.2, c.add_queue, args=(other,)).start()
        d = c.get(5.0)
        assert d is not None and d.queue == other
        c.ack(d)
    finally:
        c.close()


def test_unreachable_broker_fails_fast() -> None:
    t = AMQPTransport("amqp://guest:secret@127.0.0.1:1//", TransportOptions(connect_timeout=2))
    started = time.monotonic()
    with pytest.raises(BrokerUnreachable) as err:
        t.publish("q", task(1))
    assert time.monotonic() - started < 3
    text = str(err.value)
    assert "secret" not in text and "127.0.0.1:1" in text and "\n" not in text
    with pytest.raises(BrokerUnreachable):
        t.ping()


def test_a_broker_that_drops_the_connection_at_once_is_unreachable() -> None:
    """A listener that accepts and resets at once, as a broker going down mid-connect
    does: sometimes pika's own check of the fresh socket fails first, with a ValueError
    (about 1 connect in 50 here: 100 attempts show it 7 times in 8). Every attempt must
    end in BrokerUnreachable."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)

    def reset_all() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return  # closed: the test is over
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    thread = threading.Thread(target=reset_all, daemon=True)
    thread.start()
    t = AMQPTransport(f"amqp://guest:guest@127.0.0.1:{server.getsockname()[1]}/",
                      TransportOptions(connect_timeout=2))
    try:
        for _ in range(100):
            with pytest.raises(BrokerUnreachable):
                t.connect("publisher")
    finally:
        server.close()
        thread.join(5)


def test_wrong_credentials(amqp_vhost: str) -> None:
    from tests.conftest import AMQP_HOST, AMQP_PORT

    t = AMQPTransport(f"amqp://guest:wrong-{uuid.uuid4().hex[:6]}@{AMQP_HOST}:{AMQP_PORT}/"
                      f"{amqp_vhost}")
    with pytest.raises(BrokerUnreachable, match="refused the login"):
        t.ping()


def test_missing_vhost(amqp_vhost: str) -> None:
    from tests.conftest import AMQP_HOST, AMQP_PORT

    t = AMQPTransport(f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/no-such-vhost-{amqp_vhost}")
    with pytest.raises(BrokerUnreachable, match="add_vhost"):
        t.ping()


def test_header_values_pika_cannot_encode(transport: AMQPTransport,
                                          queues: list[str]) -> None:
    q = new_queue(queues)
    headers = {"task": "t", "timelimit": (300.0, 1.5), "eta": None, "stamps": {"w": 0.25},
               "sent": 1716912345.678, "big": 2 ** 70}
    transport.publish(q, Message(body=b"[]", headers=headers))
    c = transport.consumer([q], prefetch=1)
    try:
        h = get_one(c).message.headers
        assert h["timelimit"] == [300, 1.5] and h["stamps"] == {"w": 0.25}
        assert h["sent"] == 1716912346  # too many digits for an AMQP decimal: rounded
        assert h["big"] == str(2 ** 70) and h["eta"] is None
    finally:
        c.close()
    with pytest.raises(PublishError, match="set"):
        transport.publish(q, Message(body=b"[]", headers={"bad": {1, 2}}))
    transport.publish(q, task(2))  # the connection survived the refused message


def test_properties_round_trip(transport: AMQPTransport, queues: list[str]) -> None:
    q = new_queue(queues)
    transport.publish(q, task(1, reply_to="r", priority=3, expiration="60000"))
    c = transport.consumer([q], prefetch=1)
    try:
        p = get_one(c).message.properties
        assert (p["correlation_id"], p["reply_to"], p["priority"], p["delivery_mode"],
                p["expiration"]) == ("id-1", "r", 3, 2, "60000")
    finally:
        c.close()


def test_dead_letter_keeps_and_restores_original_headers(
        transport: AMQPTransport, queues: list[str]) -> None:
    q = new_queue(queues)
    transport.publish(q, task(1, reply_to="r", expiration="600000", priority=4))
    c = transport.consumer([q], prefetch=1)
    try:
        c.reject(get_one(c), "unknown task")
        [dl] = [x for x in transport.dead_letters(1000) if x.queue == q]
        assert dl.reason == "unknown task" and abs(dl.time - time.time()) < 60
        # listing leaves them in place
        assert [x.id for x in transport.dead_letters(1000) if x.queue == q] == [dl.id]
        assert transport.requeue_dead_letters([dl.id]) == 1
        again = get_one(c)
        assert again.message.headers == {"task": "t", "id": "id-1"}  # no x-qops-*
        p = again.message.properties
        assert (p["correlation_id"], p["reply_to"], p["expiration"], p["priority"]) == (
            "id-1", "r", "600000", 4)
        c.ack(again)
    finally:
        c.close()
    assert [x for x in transport.dead_letters(1000) if x.queue == q] == []


def test_requeue_finds_a_dead_letter_another_channel_holds(transport: AMQPTransport,
                                                           queues: list[str],
                                                           amqp_url: str) -> None:
    """A dead letter that someone else browses at that moment (``qops dlq list`` holds
    what it reads until its channel closes) is found once it is back in the DLQ."""
    q = new_queue(queues)
    transport.dead_letter(q, b"held", "invalid JSON envelope")
    [dl] = [x for x in transport.dead_letters(1000) if x.queue == q]
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        browser = conn.channel()
        method, _, body = browser.basic_get(transport.dead_letter_queue, auto_ack=False)
        assert method is not None and body == b"held"
        moved: list[int] = []
        requeue = threading.Thread(
            target=lambda: moved.append(transport.requeue_dead_letters([dl.id])))
        requeue.start()
        time.sleep(0.3)  # the requeue looks while the browser holds it
        browser.close()
        requeue.join(10)
    finally:
        conn.close()
    assert moved == [1]
    assert transport.purge(q) == 1
    started = time.monotonic()
    assert transport.requeue_dead_letters(["no-such-id"]) == 0
    assert time.monotonic() - started < FIND_AGAIN + 2


def test_dlq_operations_wait_for_what_a_closed_channel_held(transport: AMQPTransport,
                                                            queues: list[str],
                                                            amqp_url: str) -> None:
    """``_put_back`` (after a listing or a requeue pass) returns once the DLQ's ready
    messages are back to what it had: here two held by another channel come back
    0.3 s later; with nothing missing it returns at once, and it gives up after
    FIND_AGAIN when they never come back."""
    from qops.transports.amqp.deadletters import _put_back

    q = new_queue(queues)
    for i in range(2):
        transport.dead_letter(q, b"x%d" % i, "invalid JSON envelope")
    dlq = transport.dead_letter_queue
    link, _ = transport._link()
    ready = link.declare_queue(dlq, None).method.message_count
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        browser = conn.channel()
        browser.basic_qos(prefetch_count=0)
        for _ in range(ready):
            assert browser.basic_get(dlq, auto_ack=False)[0] is not None
        done: list[float] = []
        waiter = threading.Thread(target=lambda: (_put_back(link, dlq, ready),
                                                  done.append(time.monotonic())))
        started = time.monotonic()
        waiter.start()
        time.sleep(0.3)
        assert not done  # still waiting: they are held
        browser.close()  # RabbitMQ puts them back
        waiter.join(5)
    finally:
        conn.close()
    assert done and 0.3 <= done[0] - started < FIND_AGAIN + 1
    started = time.monotonic()
    _put_back(link, dlq, ready)
    assert time.monotonic() - started < 0.5
    started = time.monotonic()
    _put_back(link, dlq, ready + 1)  # one that never comes
    assert FIND_AGAIN <= time.monotonic() - started < FIND_AGAIN + 1
    transport.purge_dead_letters()


def test_dead_letters_can_be_listed_from_raw_bytes(transport: AMQPTransport,
                                                   queues: list[str]) -> None:
    q = new_queue(queues)
    transport.dead_letter(q, b"not json", "invalid JSON envelope")
    transport.dead_letter(q, b"also not json", "invalid JSON envelope")
    mine = [x for x in transport.dead_letters(1000) if x.queue == q]
    assert [x.raw for x in mine] == [b"not json", b"also not json"]  # in order
    assert transport.requeue_dead_letters([mine[1].id]) == 1
    assert [x.raw for x in transport.dead_letters(1000) if x.queue == q] == [b"not json"]
    assert transport.purge(q) == 1
    assert transport.requeue_dead_letters([mine[0].id]) == 1
    assert transport.purge(q) == 1


def test_in_flight_is_counted_and_dlq_not_listed(transport: AMQPTransport,
                                                 queues: list[str]) -> None:
    q = new_queue(queues)
    for i in range(3):
        transport.publish(q, task(i))
    c = transport.consumer([q], prefetch=2)
    try:
        got = [get_one(c), get_one(c)]
        [s] = [s for s in transport.queue_stats() if s.name == q]
        assert (s.ready, s.in_flight, s.consumers) == (1, 2, 1)
        assert transport.dead_letter_queue not in [s.name for s in transport.queue_stats()]
        for d in got:
            c.ack(d)
    finally:
        c.close()
    assert transport.purge(q + "-never-declared") == 0


def test_batched_acks_leave_held_and_buffered_deliveries_alone(
        transport: AMQPTransport, queues: list[str]) -> None:
    """Acks above a delivery still held (and below those still buffered) are written as
    a batch: none may settle the held one, nor a buffered one (basic.ack multiple)."""
    q = new_queue(queues)
    for i in range(10):
        transport.publish(q, task(i))
    c = transport.consumer([q], prefetch=4)
    c.ack_batch = 2
    try:
        first, *rest = [get_one(c) for _ in range(3)]
        for d in rest:
            c.ack(d)
        for _ in range(3):  # the batch goes out while `first` is held and more are buffered
            c.ack(get_one(c))
        deadline = time.monotonic() + 5
        while c.held(q) < 4 and time.monotonic() < deadline:
            c.keepalive()  # the broker refills the window; buffered ones count as held
        assert c.held(q) == 4  # `first` and 3 buffered
        assert [s.in_flight for s in transport.queue_stats([q])] == [4]
    finally:
        c.close()  # `first` and the buffered ones go back
    deadline = time.monotonic() + 5
    while transport.queue_stats([q])[0].ready != 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert transport.queue_stats([q])[0].ready == 5  # 5 acked


def test_publisher_replaces_a_closed_connection(transport: AMQPTransport,
                                                queues: list[str]) -> None:
    q = new_queue(queues)
    transport.publish(q, task(1))
    transport._local.link.conn.close()  # as if the broker had dropped it
    transport.publish(q, task(2))
    assert transport.queue_stats([q])[0].ready == 2


def test_publish_after_queue_deleted_declares_it_again(
        transport: AMQPTransport, admin: Any, queues: list[str]) -> None:
    q = new_queue(queues)
    transport.publish(q, task(1))
    admin.queue_delete(q)  # our cached declare is stale: the publish comes back unroutable
    transport.publish(q, task(2))
    assert transport.queue_stats([q])[0].ready == 1


def test_consumer_reconnects_and_stale_acks_are_ignored(transport: AMQPTransport,
                                                        queues: list[str]) -> None:
    q = new_queue(queues)
    transport.publish(q, task(1))
    transport.publish(q, task(2))
    c = transport.consumer([q], prefetch=1)
    try:
        old = get_one(c)
        assert not c.stale(old)
        assert c._link is not None  # type: ignore[attr-defined]
        c._link.conn.close()  # type: ignore[attr-defined]  # the broker requeues id-1
        back = get_one(c)
        assert back.message.headers["id"] == "id-1" and back.redelivered
        assert c.stale(old) and not c.stale(back)  # the worker must not run `old`
        c.ack(old)  # a tag from the dead channel: must not ack the new delivery
        c.ack(back)
        nxt = get_one(c)
        assert nxt.message.headers["id"] == "id-2"
        c.ack(nxt)
        assert c.get(0.3) is None
    finally:
        c.close()
    assert transport.queue_stats([q])[0].ready == 0


def test_broadcast_without_subscribers_is_fine(transport: AMQPTransport, admin: Any) -> None:
    channel = f"bc-{uuid.uuid4().hex[:8]}"
    transport.broadcast(channel, Message(body=b"{}", headers={"clock": 1, "expires": 1.5}))
    admin.exchange_delete(channel)


def test_subscription_survives_a_lost_connection(transport: AMQPTransport,
                                                 admin: Any) -> None:
    channel = f"bc-{uuid.uuid4().hex[:8]}"
    sub = transport.subscribe(channel)
    try:
        sub._link.conn.close()  # type: ignore[attr-defined]
        assert sub.get(0.3) is None  # resubscribes
        transport.broadcast(channel, Message(body=b'{"method": "ping"}'))
        m = sub.get(3.0)
        assert m is not None and m.body == b'{"method": "ping"}'
    finally:
        sub.close()
    admin.exchange_delete(channel)


def test_add_queue_refused_by_the_broker_leaves_the_others_running(
        transport: AMQPTransport, queues: list[str]) -> None:
    q = new_queue(queues)
    transport.publish(q, task(1))
    transport.publish(q, task(2))
    c = transport.consumer([q], prefetch=1)
    try:
        first = get_one(c)
        c.add_queue("amq.reserved-name")  # 403 ACCESS_REFUSED on declare
        c.ack(first)
        second = get_one(c)  # same connection: first was acked, not redelivered
        assert second.message.headers["id"] == "id-2" and not second.redelivered
        assert c.queues == [q]
        c.ack(second)
    finally:
        c.close()


# -- reply queues bound like kombu's, event streams, the node registry ---------------------


def test_reply_queue_is_reachable_through_the_reply_exchange(
        transport: AMQPTransport, admin: Any) -> None:
    """A Celery worker replies to a pidbox request by publishing to the direct exchange
    ``reply.<mailbox>`` with routing key ``<oid>``: that must reach the reply consumer."""
    mailbox = f"mb-{uuid.uuid4().hex[:8]}.pidbox"
    oid = uuid.uuid4().hex
    name = f"{oid}.reply.{mailbox}"
    c = transport.reply_consumer(name, exchange=f"reply.{mailbox}", routing_key=oid)
    try:
        # declared exactly as kombu declares it: the same declare is no 406
        admin.exchange_declare(f"reply.{mailbox}", "direct", durable=False, auto_delete=False)
        admin.basic_publish(f"reply.{mailbox}", oid, b'{"w1@h": {"ok": "pong"}}',
                            pika.BasicProperties(headers={"ticket": "t-1"}))
        admin.basic_publish(f"reply.{mailbox}", "someone-else", b"not for us")
        d = get_one(c)
        assert d.message.body == b'{"w1@h": {"ok": "pong"}}'
        assert d.message.headers == {"ticket": "t-1"}
        c.ack(d)
        assert c.get(0.3) is None
        transport.send_reply(name, Message(body=b"direct"))  # the qops way still works
        d = get_one(c)
        assert d.message.body == b"direct"
        c.ack(d)
    finally:
        c.close()
    # the exchange outlives the reply queue, as kombu's does
    admin.exchange_declare(f"reply.{mailbox}", passive=True)
    admin.exchange_delete(f"reply.{mailbox}")


def test_reply_exchange_made_by_celery_first(transport: AMQPTransport, admin: Any) -> None:
    mailbox = f"mb-{uuid.uuid4().hex[:8]}.pidbox"
    admin.exchange_declare(f"reply.{mailbox}", "direct", durable=False, auto_delete=False)
    oid = uuid.uuid4().hex
    c = transport.reply_consumer(f"{oid}.reply.{mailbox}", exchange=f"reply.{mailbox}",
                                 routing_key=oid)
    try:
        admin.basic_publish(f"reply.{mailbox}", oid, b"reply")
        assert get_one(c).message.body == b"reply"
    finally:
        c.close()
        admin.exchange_delete(f"reply.{mailbox}")


def test_reply_binding_comes_back_after_a_reconnect(transport: AMQPTransport,
                                                   admin: Any) -> None:
    mailbox = f"mb-{uuid.uuid4().hex[:8]}.pidbox"
    oid = uuid.uuid4().hex
    c = transport.reply_consumer(f"{oid}.reply.{mailbox}", exchange=f"reply.{mailbox}",
                                 routing_key=oid)
    try:
        assert c._link is not None  # type: ignore[attr-defined]
        c._link.conn.close()  # type: ignore[attr-defined]
        assert c.get(0.3) is None  # reconnects: a new queue, bound again
        admin.basic_publish(f"reply.{mailbox}", oid, b"after")
        assert get_one(c).message.body == b"after"
    finally:
        c.close()
        admin.exchange_delete(f"reply.{mailbox}")


def test_topic_patterns(transport: AMQPTransport, admin: Any) -> None:
    channel = f"ev-{uuid.uuid4().hex[:8]}"
    subs = {p: transport.subscribe(channel, pattern=p)
            for p in ("#", "task.#", "*.heartbeat", "worker.online")}
    try:
        # the events exchange is a durable topic exchange, as Celery's celeryev
        admin.exchange_declare(channel, "topic", durable=True, auto_delete=False)
        for key in ("worker.online", "worker.heartbeat", "task.succeeded", "task.multi"):
            transport.broadcast(channel, Message(body=key.encode()), routing_key=key)

        def drain(sub: Any) -> list[bytes]:
            out = []
            while (m := sub.get(0.5)) is not None:
                out.append(m.body)
            return out

        assert drain(subs["#"]) == [b"worker.online", b"worker.heartbeat", b"task.succeeded",
                                    b"task.multi"]
        assert drain(subs["task.#"]) == [b"task.succeeded", b"task.multi"]
        assert drain(subs["*.heartbeat"]) == [b"worker.heartbeat"]
        assert drain(subs["worker.online"]) == [b"worker.online"]
    finally:
        for sub in subs.values():
            sub.close()
        admin.exchange_delete(channel)


def test_events_exchange_made_by_celery(transport: AMQPTransport, admin: Any) -> None:
    """Celery declares ``celeryev`` as a durable topic exchange: the same declare as ours."""
    channel = f"celeryev-{uuid.uuid4().hex[:8]}"
    admin.exchange_declare(channel, "topic", durable=True, auto_delete=False)
    sub = transport.subscribe(channel, pattern="task.#")
    try:
        transport.broadcast(channel, Message(body=b"e1"), routing_key="task.received")
        m = sub.get(3.0)
        assert m is not None and m.body == b"e1"
    finally:
        sub.close()
        admin.exchange_delete(channel)


def test_events_exchange_made_otherwise_is_used_as_it_is(amqp_url: str, admin: Any) -> None:
    """A topic exchange declared with other settings (here: not durable) makes our declare
    a 406; we go passive and use it anyway, for publishing and subscribing."""
    channel = f"ev-{uuid.uuid4().hex[:8]}"
    admin.exchange_declare(channel, "topic", durable=False, auto_delete=False)
    t = AMQPTransport(amqp_url)
    sub = t.subscribe(channel, pattern="#")
    try:
        t.broadcast(channel, Message(body=b"e1"), routing_key="worker.heartbeat")
        m = sub.get(3.0)
        assert m is not None and m.body == b"e1"
        t.broadcast(channel, Message(body=b"ctl"))  # the fanout path goes passive too
    finally:
        sub.close()
        t.close()
        admin.exchange_delete(channel)


def test_events_survive_their_exchange_being_deleted(transport: AMQPTransport,
                                                     admin: Any) -> None:
    channel = f"ev-{uuid.uuid4().hex[:8]}"
    transport.broadcast(channel, Message(body=b"nobody listens"), routing_key="task.sent")
    admin.exchange_delete(channel)
    # unconfirmed: the 404 may come back only with the next publish, which declares the
    # exchange again; neither raises
    for _ in range(3):
        transport.broadcast(channel, Message(body=b"again"), routing_key="task.sent")
        time.sleep(0.1)
    sub = transport.subscribe(channel, pattern="#")
    try:
        transport.broadcast(channel, Message(body=b"seen"), routing_key="task.sent")
        m = sub.get(3.0)
        assert m is not None and m.body == b"seen"
    finally:
        sub.close()
        admin.exchange_delete(channel)


def test_events_do_not_wait_for_confirms(transport: AMQPTransport, admin: Any,
                                         queues: list[str]) -> None:
    channel = f"ev-{uuid.uuid4().hex[:8]}"
    sub = transport.subscribe(channel, pattern="#")
    try:
        for i in range(500):
            transport.broadcast(channel, Message(body=str(i).encode()), routing_key="task.x")
        got: list[int] = []
        while len(got) < 500 and (m := sub.get(3.0)) is not None:
            got.append(int(m.body))
        assert got == list(range(500))  # all of them, in order
        # the task queues still publish confirmed on the same connection
        q = new_queue(queues)
        transport.publish(q, task(1))
        assert transport.queue_stats([q])[0].ready == 1
    finally:
        sub.close()
        admin.exchange_delete(channel)


def test_live_nodes_counts_registered_nodes(amqp_url: str) -> None:
    t1, t2 = AMQPTransport(amqp_url), AMQPTransport(amqp_url)
    base = t1.live_nodes()
    assert isinstance(base, int)
    a, b, c = (f"{x}-{uuid.uuid4().hex[:6]}@h" for x in "abc")
    try:
        t1.register_node(a, {}, ttl=10)
        t1.register_node(a, {}, ttl=10)  # every heartbeat: still one consumer
        t1.register_node(b, {}, ttl=10)
        t2.register_node(c, {}, ttl=10)
        assert t2.live_nodes() == base + 3
        t1.unregister_node(a)
        assert t1.live_nodes() == base + 2
        t1.unregister_node(b)  # the last one: the connection closes
        t1.unregister_node(b)  # twice is fine
        assert t1.live_nodes() == base + 1
        t1.register_node(a, {}, ttl=10)  # again, on a new connection
        assert t1.live_nodes() == base + 2
    finally:
        t1.close()  # drops its registrations
        t2.unregister_node(c)
        t2.close()
    assert AMQPTransport(amqp_url).live_nodes() == base


def test_registration_comes_back_after_a_lost_connection(amqp_url: str) -> None:
    t = AMQPTransport(amqp_url)
    base = t.live_nodes()
    name = f"n-{uuid.uuid4().hex[:6]}@h"
    try:
        t.register_node(name, {}, ttl=10)
        link = t._presence._link
        assert link is not None
        link.conn.close()  # as if the broker had dropped it
        assert t.live_nodes() == base
        t.register_node(name, {}, ttl=10)  # the next heartbeat registers again
        assert t.live_nodes() == base + 1
    finally:
        t.close()


CHILD = """
import sys, time
from qops.transports.amqp import AMQPTransport
t = AMQPTransport(sys.argv[1])
t.register_node(sys.argv[2], {}, ttl=10)
print("ready", flush=True)
time.sleep(60)
"""


def test_a_killed_node_drops_out_at_once(amqp_url: str) -> None:
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    t = AMQPTransport(amqp_url)
    base = t.live_nodes()
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, amqp_url, f"k-{uuid.uuid4().hex[:6]}@h"],
        stdout=subprocess.PIPE, text=True, cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)})
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        assert t.live_nodes() == base + 1
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        deadline = time.monotonic() + 2.0
        while t.live_nodes() != base and time.monotonic() < deadline:
            time.sleep(0.05)
        assert t.live_nodes() == base
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        t.close()


# -- exempt deliveries (ETA tasks held by the worker) --------------------------------------


def _ids(deliveries: list[Any]) -> list[str]:
    return [d.message.headers["id"] for d in deliveries]


def test_exempt_delivery_frees_its_prefetch_slot(transport: AMQPTransport,
                                                 queues: list[str]) -> None:
    q = new_queue(queues)
    for i in range(3):
        transport.publish(q, task(i))
    c = transport.consumer([q], prefetch=1)
    try:
        held = get_one(c)
        assert c.get(0.3) is None  # the slot is taken
        c.exempt(held)  # the window grows by one
        nxt = get_one(c)
        assert nxt.message.headers["id"] == "id-1"
        assert c.get(0.3) is None  # prefetch 1 again
        c.ack(nxt)
        c.ack(held)  # the window shrinks back: frees nothing more than its own slot
        last = get_one(c)
        assert last.message.headers["id"] == "id-2"
        assert c.get(0.3) is None
        c.ack(last)
    finally:
        c.close()
    assert transport.queue_stats([q])[0].ready == 0


def test_many_exempt_deliveries_and_the_window_shrinking_back(
        transport: AMQPTransport, queues: list[str]) -> None:
    q = new_queue(queues)
    for i in range(12):
        transport.publish(q, task(i))
    c = transport.consumer([q], prefetch=2)
    try:
        held: list[Any] = []
        for _ in range(4):  # hold 8, two at a time, from another thread as well
            pair = [get_one(c), get_one(c)]
            assert c.get(0.2) is None
            t = threading.Thread(target=lambda p=pair: [c.exempt(d) for d in p])  # type: ignore[func-returns-value]
            t.start()
            t.join()
            held += pair
        assert _ids(held) == [f"id-{i}" for i in range(8)]
        counted = [get_one(c), get_one(c)]
        assert c.get(0.3) is None
        for d in held:  # settle every exempt one: the window is back to 2...
            c.ack(d)
        assert c.get(0.3) is None  # ... and both slots are still taken
        for d in counted:
            c.ack(d)
        rest = [get_one(c), get_one(c)]
        assert _ids(rest) == ["id-10", "id-11"]
        for d in rest:
            c.requeue(d) if d is rest[0] else c.ack(d)
        again = get_one(c)
        assert again.message.headers["id"] == "id-10" and again.redelivered
        c.ack(again)
    finally:
        c.close()
    assert transport.queue_stats([q])[0].ready == 0


def test_exempt_after_a_reconnect_is_a_no_op(transport: AMQPTransport,
                                            queues: list[str]) -> None:
    q = new_queue(queues)
    transport.publish(q, task(1))
    c = transport.consumer([q], prefetch=1)
    try:
        old = get_one(c)
        c._link.conn.close()  # type: ignore[attr-defined]
        back = get_one(c)  # redelivered on the new connection
        c.exempt(old)  # a tag from the dead channel: nothing to exempt
        assert c.get(0.3) is None  # so the slot is still taken by `back`
        c.ack(back)
    finally:
        c.close()


def test_quorum_queue_gets_a_per_consumer_prefetch(transport: AMQPTransport, admin: Any,
                                                   queues: list[str]) -> None:
    """A quorum queue (Celery 5.5's task_default_queue_type) refuses a channel-wide
    prefetch by closing the connection: the consumer falls back to a per-consumer one."""
    q = new_queue(queues)
    admin.queue_declare(q, durable=True, arguments={"x-queue-type": "quorum"})
    for i in range(3):
        transport.publish(q, task(i))  # our declare is a 406: used as it is
    c = transport.consumer([q], prefetch=1)
    try:
        first = get_one(c)
        assert c.get(0.3) is None  # prefetch 1 still holds
        with pytest.raises(NotImplementedError):
            c.exempt(first)  # the worker then lets the held message keep its slot
        c.ack(first)
        assert _ids([get_one(c)]) == ["id-1"]
    finally:
        c.close()


def test_a_message_over_the_size_limit_can_be_dead_lettered(amqp_url: str,
                                                            queues: list[str]) -> None:
    """A worker with a small max_message_size dead-letters what it can't take: the
    limit guards what we publish, not what the broker already holds."""
    q = new_queue(queues)
    producer = AMQPTransport(amqp_url)  # the default limit
    worker = AMQPTransport(amqp_url, TransportOptions(max_message_size=100))
    try:
        producer.publish(q, Message(body=b"x" * 1000, headers={"id": "big"}))
        c = worker.consumer([q], prefetch=1)
        try:
            d = get_one(c)
            c.reject(d, "message of 1000 bytes is over max_message_size (100)")
        finally:
            c.close()
        [dead] = [x for x in worker.dead_letters(1000) if x.queue == q]
        assert dead.raw == b"x" * 1000 and "100" in dead.reason
        assert worker.queue_stats([q])[0].ready == 0
        assert worker.purge_dead_letters() >= 1
    finally:
        producer.close()
        worker.close()
