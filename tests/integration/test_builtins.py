"""Celery's built-in tasks as qops registers them (qops/builtins.py), called in-process on
the memory transport: the messages they send are checked, no worker runs."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from qops import App, protocol
from qops.protocol import TaskRequest


@pytest.fixture
def app() -> Iterator[App]:
    url = f"memory://{uuid.uuid4().hex}"
    a = App("builtins", broker=url, backend=url, compat="celery")
    a.task(name="t.add")(lambda x, y: x + y)
    a.task(name="t.xsum")(lambda xs: sum(xs))
    yield a
    a.close()


def _sent(app: App, n: int) -> list[TaskRequest]:
    consumer = app.transport.consumer([app.default_queue], 100)
    out = []
    for _ in range(n):
        d = consumer.get(1.0)
        assert d is not None and d.message is not None
        out.append(protocol.parse_task_message(d.message))
    assert consumer.get(0.05) is None
    return out


def _sig(name: str, *args: Any) -> dict[str, Any]:
    return {"task": name, "args": list(args), "kwargs": {}, "options": {},
            "subtask_type": None, "immutable": False}


def test_every_celery_builtin_is_registered(app: App) -> None:
    assert {"celery.chord_unlock", "celery.chord", "celery.group", "celery.chain",
            "celery.map", "celery.starmap", "celery.chunks", "celery.accumulate",
            "celery.backend_cleanup"} <= set(app.tasks)


def test_map_starmap_accumulate_run_here(app: App) -> None:
    t = app.tasks
    assert t["celery.starmap"](_sig("t.add"), [[1, 2], [3, 4]]) == [3, 7]
    assert t["celery.map"](_sig("t.xsum"), [[1, 2], [3]]) == [3, 3]
    assert t["celery.accumulate"](1, 2, 3, index=2) == 3
    assert t["celery.accumulate"](1, 2) == [1, 2]
    t["celery.backend_cleanup"]()


def test_chunks_sends_one_starmap_per_chunk(app: App) -> None:
    app.tasks["celery.chunks"](_sig("t.add"), [[1, 1], [2, 2], [3, 3]], 2)
    reqs = _sent(app, 2)
    assert [r.name for r in reqs] == ["celery.starmap"] * 2
    assert [r.args[1] for r in reqs] == [[[1, 1], [2, 2]], [[3, 3]]]
    assert reqs[0].group == reqs[1].group and reqs[0].group is not None


def test_chord_and_group_by_name_take_the_previous_result(app: App) -> None:
    """As a chain step sent by name, the previous result comes first."""
    header = {"task": "celery.group", "args": [], "kwargs": {"tasks": [_sig("t.add", 1)]},
              "options": {}, "subtask_type": "group", "immutable": False}
    app.tasks["celery.chord"](5, header=header, body=_sig("t.xsum"), kwargs={})
    unlock, part = sorted(_sent(app, 2), key=lambda r: r.name)
    assert unlock.name == "celery.chord_unlock" and part.args == [5, 1]
    assert part.chord is not None and part.chord["task"] == "t.xsum"
    assert part.group == unlock.args[0]  # the chord's group id
    gid = app.tasks["celery.group"](2, tasks=[_sig("t.add", 1), _sig("t.add", 2)])
    reqs = _sent(app, 2)
    assert [r.args for r in reqs] == [[2, 1], [2, 2]] and {r.group for r in reqs} == {gid}
