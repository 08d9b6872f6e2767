"""Task events go out in batches (one JSON list per process and interval, routing key
``task.multi``, Celery's format): ``qops events``' receiver and Celery's own receiver
(what Flower runs) still see each event."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from qops import App
from qops.events import BATCH_KEY, EventDispatcher, decode, receive


def _task_events(disp: EventDispatcher, uuid: str) -> None:
    disp.send("task-received", uuid=uuid, name="proj.add", args="(1, 2)", kwargs="{}",
              queue="q1")
    disp.send("task-started", uuid=uuid, queue="q1")
    disp.send("task-succeeded", uuid=uuid, result="3", runtime=0.01)


def test_one_message_per_interval_seen_as_events(real_broker_url: str) -> None:
    app = App("proj", broker=real_broker_url)
    sub = app.transport.subscribe(app.names["events"], pattern=BATCH_KEY)  # task.multi
    beats = app.transport.subscribe(app.names["events"], pattern="worker.*")
    disp = EventDispatcher(app, "w1@h", task_events=True, batch=0.2)
    try:
        start = time.monotonic()
        _task_events(disp, "a")
        _task_events(disp, "b")
        msg = sub.get(5.0)
        took = time.monotonic() - start
        assert msg is not None
        events = decode(msg.body)
        assert [(e["type"], e["uuid"]) for e in events] == [
            ("task-received", "a"), ("task-started", "a"), ("task-succeeded", "a"),
            ("task-received", "b"), ("task-started", "b"), ("task-succeeded", "b")]
        assert [e["clock"] for e in events] == list(range(1, 7))
        assert events[0]["queue"] == "q1" and events[0]["hostname"] == "w1@h"
        assert 0.15 < took < 3.0  # gathered for the interval, then sent at once
        assert sub.get(0.5) is None  # one message
        # worker events go alone, at once
        disp.worker_event("worker-heartbeat", freq=2.0, active=0, processed=2)
        msg = beats.get(5.0)
        assert msg is not None and decode(msg.body)[0]["type"] == "worker-heartbeat"
    finally:
        disp.close()
        sub.close()
        beats.close()
        app.close()


def test_close_sends_what_is_gathered_and_zero_sends_each(sqlite_url: str) -> None:
    app = App("proj", broker=sqlite_url)
    sub = app.transport.subscribe(app.names["events"], pattern="#")
    slow = EventDispatcher(app, "w1@h", task_events=True, batch=10.0)
    single = EventDispatcher(app, "w2@h", task_events=True, batch=0)
    try:
        _task_events(slow, "a")
        assert sub.get(0.3) is None  # still gathering
        slow.close()  # as a worker or a pool child stops
        msg = sub.get(2.0)
        assert msg is not None and len(decode(msg.body)) == 3
        _task_events(single, "b")
        got = [sub.get(2.0) for _ in range(3)]
        assert [decode(m.body)[0]["type"] for m in got if m is not None] == [
            "task-received", "task-started", "task-succeeded"]
    finally:
        single.close()
        sub.close()
        app.close()


def test_worker_offline_goes_after_the_last_task_events(sqlite_url: str) -> None:
    app = App("proj", broker=sqlite_url)
    disp = EventDispatcher(app, "w1@h", task_events=True, batch=10.0)
    seen: list[str] = []
    ready = threading.Event()

    def listen() -> None:
        ready.set()
        for event in receive(app, timeout=2.0):
            seen.append(str(event["type"]))

    thread = threading.Thread(target=listen)
    thread.start()
    try:
        assert ready.wait(5)
        time.sleep(0.3)  # subscribed
        _task_events(disp, "a")
        disp.worker_event("worker-offline", freq=2.0, active=0, processed=1)
        thread.join(10)
        assert seen == ["task-received", "task-started", "task-succeeded", "worker-offline"]
    finally:
        disp.close()
        app.close()


@pytest.mark.redis
def test_celery_receiver_sees_each_event_of_a_batch(redis_url: str) -> None:
    """Celery's EventReceiver (Flower's) with --compat celery: the batch's events one by
    one, and its State (Flower's model) makes a SUCCESS task of them; qops's extra
    fields (queue) do not get in the way."""
    from celery import Celery
    from celery.events.state import State

    app = App("proj", broker=redis_url, compat="celery")
    capp = Celery("client", broker=redis_url)
    got: list[dict[str, Any]] = []
    state = State()

    def on_event(event: dict[str, Any]) -> None:
        got.append(event)
        state.event(event)

    ready = threading.Event()

    def capture() -> None:
        with capp.connection() as conn:
            recv = capp.events.Receiver(conn, handlers={"*": on_event})
            ready.set()
            try:
                recv.capture(limit=3, timeout=10, wakeup=False)
            except Exception:  # a timeout: the assertions below say what is missing
                pass

    thread = threading.Thread(target=capture)
    thread.start()
    disp = EventDispatcher(app, "w1@h", task_events=True, batch=0.1)
    try:
        assert ready.wait(10)
        time.sleep(0.5)  # its subscription is in place
        _task_events(disp, "a")
        thread.join(15)
        assert [e["type"] for e in got] == ["task-received", "task-started",
                                           "task-succeeded"]
        task = state.tasks["a"]
        assert (task.name, task.state, task.worker.hostname) == ("proj.add", "SUCCESS",
                                                                 "w1@h")
    finally:
        disp.close()
        app.close()
        capp.close()
