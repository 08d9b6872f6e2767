"""Hostile raw messages on every transport: each one is dead-lettered with its reason,
nothing stays reserved, and the worker goes on.

The bytes go onto the queue the way a broken or foreign producer would put them there,
past qops's own publish: the broker state on memory, a row on SQLite, an LPUSH on Redis,
a pika publish on RabbitMQ (which has no envelope: its cases are the body and the AMQP
properties). The cases about the kombu envelope itself exist on the other three only.
"""

from __future__ import annotations

import base64
import bz2
import json
import lzma
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from qops.app import App
from qops.errors import ProtocolError
from qops.protocol import parse_task_message
from qops.transports.base import Transport
from tests.helpers import wait_until

GOOD_BODY = b"[[1, 2], {}, {}]"
DEEP = b"[" * 200_000 + b"]" * 200_000  # RecursionError in any recursive JSON decoder
#: the worker's task_max_message_size in these tests, which also caps decompression
LIMIT = 1024 * 1024
#: a few KB that decompress to more than LIMIT
GZIP_BOMB = zlib.compress(bytes(2 * LIMIT), 9)
BZ2_BOMB = bz2.compress(bytes(2 * LIMIT), 9)


@dataclass
class Case:
    """One hostile message: ``envelope`` is the raw bytes on memory/SQLite/Redis (None:
    no such case there); ``body``/``props`` what goes to RabbitMQ (``body`` None: none)."""

    id: str
    envelope: bytes | None
    body: bytes | None = None
    props: dict[str, Any] = field(default_factory=dict)


def kombu(body: Any, *, headers: Any = None, properties: Any = None,
          **fields: Any) -> bytes:
    """A kombu envelope with each field as given (nothing checked or encoded)."""
    env = {"body": body, "content-type": "application/json", "content-encoding": "utf-8",
           "headers": {} if headers is None else headers,
           "properties": {"body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
                          "priority": 0} if properties is None else properties}
    env.update(fields)
    return json.dumps(env).encode()


def task(case_id: str, headers: dict[str, Any], body: bytes = GOOD_BODY, *,
         content_type: str = "application/json", content_encoding: str = "utf-8",
         amqp: bool = True) -> Case:
    """A task message with bad headers or body: the same case on every transport."""
    envelope = kombu(base64.b64encode(body).decode(), headers=headers,
                     **{"content-type": content_type, "content-encoding": content_encoding})
    props = {"content_type": content_type, "content_encoding": content_encoding,
             "headers": headers}
    return Case(case_id, envelope, body if amqp else None, props)


def ok_headers(**changes: Any) -> dict[str, Any]:
    headers: dict[str, Any] = {"lang": "py", "task": "hostile.add", "id": str(uuid.uuid4()),
                               "retries": 0, "eta": None, "expires": None,
                               "timelimit": [None, None], "root_id": None}
    headers.update(changes)
    return {k: v for k, v in headers.items() if v is not DROP}


DROP = object()

CASES = [
    # -- the envelope (memory, SQLite, Redis) ------------------------------------------
    Case("not-json", b'{"body": "cut sho'),
    Case("not-utf8", b"\xff\xfe\x00\x80 not text"),
    Case("empty", b""),
    Case("json-array", b"[1, 2, 3]"),
    Case("json-string", b'"just a string"'),
    Case("json-null", b"null"),
    Case("no-body", json.dumps({"headers": {}, "properties": {}}).encode()),
    Case("body-not-base64", kombu("%%% not base64 %%%", headers=ok_headers())),
    Case("body-base64-list", kombu([1, 2], headers=ok_headers())),
    Case("body-a-number", kombu(12, headers=ok_headers(), properties={})),
    Case("headers-a-list", kombu(base64.b64encode(GOOD_BODY).decode(), headers=[1, 2])),
    Case("properties-a-string", kombu(base64.b64encode(GOOD_BODY).decode(),
                                      headers=ok_headers(), properties="nope")),
    Case("deep-envelope", DEEP),
    Case("content-type-a-list", kombu(base64.b64encode(GOOD_BODY).decode(),
                                      headers=ok_headers(),
                                      **{"content-type": ["application/json"]})),
    Case("content-encoding-a-number", kombu(base64.b64encode(GOOD_BODY).decode(),
                                            headers=ok_headers(),
                                            **{"content-encoding": 8})),
    # -- the task message (every transport) -------------------------------------------
    task("no-task-header", ok_headers(task=DROP)),
    task("task-not-a-string", ok_headers(task=42)),
    task("task-empty", ok_headers(task="")),
    task("task-a-list", ok_headers(task=["hostile.add"])),
    task("id-missing", ok_headers(id=DROP)),
    task("id-a-number", ok_headers(id=5)),
    task("args-not-a-list", ok_headers(), b'[{"a": 1}, {}, {}]'),
    task("kwargs-not-an-object", ok_headers(), b"[[1, 2], [3], {}]"),
    task("body-two-items", ok_headers(), b"[[1, 2], {}]"),
    task("body-an-object", ok_headers(), b'{"args": [1, 2]}'),
    task("body-not-json", ok_headers(), b"[[1, 2"),
    task("body-not-utf8", ok_headers(), b"\xff\xfe[[1, 2], {}, {}]"),
    task("body-deep", ok_headers(), DEEP),
    task("eta-not-a-date", ok_headers(eta="next tuesday")),
    task("eta-a-number", ok_headers(eta=12345)),
    task("eta-an-object", ok_headers(eta={"at": "now"})),
    task("expires-not-a-date", ok_headers(expires="never")),
    task("retries-negative", ok_headers(retries=-1)),
    task("retries-a-word", ok_headers(retries="many")),
    task("timelimit-a-word", ok_headers(timelimit=["long", None])),
    task("content-type-pickle", ok_headers(), content_type="application/x-python-serialize"),
    task("content-type-yaml", ok_headers(), content_type="application/x-yaml"),
    task("encoding-unknown", ok_headers(), content_encoding="rot-42"),
    task("encoding-binary", ok_headers(), content_encoding="binary"),
    task("unknown-task", ok_headers(task="hostile.nope")),
    task("wrong-arguments", ok_headers(), b"[[1, 2, 3], {}, {}]"),
    # compressed bodies (kombu's "compression" header): corrupt, cut short, unknown
    # codec, a "zip bomb" over the decompressed size cap (task_max_message_size), and
    # a body fine once decompressed but not a task
    task("gzip-corrupt", ok_headers(compression="application/x-gzip"), b"not zlib data"),
    task("gzip-truncated", ok_headers(compression="application/x-gzip"),
         zlib.compress(GOOD_BODY)[:-5]),
    task("gzip-bomb", ok_headers(compression="application/x-gzip"), GZIP_BOMB),
    task("bzip2-bomb", ok_headers(compression="application/x-bz2"), BZ2_BOMB),
    task("lzma-corrupt", ok_headers(compression="application/x-lzma"), b"\xfd7zXZ\x00junk"),
    task("xz-truncated", ok_headers(compression="xz"), lzma.compress(GOOD_BODY)[:-8]),
    task("compression-zstd", ok_headers(compression="application/zstd"), GOOD_BODY),
    task("compression-a-number", ok_headers(compression=3), GOOD_BODY),
    task("gzip-not-a-task", ok_headers(compression="gzip"), zlib.compress(b"[[1, 2")),
    # JSON can say Infinity; RabbitMQ's headers can't (pika has no float field)
    task("retries-infinite", ok_headers(retries=float("inf")), amqp=False),
    # RabbitMQ only: field-table types JSON does not have
    Case("task-a-byte-array", None, GOOD_BODY,
         {"content_type": "application/json", "headers": ok_headers(task=b"hostile.add")}),
    Case("id-a-byte-array", None, GOOD_BODY,
         {"content_type": "application/json", "headers": ok_headers(id=b"an-id")}),
]


# -- putting raw bytes on a queue ----------------------------------------------------------------


def kind_of(transport: Transport) -> str:
    return transport.scheme


def inject(transport: Transport, queue: str, case: Case) -> None:
    kind = kind_of(transport)
    if kind == "memory":
        st = transport.state  # type: ignore[attr-defined]
        with st.lock:
            st.queues.setdefault(queue, deque()).append(case.envelope)
            st.lock.notify_all()
    elif kind == "sqlite":
        with transport.db.write() as conn:  # type: ignore[attr-defined]
            conn.execute("INSERT OR IGNORE INTO queues (name) VALUES (?)", (queue,))
            conn.execute("INSERT INTO messages (queue, priority, payload) VALUES (?, 0, ?)",
                         (queue, case.envelope))
    elif kind == "redis":
        transport.bind([queue])  # type: ignore[attr-defined]
        base = transport.queue_keys(queue)[0]  # type: ignore[attr-defined]
        transport._client.lpush(base, case.envelope)  # type: ignore[attr-defined]
    else:
        import pika

        conn = pika.BlockingConnection(pika.URLParameters(transport.url.split("?")[0]))
        try:
            ch = conn.channel()
            ch.queue_declare(queue, durable=True)
            ch.basic_publish("", queue, case.body or b"",
                             pika.BasicProperties(delivery_mode=2, **case.props))
        finally:
            conn.close()


def applicable(transport: Transport) -> list[Case]:
    if kind_of(transport) == "amqp":
        return [c for c in CASES if c.body is not None]
    return [c for c in CASES if c.envelope is not None]


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def url(broker_url: str) -> str:
    """The broker, with a dead-letter queue of this test's own on RabbitMQ (the vhost is
    shared by the session)."""
    if broker_url.startswith("amqp"):
        return f"{broker_url}?dead_letter_queue=qops.dlq.{uuid.uuid4().hex[:10]}"
    return broker_url


RAN: list[int] = []  # what hostile.add returned, in this process


@pytest.fixture
def app(url: str) -> Iterator[App]:
    app = App("hostile", broker=url, task_max_message_size=LIMIT)

    @app.task(name="hostile.add")
    def add(x: int, y: int) -> int:
        RAN.append(x + y)
        return x + y

    RAN.clear()
    yield app
    app.close()


@pytest.fixture(params=["memory", "sqlite", "redis"])
def envelope_transport(request: pytest.FixtureRequest) -> Iterator[Transport]:
    """The transports whose messages are kombu envelopes."""
    from qops.transports.base import from_url
    from tests.contract import FAST

    t = from_url(str(request.getfixturevalue(f"{request.param}_url")), FAST)
    yield t
    t.close()


# -- the tests ----------------------------------------------------------------------------------


def test_every_hostile_message_is_dead_lettered_and_the_worker_goes_on(
        app: App, queue_name: str) -> None:
    from qops.worker.worker import Worker

    transport = app.transport
    cases = applicable(transport)
    for case in cases:
        inject(transport, queue_name, case)
    app.tasks["hostile.add"].apply_async((20, 22), queue=queue_name)
    worker = Worker(app, hostname=f"hostile-{uuid.uuid4().hex[:6]}@test", queues=[queue_name],
                    pool="threads", concurrency=2, task_events=False)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            worker.start()
        except BaseException as exc:  # the test says so, not a thread's traceback
            errors.append(exc)

    thread = threading.Thread(target=run, name="hostile-worker", daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: 42 in RAN, timeout=30), "the good task did not run"  # type: ignore[attr-defined]

        def mine() -> list[Any]:
            return [d for d in transport.dead_letters(1000) if d.queue == queue_name]

        wait_until(lambda: len(mine()) >= len(cases), timeout=15)
        dead = mine()
        assert len(dead) == len(cases), _missing(cases, dead)
        assert all(d.reason.strip() for d in dead), [d.reason for d in dead]
        # each one kept as it was sent (RabbitMQ keeps the body)
        sent = sorted((c.envelope if kind_of(transport) != "amqp" else c.body) or b""
                      for c in cases)
        assert sorted(d.raw for d in dead) == sent
        # the bombs stopped at the cap (decompressing them whole is 2 MiB of JSON noise)
        bombs = {(c.envelope if kind_of(transport) != "amqp" else c.body)
                 for c in cases if c.id.endswith("-bomb")}
        assert sorted(d.reason for d in dead if d.raw in bombs) == [
            f"{k} body decompresses to more than {LIMIT} bytes (task_max_message_size)"
            for k in ("application/x-bz2", "application/x-gzip")]
        time.sleep(0.3)  # nothing comes back from a requeue
        [stats] = transport.queue_stats([queue_name])
        assert (stats.ready, stats.in_flight) == (0, 0), stats
        assert len(mine()) == len(cases)
        assert thread.is_alive() and not errors, errors
        assert RAN == [42]  # type: ignore[attr-defined]
    finally:
        worker.request_stop()
        thread.join(30)
    assert not thread.is_alive() and not errors, errors


def _missing(cases: list[Case], dead: list[Any]) -> str:
    raws = {d.raw for d in dead}
    gone = [c.id for c in cases if (c.envelope if c.body is None else c.body) not in raws
            and c.envelope not in raws]
    return f"not dead-lettered: {gone}; reasons: {[d.reason for d in dead]}"


@pytest.mark.parametrize("case", [c for c in CASES if c.envelope is not None and c.id
                                   not in ("unknown-task", "wrong-arguments")],
                         ids=lambda c: c.id)
def test_consumer_hands_out_hostile_envelopes_with_a_reason(
        envelope_transport: Transport, queue_name: str, case: Case) -> None:
    """The transport half, without a worker: ``get()`` returns a Delivery with
    ``error`` set, or one whose message ``parse_task_message`` refuses with a
    ProtocolError -- never raises, never another exception."""
    t = envelope_transport
    c = t.consumer([queue_name], 1)
    try:
        inject(t, queue_name, case)
        d = c.get(5)
        assert d is not None
        if d.error is None:
            assert d.message is not None
            with pytest.raises(ProtocolError):
                parse_task_message(d.message)
        else:
            assert d.message is None and d.error.strip() and "\n" not in d.error
        c.reject(d, d.error or "bad")
        assert t.queue_stats([queue_name])[0].in_flight == 0
        [dead] = t.dead_letters()
        assert dead.raw == case.envelope
    finally:
        c.close()


@pytest.mark.parametrize("codec", ["gzip", "zlib", "bzip2", "lzma", "application/x-gzip"])
def test_compressed_bodies_are_decompressed_on_every_transport(
        broker_url: str, queue_name: str, codec: str) -> None:
    """What a Celery client sends with ``compression=codec`` (kombu's own compress:
    the body compressed, the header ``compression`` = the MIME type) reaches the worker
    as the plain task message."""
    import kombu.compression

    from qops.transports.base import from_url
    from tests.contract import FAST

    if broker_url.startswith("amqp"):
        broker_url = f"{broker_url}?dead_letter_queue=qops.dlq.{uuid.uuid4().hex[:10]}"
    t = from_url(broker_url, FAST)
    body, kind = kombu.compression.compress(GOOD_BODY, codec)
    c = t.consumer([queue_name], 1)
    try:
        inject(t, queue_name, task("compressed", ok_headers(compression=kind), body))
        d = c.get(5)
        assert d is not None and d.error is None, d
        assert d.message is not None and d.message.body == GOOD_BODY
        assert "compression" not in d.message.headers
        assert parse_task_message(d.message).args == [1, 2]
        c.ack(d)
    finally:
        c.close()
        t.close()
