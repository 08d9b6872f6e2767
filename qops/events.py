"""Events (docs/protocol.md §5): worker-online/heartbeat/offline and task-* events.

Events go out on the ``<events>`` exchange (``qopsev``; ``celeryev`` with the celery
preset): topic on RabbitMQ, a fanout channel with the routing key appended on Redis.
The routing key is the event type with ``-`` as ``.`` (``worker.heartbeat``).
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from qops.protocol import Message

if TYPE_CHECKING:
    from qops.app import App

SW_IDENT = "qops"


def utcoffset() -> int:
    """Hours west of UTC, as Celery sends it."""
    offset = time.altzone if time.daylight and time.localtime().tm_isdst > 0 else time.timezone
    return offset // 3600


class EventDispatcher:
    """Sends events for one node. Worker events always; task events when enabled."""

    def __init__(self, app: App, hostname: str, *, task_events: bool = False) -> None:
        from qops import __version__

        self.app = app
        self.hostname = hostname
        self.task_events = task_events
        self.exchange = app.names["events"]
        self.clock = 0
        self._lock = threading.Lock()
        self._sw = {"sw_ident": SW_IDENT, "sw_ver": __version__, "sw_sys": platform.system()}

    def send(self, type_: str, **fields: Any) -> None:
        if type_.startswith("task-") and not self.task_events:
            return
        with self._lock:
            self.clock += 1
            clock = self.clock
        event = {"type": type_, "hostname": self.hostname, "timestamp": time.time(),
                 "utcoffset": utcoffset(), "pid": os.getpid(), "clock": clock, **fields}
        if type_.startswith("worker-"):
            event.update(self._sw)
        body = json.dumps(event, default=str).encode()
        self.app.transport.broadcast(self.exchange, Message(body=body, headers={}),
                                     routing_key=type_.replace("-", "."))

    def worker_event(self, type_: str, *, freq: float, active: int, processed: int) -> None:
        try:
            load = list(os.getloadavg())
        except OSError:
            load = [0.0, 0.0, 0.0]
        self.send(type_, freq=freq, active=active, processed=processed, loadavg=load)


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
