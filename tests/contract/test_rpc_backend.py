"""The ``rpc://`` result backend: results come back as messages on the client's reply queue.

First in one process on every transport (a "worker" backend stores, the client reads),
then end to end with a real worker process on each real transport.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from qops import App
from qops.backends.base import ResultBackend, backend_from_url
from qops.backends.rpc import RPCBackend
from qops.errors import ResultTimeout, UsageError
from qops.transports.base import Transport, from_url
from tests.contract import FAST
from tests.helpers import WorkerProcess, qops_env


def tid() -> str:
    return str(uuid.uuid4())


# -- in one process, on every transport ------------------------------------------------


@pytest.fixture
def client(transport: Transport) -> Iterator[ResultBackend]:
    b = backend_from_url("rpc://", transport=transport)
    yield b
    b.close()


@pytest.fixture
def worker_side(broker_url: str) -> Iterator[ResultBackend]:
    """The backend as a worker has it: its own transport, no reply queue."""
    t = from_url(broker_url, FAST)
    b = backend_from_url("rpc://", transport=t)
    yield b
    b.close()
    t.close()


def test_made_from_url_with_the_apps_transport(transport: Transport) -> None:
    b = backend_from_url("rpc://", transport=transport)
    assert isinstance(b, RPCBackend) and b.transport is transport
    with pytest.raises(UsageError):
        backend_from_url("rpc://")


def test_one_reply_queue_per_process(client: ResultBackend, transport: Transport) -> None:
    oid = client.prepare_send()
    assert oid and client.prepare_send() == oid
    assert oid not in {s.name for s in transport.queue_stats(None)}


def test_pending_until_a_reply_arrives(client, worker_side) -> None:
    reply_to = client.prepare_send()
    t = tid()
    assert client.get_meta(t)["status"] == "PENDING"
    worker_side.store(t, "STARTED", {"pid": 1}, reply_to=reply_to)
    deadline = time.monotonic() + 5
    while client.get_meta(t)["status"] == "PENDING" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.get_meta(t)["status"] == "STARTED"
    worker_side.store(t, "SUCCESS", 42, reply_to=reply_to)
    meta = client.wait(t, timeout=5)
    assert (meta["status"], meta["result"], meta["task_id"]) == ("SUCCESS", 42, t)


def test_success_is_never_overwritten(client, worker_side) -> None:
    reply_to = client.prepare_send()
    t = tid()
    worker_side.store(t, "SUCCESS", 1, reply_to=reply_to)
    worker_side.store(t, "FAILURE", ValueError("late"), reply_to=reply_to)
    worker_side.store(t, "SUCCESS", 2, reply_to=reply_to)
    assert client.wait(t, timeout=5)["result"] == 1
    other = tid()  # a marker sent last: once it is in, everything before it is too
    worker_side.store(other, "SUCCESS", None, reply_to=reply_to)
    client.wait(other, timeout=5)
    assert client.get_meta(t)["result"] == 1


def test_results_are_filed_by_task_id(client, worker_side) -> None:
    reply_to = client.prepare_send()
    ids = [tid() for _ in range(5)]
    for n, t in enumerate(ids):
        worker_side.store(t, "SUCCESS", n, reply_to=reply_to)
    assert [client.wait(t, timeout=5)["result"] for t in reversed(ids)] == [4, 3, 2, 1, 0]


def test_failure_keeps_exception_and_traceback(client, worker_side) -> None:
    reply_to = client.prepare_send()
    t = tid()
    worker_side.store(t, "FAILURE", ValueError("kaboom"), "Traceback ...", reply_to=reply_to)
    meta = client.wait(t, timeout=5)
    assert meta["result"] == {"exc_type": "ValueError", "exc_message": ["kaboom"],
                              "exc_module": "builtins"}
    assert meta["traceback"] == "Traceback ..."


def test_no_reply_to_means_nothing_is_sent(client, worker_side, transport) -> None:
    client.prepare_send()
    worker_side.store(tid(), "SUCCESS", 1, reply_to=None)
    worker_side.store(tid(), "SUCCESS", 1, reply_to="")
    assert transport.queue_stats(None) == []


def test_wait_wakes_when_the_reply_comes(client, worker_side) -> None:
    reply_to = client.prepare_send()
    t = tid()
    timer = threading.Timer(0.3, lambda: worker_side.store(t, "SUCCESS", "late",
                                                           reply_to=reply_to))
    timer.start()
    try:
        start = time.monotonic()
        assert client.wait(t, timeout=10)["result"] == "late"
        assert time.monotonic() - start < 3
    finally:
        timer.join()


def test_threads_share_the_reply_queue(client, worker_side) -> None:
    reply_to = client.prepare_send()
    ids = [tid() for _ in range(8)]
    got: dict[str, object] = {}

    def waiter(t: str) -> None:
        got[t] = client.wait(t, timeout=10)["result"]

    threads = [threading.Thread(target=waiter, args=(t,)) for t in ids]
    for th in threads:
        th.start()
    for n, t in enumerate(ids):
        worker_side.store(t, "SUCCESS", n, reply_to=reply_to)
    for th in threads:
        th.join(15)
    assert got == {t: n for n, t in enumerate(ids)}


def test_wait_times_out(client) -> None:
    client.prepare_send()
    start = time.monotonic()
    with pytest.raises(ResultTimeout):
        client.wait(tid(), timeout=0.3)
    assert time.monotonic() - start < 2


def test_wait_without_a_reply_queue_fails_at_once(client) -> None:
    # this backend never sent a task: no result can ever come to it
    with pytest.raises(UsageError, match="only to the process that sent"):
        client.wait(tid(), timeout=30)
    assert client.get_meta(tid())["status"] == "PENDING"


def test_forget(client, worker_side) -> None:
    reply_to = client.prepare_send()
    t = tid()
    worker_side.store(t, "SUCCESS", 1, reply_to=reply_to)
    client.wait(t, timeout=5)
    client.forget(t)
    assert client.get_meta(t)["status"] == "PENDING"


def test_close_deletes_the_reply_queue(client, transport) -> None:
    oid = client.prepare_send()
    assert transport.queue_exists(oid) or transport.scheme == "redis"  # (Redis: no key yet)
    client.close()
    deadline = time.monotonic() + 5
    while transport.queue_exists(oid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not transport.queue_exists(oid)
    assert client.prepare_send() != oid  # opens a new one when used again


def test_a_dropped_backend_closes_its_reply_queue(transport: Transport) -> None:
    import gc

    before = set(threading.enumerate())
    b = backend_from_url("rpc://", transport=transport)
    oid = b.prepare_send()
    [keeper] = [t for t in set(threading.enumerate()) - before if t.name == "qops-rpc-replies"]
    del b
    gc.collect()
    keeper.join(10)
    assert not keeper.is_alive()
    assert not transport.queue_exists(oid)


def test_forked_child_has_its_own_reply_queue(real_broker_url: str) -> None:
    """A child must neither read nor delete the parent's reply queue."""
    t = from_url(real_broker_url, FAST)
    client = backend_from_url("rpc://", transport=t)
    worker_side = backend_from_url("rpc://", transport=from_url(real_broker_url, FAST))
    try:
        oid = client.prepare_send()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                child_transport = from_url(real_broker_url, FAST)
                client.transport = child_transport  # as App does after a fork
                child_oid = client.prepare_send()
                os.write(w, child_oid.encode())
                client.close()
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        child_oid = os.read(r, 64).decode()
        os.close(r)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert child_oid and child_oid != oid
        task = tid()  # the parent's queue still works after the child closed its own
        worker_side.store(task, "SUCCESS", "parent", reply_to=oid)
        assert client.wait(task, timeout=5)["result"] == "parent"
    finally:
        client.close()
        worker_side.close()
        t.close()


# -- end to end: a real worker process ----------------------------------------------------


@pytest.fixture
def rpc_app(real_broker_url: str) -> Iterator[App]:
    app = App("rpc-client", broker=real_broker_url, backend="rpc://")
    yield app
    app.close()


@pytest.fixture
def rpc_worker(real_broker_url: str, tmp_path: Path) -> Iterator[WorkerProcess]:
    # STARTED states go to the client too: they must not end the wait
    with WorkerProcess("-c", "2", broker=real_broker_url, backend="rpc://",
                       env=qops_env(QOPS_TASK_TRACK_STARTED="1"),
                       logfile=tmp_path / "worker.log") as w:
        yield w


def test_worker_sends_results_back(rpc_app: App, rpc_worker: WorkerProcess) -> None:
    res = rpc_app.send_task("proj.tasks.add", (2, 3))
    assert res.get(timeout=20) == 5
    assert res.state == "SUCCESS"
    many = [rpc_app.send_task("proj.tasks.add", (n, n)) for n in range(10)]
    assert [r.get(timeout=20) for r in reversed(many)] == [2 * n for n in reversed(range(10))]


def test_failing_task_raises_its_exception(rpc_app: App, rpc_worker: WorkerProcess) -> None:
    res = rpc_app.send_task("proj.tasks.fail", ("boom",))
    with pytest.raises(ValueError, match="boom"):
        res.get(timeout=20)
    assert res.failed() and "ValueError: boom" in (res.traceback or "")


def test_unknown_task_id_is_pending(rpc_app: App, rpc_worker: WorkerProcess) -> None:
    rpc_app.send_task("proj.tasks.add", (1, 1)).get(timeout=20)
    assert rpc_app.AsyncResult(tid()).state == "PENDING"


def test_ignore_result_sends_no_reply_queue(rpc_app: App, queue_name: str) -> None:
    rpc_app.send_task("proj.tasks.add", (1, 1), ignore_result=True, queue=queue_name)
    consumer = rpc_app.transport.consumer([queue_name], prefetch=1)
    try:
        d = consumer.get(5)
        assert d is not None and d.message is not None
        assert not d.message.properties.get("reply_to")
        consumer.ack(d)
    finally:
        consumer.close()


# The worker sends retries and chain continuations itself: they must carry the
# client's reply_to, not open a reply queue of the worker's.
def test_retried_task_result_comes_back(sqlite_url: str, tmp_path: Path) -> None:
    app = App("rpc-client", broker=sqlite_url, backend="rpc://")
    try:
        with WorkerProcess("-c", "1", broker=sqlite_url, backend="rpc://",
                           logfile=tmp_path / "worker.log"):
            assert app.send_task("proj.tasks.flaky", (2,)).get(timeout=8) == 2
    finally:
        app.close()


def test_chain_result_comes_back(sqlite_url: str, tmp_path: Path) -> None:
    app = App("rpc-client", broker=sqlite_url, backend="rpc://")
    try:
        with WorkerProcess("-c", "1", broker=sqlite_url, backend="rpc://",
                           logfile=tmp_path / "worker.log"):
            chained = app.signature("proj.tasks.add", (2, 2)) | app.signature(
                "proj.tasks.mul", (8,))
            assert chained.delay().get(timeout=8) == 32
    finally:
        app.close()
