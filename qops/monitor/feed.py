"""Feeding a ``ClusterState`` from the broker: one thread receives events, another
polls queue counts, dead letters and the broker's health.

Both survive the broker going away: an error marks the broker down
(``ClusterState.broker_up``), drops the app's connections, and the thread tries again
after a back-off, until the broker is back. Task events are sent only by workers told
to (``-E``); unless ``enable_events`` is False, the feed asks every node for them
(``enable_events``) on start, on reconnect, when a node first shows up and when it comes
online again.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from qops.monitor.state import ClusterState

if TYPE_CHECKING:
    from qops.app import App

log = logging.getLogger(__name__)

#: seconds an event may wait before the follower reads it (SQLite polls this often and
#: reads what came at once; top draws once a second, Prometheus scrapes every 15 s)
FOLLOW_LAG = 0.1

class Feed:
    def __init__(self, app: App, state: ClusterState | None = None, *,
                 poll_interval: float = 2.0, enable_events: bool = True,
                 queues: list[str] | None = None) -> None:
        self.app = app
        self.state = state or ClusterState()
        self.poll_interval = poll_interval
        self.enable_events = enable_events
        self.queues = queues or None
        self.polls = 0  # polls tried, answered or not (``top --once`` waits for one)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._asked: set[str] = set()  # nodes asked for task events
        self._backoff = 0.5  # seconds before subscribing again after a failure

    def start(self) -> Feed:
        for target, name in ((self._events_loop, "monitor-events"),
                             (self._poll_loop, "monitor-poll")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)

    def __enter__(self) -> Feed:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- events ------------------------------------------------------------------------
    def _events_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._listen()
            except Exception as exc:  # the broker went away: try again
                self._down("events", exc)
                self._stop.wait(self._backoff)
                self._backoff = min(self._backoff * 2, 5.0)

    def _listen(self) -> None:
        """Apply events until stopped, on one subscription (kept while idle: events sent
        between two subscriptions would be lost)."""
        from qops.events import decode

        sub = self.app.transport.subscribe(self.app.names["events"], pattern="#", lag=FOLLOW_LAG)
        self._backoff = 0.5  # subscribed: the next failure starts again from a short wait
        try:
            while not self._stop.is_set():
                msg = sub.get(0.5)
                if msg is None:
                    continue
                events = decode(msg.body)  # a batch from a worker process, or one event
                self.state.apply_many(events)
                if self.enable_events:
                    for event in events:
                        self._maybe_enable(event)
        finally:
            sub.close()

    def _maybe_enable(self, event: dict[str, object]) -> None:
        kind = str(event.get("type", ""))
        if not kind.startswith("worker-"):
            return
        host = str(event.get("hostname") or "")
        if host and (host not in self._asked or kind == "worker-online"):
            # (a node that restarted under the same name starts without task events)
            self._asked.add(host)
            self._ask_for_events([host])

    def _ask_for_events(self, nodes: list[str] | None) -> None:
        from qops.control import broadcast

        try:
            broadcast(self.app, "enable_events", destination=nodes, reply=False, timeout=5.0)
        except Exception as exc:
            log.debug("enable_events: %s", exc)

    # -- polls -------------------------------------------------------------------------
    def _poll_loop(self) -> None:
        was_up = False
        while not self._stop.is_set():
            up = self.poll_once()
            if up and not was_up and self.enable_events:
                self._asked.clear()
                self._ask_for_events(None)
            was_up = up
            self._stop.wait(self.poll_interval)

    def poll_once(self) -> bool:
        """Count the queues and dead letters now; whether the broker answered."""
        from qops import queues as q

        try:
            transport = self.app.transport
            transport.ping()
            if self.queues:  # the named queues that exist by now
                names = [n for n in self.queues if transport.queue_exists(n)]
                rows = q.listing(self.app, names).queues if names else []
            else:
                rows = q.listing(self.app).queues
            dead = transport.dead_letter_count()
        except Exception as exc:
            self._down("poll", exc)
            return False
        finally:
            self.polls += 1
        self.state.set_queues(rows)
        self.state.set_dead_letters(dead)
        self.state.set_broker_up(True)
        return True

    def _down(self, what: str, exc: Exception) -> None:
        if self.state.broker_up:
            log.warning("monitor: broker unreachable (%s): %s", what, exc)
        self.state.set_broker_up(False)
        try:
            self.app.close()  # connect afresh next time
        except Exception:
            pass


def wait_for(predicate: object, timeout: float, interval: float = 0.1) -> bool:
    """Poll ``predicate`` (a callable) until true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return False
