"""The chord counter join on Redis: Celery's keys and rules (docs/canvas.md), without a
worker: each part counts once, the last one claims the chord, late copies change nothing."""

from __future__ import annotations

import uuid

import pytest

from qops import protocol
from qops.backends.redis import RedisBackend
from qops.chords import part_return
from qops.errors import ChordError


@pytest.fixture
def backend(redis_url: str):  # type: ignore[no-untyped-def]
    b = RedisBackend(redis_url, prefix="celery-task-meta-")
    yield b
    b.close()


def _entry(tid: str, value: int) -> bytes:
    return protocol.dumps([1, tid, "SUCCESS", value]).encode()


def test_parts_count_once_and_the_last_claims(backend: RedisBackend) -> None:
    gid = str(uuid.uuid4())
    backend.set_chord_size(gid, 2)
    keys = {k.decode() for k in backend.client.keys("*")}
    assert keys == {f"celery-taskset-meta-{gid}.s"}
    assert backend.join_part(gid, "b", 1, _entry("b", 20), 6) is None
    assert backend.join_part(gid, "b", 1, _entry("b", 20), 6) is None  # a redelivered copy
    done = backend.join_part(gid, "a", 0, _entry("a", 10), 6)
    assert done is not None
    token, entries = done
    assert [protocol.loads(e)[3] for e in entries] == [10, 20]  # header order
    assert backend.client.get(f"celery-taskset-meta-{gid}.c").decode() == token
    assert not backend.join_extend(gid, "someone else", 30)
    assert backend.join_extend(gid, token, 30)
    assert backend.join_done(gid, token)
    assert backend.client.get(f"celery-taskset-meta-{gid}.c") == b"done"
    # a late copy of a part finds the chord done: nothing is recreated or sent again
    assert backend.join_part(gid, "a", 0, _entry("a", 10), 6) is None
    assert {k.decode() for k in backend.client.keys("*")} == {f"celery-taskset-meta-{gid}.c"}


def test_a_part_before_the_size_waits(backend: RedisBackend) -> None:
    gid = str(uuid.uuid4())
    assert backend.join_part(gid, "a", 0, _entry("a", 1), 6) is None  # size not stored yet
    backend.set_chord_size(gid, 1)
    assert backend.join_part(gid, "a", 0, _entry("a", 1), 6) is not None


def test_part_return_sends_the_body_or_fails_the_chord(redis_url: str) -> None:
    from qops import App

    app = App("joinapp", broker=f"memory://{uuid.uuid4().hex}", backend=redis_url,
              compat="celery")
    gid, body_id = str(uuid.uuid4()), str(uuid.uuid4())
    body = {"task": "proj.tasks.xsum", "args": [], "kwargs": {}, "subtask_type": None,
            "immutable": False, "options": {"task_id": body_id, "queue": "bodies"}}
    app.backend.set_chord_size(gid, 2)
    part_return(app, gid, "t1", 1, body, "SUCCESS", 5)
    part_return(app, gid, "t0", 0, body, "SUCCESS", 4)
    consumer = app.transport.consumer(["bodies"], 10)
    d = consumer.get(1.0)
    assert d is not None and d.message is not None
    req = protocol.parse_task_message(d.message)
    assert (req.id, req.name, req.args) == (body_id, "proj.tasks.xsum", [[4, 5]])
    # a failed part: the body's result is a ChordError (Celery's class under compat celery)
    gid = str(uuid.uuid4())
    app.backend.set_chord_size(gid, 2)
    part_return(app, gid, "t0", 0, body, "FAILURE", ValueError("boom"))
    part_return(app, gid, "t1", 1, body, "SUCCESS", 1)
    meta = app.backend.get_meta(body_id)
    assert meta["status"] == "FAILURE"
    assert meta["result"]["exc_module"] == "celery.exceptions"
    err = app.AsyncResult(body_id).result
    assert isinstance(err, ChordError) and str(err) == "Dependency t0 raised ValueError('boom')"
    assert consumer.get(0.2) is None  # no body sent
    app.close()
