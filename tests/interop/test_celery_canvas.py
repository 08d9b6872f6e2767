"""Workflows across Celery 5 and qops: chain, group and chord (failing header, chain body,
chain containing a group, nested groups) and revoking a member, for every mix of client
and worker -- Celery client -> qops worker, qops client -> Celery worker, qops -> qops,
and Celery or qops client -> one Celery and one qops worker sharing a queue -- on Redis
and RabbitMQ, with results in Redis (Celery's counter join, docs/canvas.md); and on
RabbitMQ with ``rpc://``, where chains and groups work and chords are refused alike (Celery's
rpc backend has no chords).

The workers are shared by the whole module (per broker): one qops worker consumes the
"qops" and "mixed" queues, one Celery worker the "celery" and "mixed" queues.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AMQP_HOST, AMQP_PORT, REDIS_HOST, REDIS_PORT
from tests.helpers import ROOT, WorkerProcess, qops_env

T = 20  # seconds any one workflow may take (they take well under one)


@dataclass
class Side:
    """The brokers, queues and running workers of one broker kind."""

    broker: str
    backend: str
    rpc: bool
    queues: dict[str, str]  # "qops" / "celery" / "mixed" -> queue name
    logs: list[Path]

    def log_text(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in self.logs
                         if p.exists())


def _celery_app(broker: str, backend: str) -> Any:
    from celery import Celery

    app = Celery("interop-client", broker=broker, backend=backend)
    app.conf.result_chord_join_timeout = 3
    return app


def _start(kind: str, request: pytest.FixtureRequest, redis_db: int,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Side]:
    """Start a qops and a Celery worker on ``kind``'s broker and wait until both answer."""
    import redis

    backend = f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db}"
    redis.Redis.from_url(backend).flushdb()
    amqp = kind.startswith("amqp")
    rpc = kind == "amqp-rpc"
    if rpc:
        backend = "rpc://"
    if amqp:
        vhost = request.getfixturevalue("amqp_vhost")
        broker = f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/{vhost}"
    else:
        broker = backend
    tag = uuid.uuid4().hex[:6]
    queues = {k: f"canvas-{k}-{tag}" for k in ("qops", "celery", "mixed")}
    tmp = tmp_path_factory.mktemp(f"canvas-{kind}")
    qnode, cnode = f"q{tag}@interop", f"c{tag}@interop"
    qlog, clog = tmp / "qops-worker.log", tmp / "celery-worker.log"
    qworker = WorkerProcess("-n", qnode, "-Q", f"{queues['qops']},{queues['mixed']}",
                            "-P", "threads", "-c", "4", broker=broker, backend=backend,
                            env=qops_env(QOPS_COMPAT="celery"), logfile=qlog)
    env = dict(os.environ, INTEROP_BROKER=broker, INTEROP_BACKEND=backend, C_FORCE_ROOT="1",
               PYTHONPATH=str(ROOT / "tests" / "interop"))
    out = open(clog, "wb")  # noqa: SIM115 - closed at teardown
    celery_worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celery_side", "worker", "-n", cnode,
         "-Q", f"{queues['celery']},{queues['mixed']}", "-P", "threads", "-c", "4",
         "-l", "INFO", "--without-heartbeat", "--without-gossip", "--without-mingle"],
        env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        cwd=str(tmp))
    probe = _celery_app(broker, backend)
    s = Side(broker, backend, rpc, queues, [qlog, clog])
    try:
        qworker.start()
        deadline = time.monotonic() + 40
        seen: set[str] = set()
        while seen != {qnode, cnode}:
            assert time.monotonic() < deadline, s.log_text()
            for reply in probe.control.ping([qnode, cnode], timeout=0.5) or []:
                seen.update(reply)
        yield s
    finally:
        probe.close()
        qworker.stop()
        # cold shutdown: nothing is left to do (on RabbitMQ Celery takes ~6 s to close
        # its connections, so it is killed after 1.5 s)
        os.killpg(celery_worker.pid, signal.SIGQUIT)
        try:
            celery_worker.wait(1.5)
        except subprocess.TimeoutExpired:
            os.killpg(celery_worker.pid, signal.SIGKILL)
            celery_worker.wait(10)
        out.close()


@pytest.fixture(scope="module", params=["redis", "amqp"])
def side(request: pytest.FixtureRequest, redis_db: int,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Side]:
    """Results in Redis: Celery's counter join."""
    yield from _start(request.param, request, redis_db, tmp_path_factory)


@pytest.fixture(scope="module")
def rpc_side(request: pytest.FixtureRequest, redis_db: int,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Side]:
    """RabbitMQ with rpc:// results."""
    yield from _start("amqp-rpc", request, redis_db, tmp_path_factory)


# -- the two clients, behind one small interface ------------------------------------------


class Client:
    """Builds and sends workflows with Celery's or qops's canvas."""

    kind: str
    chord_error: type[BaseException]

    def __init__(self, queue: str) -> None:
        self.queue = queue

    def s(self, name: str, *args: Any, **options: Any) -> Any:
        raise NotImplementedError

    def si(self, name: str, *args: Any, **options: Any) -> Any:
        raise NotImplementedError

    chain: Callable[..., Any]
    group: Callable[..., Any]
    chord: Callable[..., Any]

    def revoke(self, task_id: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class CeleryClient(Client):
    kind = "celery"

    def __init__(self, side: Side) -> None:
        from celery import chain, chord, group
        from celery.exceptions import ChordError

        self.app = _celery_app(side.broker, side.backend)
        self.chain, self.group, self.chord = chain, group, chord
        self.chord_error = ChordError

    def s(self, name: str, *args: Any, **options: Any) -> Any:
        return self.app.signature(f"proj.tasks.{name}", args=args, queue=self.queue, **options)

    def si(self, name: str, *args: Any, **options: Any) -> Any:
        return self.s(name, *args, immutable=True, **options)

    def revoke(self, task_id: str) -> None:
        self.app.control.revoke(task_id)

    def close(self) -> None:
        self.app.close()


class QopsClient(Client):
    kind = "qops"

    def __init__(self, side: Side) -> None:
        from qops import App
        from qops.canvas import chain, chord, group
        from qops.errors import ChordError

        self.app = App("interop-qclient", broker=side.broker, backend=side.backend,
                       compat="celery")
        self.chain, self.group, self.chord = chain, group, chord
        self.chord_error = ChordError

    def s(self, name: str, *args: Any, immutable: bool = False, **options: Any) -> Any:
        from qops.task import Signature

        return Signature(f"proj.tasks.{name}", args, options={"queue": self.queue, **options},
                         immutable=immutable, app=self.app)

    def si(self, name: str, *args: Any, **options: Any) -> Any:
        return self.s(name, *args, immutable=True, **options)

    def revoke(self, task_id: str) -> None:
        self.app.AsyncResult(task_id).revoke()

    def close(self) -> None:
        self.app.close()


MIXES = {  # mix -> (client, queue)
    "celery-qops": ("celery", "qops"),
    "qops-celery": ("qops", "celery"),
    "qops-qops": ("qops", "qops"),
    "celery-mixed": ("celery", "mixed"),
}


def _client(mix: str, side: Side) -> Iterator[Client]:
    kind, queue = MIXES[mix]
    c: Client = (CeleryClient if kind == "celery" else QopsClient)(side)
    c.queue = side.queues[queue]
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(params=list(MIXES))
def client(request: pytest.FixtureRequest, side: Side) -> Iterator[Client]:
    yield from _client(request.param, side)


@pytest.fixture(params=list(MIXES))
def rpc_client(request: pytest.FixtureRequest, rpc_side: Side) -> Iterator[Client]:
    yield from _client(request.param, rpc_side)


def _get(res: Any, side: Side, **kw: Any) -> Any:
    try:
        return res.get(timeout=T, **kw)
    except Exception as exc:
        if "TimeoutError" in type(exc).__name__ or "Timeout" in type(exc).__name__:
            pytest.fail(f"{exc}\n{side.log_text()}")
        raise


# -- the workflows: each test sends its workflows at once, then checks each ------------------


def test_chains_and_groups(client: Client, side: Side) -> None:
    c = client
    chain_ = c.chain(c.s("add", 2, 2), c.s("mul", 4), c.s("add", 1)).apply_async()
    group_ = c.group([c.s("add", i, i) for i in range(4)]).apply_async()
    # a nested group's tasks are the group's own: one flat list, as in Celery
    nested = c.group([c.s("add", 1, 1),
                      c.group([c.s("add", 2, 2), c.s("add", 3, 3)])]).apply_async()
    assert [_get(r, side) for r in (chain_, group_, nested)] == [17, [0, 2, 4, 6], [2, 4, 6]]
    if side.rpc:
        return  # (no chords with rpc://)
    # a group followed by a task in a chain is a chord
    with_group = c.chain(c.s("add", 1, 1), c.group([c.s("mul", 2), c.s("mul", 3)]),
                         c.s("xsum"), c.s("mul", 2)).apply_async()
    assert _get(with_group, side) == 20


def test_chords(client: Client, side: Side) -> None:
    c = client
    plain = c.chord([c.s("add", i, i) for i in range(4)], c.s("xsum")).apply_async()
    # a chain and a nested group in the header: each adds its parts to the join
    mixed = c.chord([c.s("add", 1, 1) | c.s("mul", 5),
                     c.group([c.s("add", 2, 2), c.s("add", 3, 3)])], c.s("xsum")).apply_async()
    chain_body = c.chord([c.s("add", 1, 1), c.s("add", 2, 2)],
                         c.chain(c.s("xsum"), c.s("mul", 10), c.s("add", 1))).apply_async()
    group_body = c.chord([c.s("add", 1, 1), c.s("add", 2, 2)],
                         c.group([c.s("xsum"), c.s("xsum")])).apply_async()
    failing = c.chord([c.s("add", 1, 1), c.si("fail", "boom")], c.s("xsum")).apply_async()
    assert [_get(r, side) for r in (plain, mixed, chain_body, group_body)] == \
        [12, 20, 61, [6, 6]]
    _chord_failed(failing, side, c, r"Dependency .* raised ValueError\('boom'\)")


def test_revoke_in_group_and_chord(client: Client, side: Side) -> None:
    """A member held for its countdown is revoked: the group's result shows it, the
    chord fails with a ChordError naming it."""
    c = client
    gid, cid = str(uuid.uuid4()), str(uuid.uuid4())
    # 3 s of countdown: the revokes below must arrive before it ends, also under load
    group_ = c.group([c.s("add", 1, 1), c.s("add", 2, 2, task_id=gid, countdown=3.0)]
                     ).apply_async()
    chord_ = None if side.rpc else c.chord(
        [c.s("add", 1, 1), c.s("add", 2, 2, task_id=cid, countdown=3.0)],
        c.s("xsum")).apply_async()
    time.sleep(0.2)  # received, held for its countdown
    c.revoke(gid)
    c.revoke(cid)
    values = _get(group_, side, propagate=False)
    # by name: a qops worker stores qops.errors.TaskRevokedError, a Celery one Celery's
    assert values[0] == 2 and type(values[1]).__name__ == "TaskRevokedError", values
    if chord_ is not None:
        _chord_failed(chord_, side, c, rf"Dependency {cid} raised .*Revoked")


def _chord_failed(res: Any, side: Side, c: Client, match: str) -> None:
    """The chord's result is a ChordError. (Celery's ``get()`` raises the failed header
    task's own error first: the body's result has the header as its parent.)"""
    with pytest.raises(Exception) as info:  # noqa: PT011 - which one depends on the client
        _get(res, side)
    if c.kind == "qops":
        assert isinstance(info.value, c.chord_error), info.value
    deadline = time.monotonic() + T
    while res.state != "FAILURE":
        assert time.monotonic() < deadline, side.log_text()
        time.sleep(0.05)
    assert isinstance(res.result, c.chord_error), res.result
    assert re.search(match, str(res.result)), res.result


# -- rpc:// ----------------------------------------------------------------------------------


def test_rpc_chains_groups_and_revoke(rpc_client: Client, rpc_side: Side) -> None:
    """With rpc://, each result goes back to the client that sent the workflow."""
    test_chains_and_groups(rpc_client, rpc_side)
    test_revoke_in_group_and_chord(rpc_client, rpc_side)


@pytest.mark.parametrize("kind", ["celery", "qops"])
def test_rpc_refuses_chords(kind: str, amqp_url: str) -> None:
    """Celery's rpc backend has no chords; qops refuses them the same way, before
    anything is sent (a group followed by a task is a chord too)."""
    side = Side(amqp_url, "rpc://", True, {}, [])
    c: Client = (CeleryClient if kind == "celery" else QopsClient)(side)
    c.queue = "never-sent"
    from qops.errors import UsageError

    error = UsageError if kind == "qops" else NotImplementedError
    try:
        with pytest.raises(error, match="rpc"):
            c.chord([c.s("add", 1, 1)], c.s("xsum")).apply_async()
        with pytest.raises(error, match="rpc"):
            c.chain(c.s("add", 1, 1), c.group([c.s("mul", 2), c.s("mul", 3)]),
                    c.s("xsum")).apply_async()
    finally:
        c.close()


# -- Celery's built-in tasks, sent by a Celery client, on a qops worker -----------------------


def test_celery_builtins_run_on_a_qops_worker(side: Side) -> None:
    from celery.canvas import xmap, xstarmap
    from celery.result import GroupResult

    c = CeleryClient(side)
    q = side.queues["qops"]
    c.queue = q
    app = c.app
    try:
        starmap = xstarmap(c.s("add"), [(1, 2), (3, 4)], app=app).apply_async(queue=q)
        map_ = xmap(c.s("xsum"), [[1, 2], [3]], app=app).apply_async(queue=q)
        acc = app.send_task("celery.accumulate", (1, 2, 3), {"index": 1}, queue=q)
        cleanup = app.send_task("celery.backend_cleanup", queue=q)
        assert [_get(r, side) for r in (starmap, map_, acc, cleanup)] == \
            [[3, 7], [3, 3], 2, None]
        if side.rpc:
            return
        # chord_unlock as Celery's backends without a counter join send it: header
        # results as tuples, the body; polled until the header is ready
        header = GroupResult(str(uuid.uuid4()), [
            app.send_task("proj.tasks.add", (i, i), queue=q, countdown=0.3) for i in range(3)])
        body = c.s("xsum", task_id=str(uuid.uuid4()))
        app.send_task("celery.chord_unlock", (header.id, body),
                      {"result": [r.as_tuple() for r in header.results], "interval": 0.1,
                       "max_retries": 50}, queue=q)
        assert _get(app.AsyncResult(body.id), side) == 6
        # max_retries spent while a part is not ready: the chord fails
        body = c.s("xsum", task_id=str(uuid.uuid4()))
        never = app.AsyncResult(str(uuid.uuid4()))
        app.send_task("celery.chord_unlock", (header.id, body),
                      {"result": [never.as_tuple()], "interval": 0.05, "max_retries": 1},
                      queue=q)
        _chord_failed(app.AsyncResult(body.id), side, c, "chord_unlock could not be retried")
    finally:
        c.close()
