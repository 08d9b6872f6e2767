"""Plain sends reuse the Outgoing of the last one like them (qops/outgoing.py,
``Recent``); anything that makes a send different gets its own."""

from __future__ import annotations

import os
from typing import Any

import pytest

from qops import App
from qops.protocol import decode_envelope, encode_envelope
from qops.task import Context


@pytest.fixture
def app() -> Any:
    a = App("o", broker="memory://outgoing", task_ignore_result=True)

    @a.task(name="o.add")
    def add(x: int, y: int) -> int:
        return x + y

    yield a
    a.close()


def _messages(app: Any, **options: Any) -> Any:
    return app.tasks["o.add"]._outgoing(dict(options)).messages


def test_plain_sends_share_one_task_messages_and_stay_distinct(app: Any) -> None:
    add = app.tasks["o.add"]
    assert _messages(app) is _messages(app)
    assert _messages(app, queue="q", priority=3) is _messages(app, queue="q", priority=3)
    sent = [add.message((i, i)) for i in range(3)]
    ids = {m.headers["id"] for _, m in sent}
    assert len(ids) == 3 and all(m.headers["root_id"] == m.headers["id"] for _, m in sent)
    for i, (queue, message) in enumerate(sent):  # (the template's envelope, read back)
        back = decode_envelope(encode_envelope(queue, message))
        assert back.body.startswith(f"[[{i},{i}]".encode())
        assert back.headers["argsrepr"] == f"[{i}, {i}]"


@pytest.mark.parametrize("options", [
    {"countdown": 5}, {"eta": None, "expires": 60}, {"task_id": "fixed"},
    {"link": {"task": "o.add", "args": [1], "kwargs": {}, "options": {}}},
    {"parent_id": "p", "root_id": "r"}, {"retries": 1}, {"group": "g", "group_index": 0},
])
def test_sends_with_their_own_options_are_not_shared(app: Any,
                                                     options: dict[str, Any]) -> None:
    assert _messages(app, **options) is not _messages(app, **options)


def test_what_changes_the_messages_gets_a_new_one(app: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    add = app.tasks["o.add"]
    first = _messages(app)
    for option in ({"queue": "other"}, {"priority": 5}, {"time_limit": 3},
                   {"ignore_result": False}, {"shadow": "alias"}):
        assert _messages(app, **option) is not first, option
    add.time_limit = 30  # a task attribute
    assert _messages(app) is not first and _messages(app).time_limits == (30, None)
    add.time_limit = None
    app.conf.task_default_priority = 4  # any setting
    assert _messages(app) is not first and _messages(app).priority == 4
    now = _messages(app)
    monkeypatch.setattr(os, "getpid", lambda: -1)  # a forked child: its own origin
    assert _messages(app) is not now
    monkeypatch.undo()
    app.close()
    assert _messages(app) is not now


def test_a_send_from_a_running_task_is_its_child(app: Any) -> None:
    plain = _messages(app)
    app.push_request(Context(id="parent-1", root_id="root-1"))
    try:
        inside = _messages(app)
        assert inside is not plain and inside.headers["parent_id"] == "parent-1"
        assert inside.root_id == "root-1"
    finally:
        app.pop_request()
    assert _messages(app) is plain
