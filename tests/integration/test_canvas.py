"""chain, group, chord with real workers on each transport; signatures as dicts."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from qops import protocol
from qops.canvas import chain, chord, group, maybe_signature, propagate_chain_failure
from qops.errors import ChordError, UsageError
from qops.result import AsyncResult, GroupResult
from qops.task import signature
from tests.conftest import shared_broker_url
from tests.helpers import WorkerProcess, qops_env, wait_until


def _apps_have_builtins() -> bool:
    from qops import App

    return "celery.chord_unlock" in App("probe-builtins").tasks


needs_builtins = pytest.mark.skipif(
    not _apps_have_builtins(),
    reason="App.__init__ does not call qops.canvas.register_builtins yet")
@pytest.fixture(scope="module", params=["sqlite", "redis", "amqp"])
def urls(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(broker, result backend) of each transport for the whole module (RabbitMQ keeps
    results in Redis): every test sends its own workflows and waits for their results
    by id, so they share one worker instead of starting one each."""
    folder = tmp_path_factory.mktemp(f"canvas-{request.param}")
    with ExitStack() as stack:
        broker = stack.enter_context(shared_broker_url(request.param, request, folder))
        backend = broker if request.param != "amqp" else \
            stack.enter_context(shared_broker_url("redis", request, folder))
        yield broker, backend


@pytest.fixture(scope="module")
def proj(urls: tuple[str, str],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The example app on the module's broker, with a worker running."""
    import proj.tasks
    from proj.qops import app

    broker, backend = urls
    app.conf.set("broker_url", broker, layer="cli")
    app.conf.set("result_backend", backend, layer="cli")
    app.close()
    log = tmp_path_factory.mktemp("canvas-worker") / "worker.log"
    try:
        with WorkerProcess("-c", "4", "-P", "threads", broker=broker, backend=backend,
                           env=qops_env(), logfile=log):
            yield proj.tasks
    finally:
        app.conf._layers["cli"].clear()
        app.close()


def test_chain_of_chain_and_pipe(proj) -> None:
    t = proj
    assert chain(t.add.s(4, 4) | t.mul.s(8))().get(timeout=20) == 64
    r = (t.add.s(2, 2) | t.mul.s(4)).delay()
    assert r.get(timeout=10) == 16
    assert r.parent.get(timeout=10) == 4 and r.parent.parent is None  # Celery's parent
    assert chain(t.add.s(1, 1), t.mul.si(3, 3), t.add.s(1)).apply_async().get(timeout=10) == 10
    assert signature("proj.tasks.add", args=(2, 2)).delay().get(timeout=10) == 4


def test_chain_options_go_to_every_task(proj, tmp_path, urls) -> None:
    """A chain sent to a queue runs there entirely (a worker on that queue only)."""
    t = proj
    queue = f"cq-{uuid.uuid4().hex[:8]}"
    broker, backend = urls
    with WorkerProcess("-Q", queue, "-P", "threads", broker=broker, backend=backend,
                       logfile=tmp_path / "q.log"):
        res = (t.add.s(2, 2) | t.mul.s(4) | t.add.s(1)).apply_async(queue=queue)
        assert res.get(timeout=20) == 17
        res = (t.add.s(1, 1) | t.mul.s(2)).set(queue=queue).delay()
        assert res.get(timeout=20) == 4


def test_group_results_in_order(proj) -> None:
    t = proj
    res = group(t.add.s(i, i) for i in range(10))()
    assert isinstance(res, GroupResult) and len(res) == 10
    assert res.get(timeout=20) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]
    assert res.ready() and res.successful() and not res.failed()
    assert res.completed_count() == 10
    assert [r.get() for r in res] == list(range(0, 20, 2))
    # slow first member: order is the members', not completion's
    res = group([t.sleep.s(0.5), t.add.s(1, 1)]).apply_async()
    assert res.get(timeout=20) == [0.5, 2]


def test_group_failure(proj) -> None:
    t = proj
    res = group([t.add.s(1, 1), t.fail.s("member"), t.add.s(2, 2)]).apply_async()
    with pytest.raises(ValueError, match="member"):
        res.get(timeout=20)
    assert wait_until(res.ready, timeout=10)
    assert res.failed() and not res.successful() and res.completed_count() == 2
    values = res.get(timeout=5, propagate=False)
    assert values[0] == 2 and isinstance(values[1], ValueError) and values[2] == 4


@needs_builtins
def test_chord(proj) -> None:
    t = proj
    assert chord(t.add.s(i, i) for i in range(5))(t.xsum.s()).get(timeout=30) == 20
    assert chord([t.add.s(1, 1), t.mul.s(3, 3)], t.xsum.s())().get(timeout=30) == 11
    # group | task is a chord
    assert (group(t.add.s(i, i) for i in range(4)) | t.xsum.s())().get(timeout=30) == 12
    # chord | more: the rest goes after the body
    res = (group(t.add.s(1, 1), t.add.s(2, 2)) | t.xsum.s() | t.mul.s(10)).delay()
    assert res.get(timeout=30) == 60


@needs_builtins
def test_groups_and_chords_inside_chains(proj) -> None:
    t = proj
    # a group at the end: the chain's result is the group's
    res = (t.add.s(1, 1) | group(t.mul.s(2), t.mul.s(3)))()
    assert isinstance(res, GroupResult)
    assert res.get(timeout=30) == [4, 6]
    # a group in the middle becomes a chord
    res = (t.add.s(1, 1) | group(t.mul.s(2), t.mul.s(3)) | t.xsum.s())()
    assert res.get(timeout=30) == 10
    # a chain inside a group
    res = group(t.add.s(1, 1) | t.mul.s(5), t.add.s(2, 2))()
    assert res.get(timeout=30) == [10, 4]


@needs_builtins
def test_chord_member_failure_fails_the_chord(proj) -> None:
    t = proj
    res = chord([t.add.s(1, 1), t.fail.si("in header")], t.xsum.s())()
    with pytest.raises(ChordError, match=r"Dependency .* raised ValueError\('in header'\)"):
        res.get(timeout=30)
    assert res.failed()


def test_failing_chain_member_fails_the_chain(proj) -> None:
    t = proj
    res = (t.add.s(1, 1) | t.fail.si("mid-chain") | t.add.s(1) | t.mul.s(2))()
    with pytest.raises(ValueError, match="mid-chain"):
        res.get(timeout=20)
    assert res.failed() and "ValueError: mid-chain" in (res.traceback or "")


@needs_builtins
def test_failing_chain_inside_a_chord_header(proj) -> None:
    t = proj
    res = chord([t.fail.si("deep") | t.add.s(1), t.add.s(1, 1)], t.xsum.s())()
    with pytest.raises(ChordError, match="deep"):
        res.get(timeout=30)


def test_link_and_link_error(proj) -> None:
    t = proj
    cb_id, eb_id = str(uuid.uuid4()), str(uuid.uuid4())
    t.add.apply_async((2, 2), link=t.mul.s(3).set(task_id=cb_id))
    assert proj.add.app.AsyncResult(cb_id).get(timeout=20) == 12
    failing = t.fail.apply_async(("linked",), link_error=t.add.si(1, 2).set(task_id=eb_id))
    assert proj.add.app.AsyncResult(eb_id).get(timeout=20) == 3
    with pytest.raises(ValueError):
        failing.get(timeout=5)


def test_a_celery_style_errback_is_called_with_request_exc_traceback(proj, tmp_path) -> None:
    """An errback taking (request, exc, traceback) is called where the task failed, as
    Celery does -- not sent with the task id, which does not fit it (it was dead-lettered);
    an old-style one beside it is still sent."""
    t = proj
    path, eb_id = tmp_path / "errbacks.txt", str(uuid.uuid4())
    failing = t.fail.apply_async(("boom",), link_error=[
        t.errback.s(str(path)), t.add.si(1, 2).set(task_id=eb_id)])
    with pytest.raises(ValueError):
        failing.get(timeout=20)
    assert proj.add.app.AsyncResult(eb_id).get(timeout=20) == 3
    assert wait_until(path.exists, timeout=10)
    task_id, exc_type, has_tb, _pid = path.read_text().split()
    assert (task_id, exc_type, has_tb) == (failing.id, "ValueError", "True")


# -- without a worker -------------------------------------------------------------------------


def test_signatures_are_protocol_dicts() -> None:
    import proj.tasks as t

    c = t.add.s(1, 1) | group(t.mul.s(2), t.mul.s(3)) | t.xsum.s()
    d = json.loads(protocol.dumps(c))
    assert d["subtask_type"] == "chain" and d["task"] == "celery.chain"
    first, second = d["kwargs"]["tasks"]
    assert set(first) == {"task", "args", "kwargs", "options", "subtask_type", "immutable"}
    assert second["subtask_type"] == "chord"
    assert second["kwargs"]["header"]["subtask_type"] == "group"
    assert [m["task"] for m in second["kwargs"]["header"]["kwargs"]["tasks"]] == \
        ["proj.tasks.mul", "proj.tasks.mul"]
    back = maybe_signature(d)
    assert isinstance(back, chain) and isinstance(back.tasks[1], chord)
    assert repr(back) == repr(c)
    assert t.add.si(1, 2).immutable and t.add.s(1).set(queue="q").options == {"queue": "q"}


def test_chain_travels_in_the_message(memory_url: str) -> None:
    """The first message carries the rest of the chain, reversed, with ids chosen."""
    from qops import App

    app = App("canvasmsg", broker=memory_url, backend=memory_url)
    add = app.task(name="m.add")(lambda x, y: x + y)
    res = (add.s(1, 1) | add.s(2) | add.s(3)).apply_async()
    consumer = app.transport.consumer([app.default_queue], 10)
    d = consumer.get(1.0)
    assert d is not None and d.message is not None
    req = protocol.parse_task_message(d.message)
    assert req.args == [1, 1] and req.chain is not None
    assert [s["args"] for s in req.chain] == [[3], [2]]  # reversed: the worker pops
    assert req.chain[0]["options"]["task_id"] == res.id
    app.close()


def test_propagate_chain_failure_stores_the_failure(memory_url: str) -> None:
    from qops import App

    app = App("canvasfail", broker=memory_url, backend=memory_url)
    ids = [str(uuid.uuid4()) for _ in range(4)]
    rest: list[dict[str, Any]] = [{"task": "x", "args": [], "kwargs": {}, "options": {"task_id": ids[0]},
             "subtask_type": None, "immutable": False},
            {"task": "celery.group", "args": [], "kwargs": {"tasks": [
                {"task": "x", "args": [], "kwargs": {}, "options": {"task_id": ids[1]},
                 "subtask_type": None, "immutable": False}]},
             "options": {"task_id": "g"}, "subtask_type": "group", "immutable": False},
            {"task": "celery.chord", "args": [], "kwargs": {
                "header": {"task": "celery.group", "args": [], "kwargs": {"tasks": []},
                           "options": {}, "subtask_type": "group", "immutable": False},
                "body": {"task": "x", "args": [], "kwargs": {}, "options": {"task_id": ids[2]},
                         "subtask_type": None, "immutable": False}},
             "options": {}, "subtask_type": "chord", "immutable": False}]
    meta = protocol.exception_to_dict(KeyError("gone"))
    propagate_chain_failure(app, rest, meta, "Traceback: KeyError")
    for tid in ids[:3]:
        r = AsyncResult(tid, app=app)
        assert r.failed() and r.traceback == "Traceback: KeyError"
        with pytest.raises(KeyError):
            r.get(timeout=1)
    assert AsyncResult(ids[3], app=app).state == "PENDING"
    propagate_chain_failure(app, None, meta)  # nothing to do
    app.close()


def test_chord_refuses_rpc_backend() -> None:
    from qops import App

    app = App("canvasrpc", broker=f"memory://{uuid.uuid4().hex}", backend="rpc://")
    add = app.task(name="r.add")(lambda x, y: x + y)
    with pytest.raises(UsageError, match="rpc://"):
        chord([add.s(1, 1)], add.s(1))()
    app.close()


def test_group_result_api_without_a_worker(memory_url: str) -> None:
    from qops import App

    app = App("canvasgr", broker=memory_url, backend=memory_url)
    a, b = AsyncResult("a", app=app), AsyncResult("b", app=app)
    res = GroupResult("g", [a, b], app=app)
    assert not res.ready() and res.completed_count() == 0 and len(res) == 2
    app.backend.store("a", "SUCCESS", 1)
    assert res.completed_count() == 1 and not res.ready()
    from qops.errors import ResultTimeout

    with pytest.raises(ResultTimeout):
        res.get(timeout=0.2)
    app.backend.store("b", "SUCCESS", 2)
    assert res.ready() and res.successful() and res.join(timeout=1) == [1, 2]
    app.close()
