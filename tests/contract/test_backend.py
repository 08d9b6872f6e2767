"""The result-backend contract: every store-based backend passes the same cases."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from qops.backends.base import ResultBackend, backend_from_url
from qops.errors import ResultTimeout


@pytest.fixture(params=["memory", "sqlite", "redis"])
def backend(request: pytest.FixtureRequest) -> Iterator[ResultBackend]:
    url = request.getfixturevalue(f"{request.param}_url")
    b = backend_from_url(url, expires=60)
    yield b
    b.close()


def tid() -> str:
    return str(uuid.uuid4())


def test_pending_when_unknown(backend: ResultBackend) -> None:
    meta = backend.get_meta(tid())
    assert meta["status"] == "PENDING" and meta["result"] is None


def test_store_and_read_celery_shape(backend: ResultBackend) -> None:
    t = tid()
    backend.store(t, "SUCCESS", {"x": [1, 2]})
    meta = backend.get_meta(t)
    assert meta["status"] == "SUCCESS"
    assert meta["result"] == {"x": [1, 2]}
    assert meta["task_id"] == t
    assert meta["traceback"] is None and meta["children"] == []
    assert meta["date_done"]


def test_failure_keeps_exception_and_traceback(backend: ResultBackend) -> None:
    t = tid()
    backend.store(t, "FAILURE", ValueError("kaboom"), "Traceback ...")
    meta = backend.get_meta(t)
    assert meta["result"] == {"exc_type": "ValueError", "exc_message": ["kaboom"],
                              "exc_module": "builtins"}
    assert meta["traceback"] == "Traceback ..."


def test_success_is_never_overwritten(backend: ResultBackend) -> None:
    t = tid()
    backend.store(t, "STARTED")
    backend.store(t, "SUCCESS", 1)
    backend.store(t, "FAILURE", ValueError("late"))
    backend.store(t, "SUCCESS", 2)
    assert backend.get_meta(t)["status"] == "SUCCESS"
    assert backend.get_meta(t)["result"] == 1


def test_wait_wakes_when_stored(backend: ResultBackend) -> None:
    t = tid()
    timer = threading.Timer(0.3, lambda: backend.store(t, "SUCCESS", 42))
    timer.start()
    start = time.monotonic()
    meta = backend.wait(t, timeout=5)
    assert time.monotonic() - start < 2
    timer.join(5)  # (wait() may return on the published result before store() has)
    assert meta["result"] == 42


def test_wait_times_out(backend: ResultBackend) -> None:
    with pytest.raises(ResultTimeout):
        backend.wait(tid(), timeout=0.3)


def test_forget(backend: ResultBackend) -> None:
    t = tid()
    backend.store(t, "SUCCESS", 1)
    backend.forget(t)
    assert backend.get_meta(t)["status"] == "PENDING"


def test_result_expires(request: pytest.FixtureRequest, backend: ResultBackend) -> None:
    short = backend_from_url(backend.url, expires=1)
    try:
        t = tid()
        short.store(t, "SUCCESS", 1)
        assert short.get_meta(t)["status"] == "SUCCESS"
        time.sleep(2.1)
        assert short.get_meta(t)["status"] == "PENDING"
    finally:
        short.close()


def test_type_tags_round_trip(backend: ResultBackend) -> None:
    import datetime as dt
    import decimal

    t = tid()
    value = {"when": dt.datetime(2026, 11, 21, 4, 48, tzinfo=dt.timezone.utc),
             "raw": b"\x00\x01", "n": decimal.Decimal("1.50")}
    backend.store(t, "SUCCESS", value)
    assert backend.get_meta(t)["result"] == value


def test_waits_in_a_row_each_wake_on_their_own_result(backend: ResultBackend) -> None:
    """One thread waiting again and again (a client calling .get() in a loop): each wait
    wakes on its own task, also after a timed-out wait and with a result of an earlier
    task published again meanwhile."""
    with pytest.raises(ResultTimeout):
        backend.wait(tid(), timeout=0.1)
    done = tid()
    backend.store(done, "SUCCESS", 0)
    assert backend.wait(done, timeout=5)["result"] == 0
    for i in range(1, 4):
        t = tid()
        timer = threading.Timer(0.05, lambda t=t, i=i: (backend.store(done, "STARTED"),
                                                        backend.store(t, "SUCCESS", i)))
        timer.start()
        start = time.monotonic()
        assert backend.wait(t, timeout=5)["result"] == i
        assert time.monotonic() - start < 2
        timer.join(5)  # its store may still read a reply: not after close()


def test_redis_waits_share_one_connection_per_thread(request: pytest.FixtureRequest) -> None:
    """A thread's waits reuse one pub/sub connection (each get() used to open one: a
    TCP connect, HELLO and SELECT per round trip); the same socket serves them all."""
    b = backend_from_url(request.getfixturevalue("redis_url"), expires=60)
    try:
        t = tid()
        b.store(t, "SUCCESS", 0)
        b.wait(t, timeout=5)
        pubsub = b._pubsub()  # type: ignore[attr-defined]
        sock = pubsub.connection._sock
        assert sock is not None
        for i in range(1, 5):
            t = tid()
            timer = threading.Timer(0.02, lambda t=t, i=i: b.store(t, "SUCCESS", i))
            timer.start()
            assert b.wait(t, timeout=5)["result"] == i
            timer.join(5)  # its store may still read a reply: not after close()
        assert b._pubsub() is pubsub and pubsub.connection._sock is sock  # type: ignore[attr-defined]
        other: list[object] = []
        th = threading.Thread(target=lambda: other.append(b._pubsub()))  # type: ignore[attr-defined]
        th.start()
        th.join()
        assert other and other[0] is not pubsub  # one per thread
    finally:
        b.close()


def test_a_redis_wait_takes_the_published_result_as_read(
        request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis publishes what it stores: a wait woken by a ready result returns it without
    reading the key again (a round trip of every .get() that waits), and one woken by a
    state that is not ready (STARTED), or by a payload that is not a result, reads it.
    (A wait reads the key twice before it waits: with its SUBSCRIBE, and once that is
    confirmed.)"""
    b = backend_from_url(request.getfixturevalue("redis_url"), expires=60)
    reads: list[str] = []
    real_get = b._get
    monkeypatch.setattr(b, "_get", lambda task_id: reads.append(task_id) or real_get(task_id))
    timers: list[threading.Timer] = []
    try:
        t = tid()
        timers.append(threading.Timer(0.1, lambda: b.store(t, "SUCCESS", 7)))
        timers[-1].start()
        assert b.wait(t, timeout=5)["result"] == 7
        assert reads == [t, t]  # the reads before the wait only
        reads.clear()
        t = tid()

        def started_then_done() -> None:
            b.store(t, "STARTED")
            time.sleep(0.1)
            b.client.publish(b._key(t), b"not a result")  # type: ignore[attr-defined]
            time.sleep(0.1)
            b.store(t, "SUCCESS", 8)

        timers.append(threading.Timer(0.1, started_then_done))
        timers[-1].start()
        assert b.wait(t, timeout=5)["result"] == 8
        assert reads == [t, t, t, t]  # two before, after STARTED, after the stray message
    finally:
        for timer in timers:  # a store may still read its reply: not after close()
            timer.join(5)
        b.close()


def test_a_redis_wait_for_a_ready_result_reads_no_confirmation(
        request: pytest.FixtureRequest) -> None:
    """A result that is there already (a .get() after a publish RabbitMQ confirmed) costs a
    wait one round trip: the key is read with the SUBSCRIBE, whose confirmation is not
    waited for. A later wait on the same channel skips the confirmations left unread
    (they are counted): it waits for its own before reading the key again."""
    b = backend_from_url(request.getfixturevalue("redis_url"), expires=60)
    t = tid()
    channel = b._key(t).encode()  # type: ignore[attr-defined]
    try:
        b.store(t, "SUCCESS", 1)
        for _ in range(3):
            assert b.wait(t, timeout=5)["result"] == 1
        assert b._local.unconfirmed == {channel: 3}  # type: ignore[attr-defined]
        b.forget(t)
        timer = threading.Timer(0.2, lambda: b.store(t, "SUCCESS", 2))
        timer.start()
        assert b.wait(t, timeout=5)["result"] == 2
        timer.join(5)  # its store may still read a reply: not after close()
        assert not b._local.unconfirmed  # type: ignore[attr-defined]
        # a client whose every wait finds its result does not pile up unread replies
        from qops.backends.redis import UNREAD_MAX

        done = [tid() for _ in range(5 * UNREAD_MAX)]
        for one in done:
            b.store(one, "SUCCESS", 3)
        for one in done:
            assert b.wait(one, timeout=5)["result"] == 3
            assert len(b._local.unconfirmed) <= UNREAD_MAX  # type: ignore[attr-defined]
        assert len(b._local.pubsub.channels) <= 2 * UNREAD_MAX  # type: ignore[attr-defined]
    finally:
        b.close()


def test_a_polling_wait_starts_with_a_short_interval_again(request: pytest.FixtureRequest) -> None:
    """SQLite results are polled with a growing interval: each wait starts short again
    (it stayed at its longest after the first slow wait, so every later .get() took
    about 100 ms)."""
    from qops.backends.base import POLL_FIRST, POLL_MAX

    b = backend_from_url(request.getfixturevalue("sqlite_url"), expires=60)
    try:
        with pytest.raises(ResultTimeout):
            b.wait(tid(), timeout=0.4)  # the interval grows to its longest
        assert b._poll == POLL_MAX  # type: ignore[attr-defined]
        t = tid()
        with b._watch(t):
            assert b._poll == POLL_FIRST  # type: ignore[attr-defined]
        timer = threading.Timer(0.01, b.store, (t, "SUCCESS", 1))
        timer.start()
        assert b.wait(t, timeout=5)["result"] == 1
        timer.join(5)
    finally:
        b.close()
