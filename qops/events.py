"""Events (docs/protocol.md §5): worker-online/heartbeat/offline and task-* events.

Events go out on the ``<events>`` exchange (``qopsev``; ``celeryev`` with the celery
preset): topic on RabbitMQ, a fanout channel with the routing key appended on Redis.
The routing key is the event type with ``-`` as ``.`` (``worker.heartbeat``).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from qops.protocol import Message

if TYPE_CHECKING:
    from qops.app import App
    from qops.transports.base import Delivery

log = logging.getLogger(__name__)

SW_IDENT = "qops"
#: the event types a qops or Celery node sends (task-sent: a Celery client's, when asked)
TYPES = ("worker-online", "worker-heartbeat", "worker-offline", "task-sent",
         "task-received", "task-started", "task-succeeded", "task-failed", "task-retried",
         "task-rejected", "task-revoked")


def utcoffset() -> int:
    """Hours west of UTC, as Celery sends it."""
    offset = time.altzone if time.daylight and time.localtime().tm_isdst > 0 else time.timezone
    return offset // 3600


#: most task events in one batch: a fuller buffer is sent before its interval is up
BATCH_LIMIT = 200
#: routing key of a batch (a JSON list of task events), as Celery's workers send them
BATCH_KEY = "task.multi"


class EventDispatcher:
    """Sends events for one process of a node. Worker events always, each in a message
    of its own; task events when enabled, gathered for ``batch`` seconds (the setting
    ``worker_task_events_batch``) and sent as one JSON list (routing key ``task.multi``,
    Celery's format) by a thread of the dispatcher's own, or each alone when ``batch``
    is 0. Following a fleet costs its monitors a message per process and interval
    instead of one per event. ``close`` sends what is gathered."""

    def __init__(self, app: App, hostname: str, *, task_events: bool = False,
                 batch: float | None = None) -> None:
        from qops import __version__

        self.app = app
        self.hostname = hostname
        self.task_events = task_events
        self.exchange = app.names["events"]
        self.batch = float(app.conf.worker_task_events_batch if batch is None else batch)
        self.clock = 0
        self._lock = threading.Lock()
        self._sw = {"sw_ident": SW_IDENT, "sw_ver": __version__, "sw_sys": platform.system()}
        self._buffer: list[dict[str, Any]] = []
        self._ready = threading.Condition(self._lock)  # the buffer is no longer empty
        self._hurry = threading.Event()  # the buffer is full, or closing
        self._flusher: threading.Thread | None = None
        self._closed = False

    def send(self, type_: str, **fields: Any) -> None:
        task = type_.startswith("task-")
        if task and not self.task_events:
            return
        with self._lock:
            self.clock += 1
            event = {"type": type_, "hostname": self.hostname, "timestamp": time.time(),
                     "utcoffset": utcoffset(), "pid": os.getpid(), "clock": self.clock,
                     **fields}
            if task and self.batch > 0 and not self._closed:
                self._buffer.append(event)
                if len(self._buffer) == 1:
                    if self._flusher is None or not self._flusher.is_alive():
                        self._start_flusher()  # (again in a forked process)
                    self._ready.notify()
                elif len(self._buffer) >= BATCH_LIMIT:
                    self._hurry.set()
                return
        if type_ == "worker-offline":
            self.flush()  # the node's last task events go before it says it left
        if not task:
            event.update(self._sw)
        self._publish(event, type_.replace("-", "."))

    def worker_event(self, type_: str, *, freq: float, active: int, processed: int) -> None:
        try:
            load = list(os.getloadavg())
        except OSError:
            load = [0.0, 0.0, 0.0]
        self.send(type_, freq=freq, active=active, processed=processed, loadavg=load)

    def flush(self) -> None:
        """Send the task events gathered so far (one message)."""
        with self._lock:
            events, self._buffer = self._buffer, []
        if events:
            self._publish(events, BATCH_KEY)

    def close(self) -> None:
        """Send what is gathered and stop the flusher thread; later task events go out
        one by one."""
        with self._lock:
            self._closed = True
            self._ready.notify()
        self._hurry.set()
        if self._flusher is not None and self._flusher is not threading.current_thread():
            self._flusher.join(5.0)
        try:
            self.flush()
        except Exception as exc:
            log.debug("could not send the last task events: %s", exc)

    def _publish(self, body: Any, routing_key: str) -> None:
        raw = json.dumps(body, default=str).encode()
        self.app.transport.broadcast(self.exchange, Message(body=raw, headers={}),
                                     routing_key=routing_key)

    def _start_flusher(self) -> None:
        self._flusher = threading.Thread(target=self._flush_loop, name="events", daemon=True)
        self._flusher.start()

    def _flush_loop(self) -> None:
        while True:
            with self._lock:
                while not self._buffer and not self._closed:
                    self._ready.wait()
                if self._closed:
                    return
            self._hurry.wait(self.batch)  # gather for one interval, unless full
            self._hurry.clear()
            try:
                self.flush()
            except Exception as exc:  # the broker is away: these events are lost
                log.debug("could not send task events: %s", exc)


def dead_letter_fields(d: Delivery, reason: str) -> dict[str, Any]:
    """The fields of the ``task-rejected`` event a worker sends when it moves a message
    to the dead-letter store: Celery's (``uuid``, ``requeue`` false) and qops's
    ``dead_lettered`` (true), ``reason``, ``name`` and ``queue``. The id and the name
    come from the message's headers when it has them (else ``""`` and ``"unknown"``)."""
    headers = d.message.headers if d.message is not None else {}
    task_id, name = headers.get("id"), headers.get("task")
    return {"uuid": task_id if isinstance(task_id, str) else "",
            "name": name if isinstance(name, str) and name else "unknown",
            "requeue": False, "dead_lettered": True, "reason": reason, "queue": d.queue}


def receive(app: App, *, timeout: float | None = None, pattern: str = "#") -> Iterator[dict[str, Any]]:
    """Yield events as they arrive (a batched JSON list yields each of its events).

    Stops after ``timeout`` seconds without an event when a timeout is given."""
    sub = app.transport.subscribe(app.names["events"], pattern=pattern)
    try:
        while True:
            msg = sub.get(1.0 if timeout is None else timeout)
            if msg is None:
                if timeout is not None:
                    return
                continue
            yield from decode(msg.body)
    finally:
        sub.close()


def decode(body: bytes) -> list[dict[str, Any]]:
    """The events of one message body: one JSON event or a JSON list of them (anything
    else: none)."""
    try:
        data = json.loads(body)
    except ValueError:
        return []
    return [e for e in (data if isinstance(data, list) else [data]) if isinstance(e, dict)]
