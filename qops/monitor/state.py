"""The cluster as events and broker polls show it: nodes up or gone, task counters by
state, runtime and queue-wait histograms, the tasks running now, the latest failures,
and the queues' counts.

Pure bookkeeping, fed from outside (``qops.monitor.feed``): ``apply`` takes one event
(docs/protocol.md §5), ``set_queues``/``set_dead_letters``/``set_broker_up`` the results
of a poll. Everything is counted from events, so a worker's restart does not reset a
counter. A node is up while its heartbeats keep coming: it is gone once none arrived
for ``grace`` heartbeat intervals, or after its ``worker-offline``. Times of liveness
are this process's clock (a node's clock may be off); durations are the sending node's.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

#: the ``state`` label of ``qops_tasks_total``, one per task event type
TASK_STATES = ("received", "started", "succeeded", "failed", "retried", "revoked",
               "rejected", "dead_lettered")

#: histogram bounds in seconds (Prometheus' ``le``); +Inf is implied
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
           300.0, 1800.0)


@dataclass
class Histogram:
    """Counts per bucket (not cumulative), their sum and count."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    sum: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        if value < 0.0:
            value = 0.0
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1  # the first bound >= value
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``(le, count of observations <= le)`` for each bound and +Inf."""
        out, total = [], 0
        for bound, n in zip((*BUCKETS, math.inf), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


@dataclass
class Node:
    name: str
    last_seen: float  # this process's clock
    freq: float = 2.0
    active: int = 0
    processed: int = 0
    loadavg: list[float] = field(default_factory=list)
    sw_ident: str = ""
    sw_ver: str = ""
    pid: int | None = None
    offline: bool = False
    succeeded: int = 0
    failed: int = 0
    rate: float = 0.0  # tasks/s, from ``processed`` between heartbeats
    _sample: tuple[float, int] | None = None

    def up(self, now: float, grace: float) -> bool:
        return not self.offline and now - self.last_seen <= max(self.freq, 0.1) * grace


@dataclass(slots=True)
class Running:
    uuid: str
    name: str
    hostname: str
    started: float  # the node's clock


@dataclass
class Failure:
    time: float
    uuid: str
    name: str
    hostname: str
    exception: str


@dataclass(slots=True)
class _Task:
    seen: float  # this process's clock
    name: str | None = None
    queue: str | None = None
    wait_from: float | None = None  # sent (Celery's task-sent), else received
    started: float | None = None
    done: bool = False
    # events held until the name is known (or out of order): (state, host, event, stamp)
    pending: list[tuple[str, str, dict[str, Any], float]] | None = None


#: seconds the events of a task without a name wait for its task-received
ORPHAN_WAIT = 5.0
_RANK = {"received": 0, "started": 1}
_FINAL = frozenset(("succeeded", "failed", "revoked", "rejected", "dead_lettered"))
_COUNTED = frozenset(TASK_STATES)


@dataclass
class QueueView:
    name: str
    ready: int
    in_flight: int | None
    consumers: int
    rate: float = 0.0  # growth of ready messages per second between polls
    out_rate: float | None = None  # tasks taken by workers per second (task events)
    _sample: tuple[float, int, int] | None = None  # (when, ready, taken so far)

    @property
    def in_rate(self) -> float | None:
        """Messages arriving per second: taken, plus the growth of the ready ones."""
        return None if self.out_rate is None else max(0.0, self.out_rate + self.rate)


class ClusterState:
    """The shared model (thread-safe). ``grace``: heartbeat intervals a node may miss
    before it counts as gone; ``keep_failures``: how many recent failures are kept;
    ``track``: how many task ids are remembered (for names and start times);
    ``forget``: seconds after which a node gone is no longer listed."""

    def __init__(self, *, grace: float = 3.0, keep_failures: int = 20,
                 track: int = 20000, forget: float = 3600.0) -> None:
        self.grace = grace
        self.forget = forget
        self.track = track
        self.lock = threading.Lock()
        self.nodes: dict[str, Node] = {}
        self.counts: dict[tuple[str, str], int] = {}
        self.queue_out: dict[str, int] = {}  # tasks taken from each queue (task-received)
        self.runtime: dict[str, Histogram] = {}
        self.queue_wait: dict[str, Histogram] = {}
        self.running: dict[str, Running] = {}
        self.failures: deque[Failure] = deque(maxlen=keep_failures)
        self.queues: dict[str, QueueView] = {}
        self.dead_letters: int | None = None
        self.broker_up = False
        self.events_seen = 0
        # what is known of recent tasks (task-started and later carry only the uuid)
        self._tasks: OrderedDict[str, _Task] = OrderedDict()
        self._orphans: OrderedDict[str, float] = OrderedDict()  # uuid -> when, name unknown

    # -- feeding ---------------------------------------------------------------------
    def apply(self, event: dict[str, Any], now: float | None = None) -> None:
        self.apply_many((event,), now)

    def apply_many(self, events: Collection[dict[str, Any]], now: float | None = None) -> None:
        """Apply the events of one message (a batch), under one lock."""
        now = time.time() if now is None else now
        nodes, task = self.nodes, self._task
        with self.lock:
            self.events_seen += len(events)
            for event in events:
                kind = str(event.get("type") or "")
                host = str(event.get("hostname") or "")
                if kind[:5] == "task-":
                    node = nodes.get(host)
                    if node is not None and not node.offline:
                        node.last_seen = now  # a task event proves it alive too
                    task(kind[5:], host, event, now)
                elif kind[:7] == "worker-":
                    self._worker(kind, host, event, now)

    def _worker(self, kind: str, host: str, e: dict[str, Any], now: float) -> None:
        node = self.nodes.get(host)
        if node is None:
            node = self.nodes[host] = Node(host, now)
        node.last_seen = now
        node.offline = kind == "worker-offline"
        node.freq = _float(e.get("freq"), node.freq)
        node.active = int(e.get("active") or 0)
        processed = int(e.get("processed") or 0)
        stamp = _float(e.get("timestamp"), now)
        if node._sample is not None and stamp > node._sample[0]:
            done = processed - node._sample[1]  # negative: the worker restarted
            node.rate = max(done, 0) / (stamp - node._sample[0])
        node._sample = (stamp, processed)
        node.processed = processed
        node.loadavg = [float(x) for x in e.get("loadavg") or []][:3]
        node.sw_ident = str(e.get("sw_ident") or node.sw_ident)
        node.sw_ver = str(e.get("sw_ver") or node.sw_ver)
        node.pid = e.get("pid") if isinstance(e.get("pid"), int) else node.pid
        if node.offline:
            node.active = 0
            for uuid in [u for u, r in self.running.items() if r.hostname == host]:
                del self.running[uuid]

    def _task(self, state: str, host: str, e: dict[str, Any], now: float) -> None:
        uuid = str(e.get("uuid") or "")
        stamp = e.get("timestamp")
        if stamp.__class__ is not float:
            stamp = _float(stamp, now)
        tasks = self._tasks
        entry = tasks.get(uuid)
        if entry is None:
            entry = tasks[uuid] = _Task(now)
            if len(tasks) > self.track:
                self._orphans.pop(tasks.popitem(last=False)[0], None)
        name = e.get("name")
        if name:
            entry.name = str(name)
        queue = e.get("queue")  # qops workers name the queue (Celery's task-sent too)
        if queue and isinstance(queue, str):
            entry.queue = queue
        if state == "sent" or (state == "received" and entry.wait_from is None):
            entry.wait_from = stamp  # Celery's task_send_sent_event: the wait starts there
        if state not in _COUNTED:
            return
        if entry.name is None or entry.pending is not None:
            # held: the name is not known yet, or earlier events wait for it
            if entry.pending is None:
                entry.pending = []
            entry.pending.append((state, host, e, stamp))
            if entry.name is None:
                self._orphans.setdefault(uuid, now)
                return
            self._settle(uuid, entry)
            return
        self._count(uuid, entry, state, host, e, stamp)

    def _settle(self, uuid: str, entry: _Task) -> None:
        """Count the events held for ``uuid`` until its name was known. Events of one
        task may come out of order (on RabbitMQ a worker's threads publish on
        connections of their own): they are counted received, started, then the rest."""
        self._orphans.pop(uuid, None)
        pending, entry.pending = entry.pending or [], None
        for state, host, e, stamp in sorted(pending, key=lambda p: _RANK.get(p[0], 2)):
            self._count(uuid, entry, state, host, e, stamp)

    def _count(self, uuid: str, entry: _Task, state: str, host: str, e: dict[str, Any],
               stamp: float) -> None:
        name = entry.name or ""
        counts = self.counts
        key = (name, state)
        counts[key] = counts.get(key, 0) + 1
        if state == "received" and entry.queue is not None:
            self.queue_out[entry.queue] = self.queue_out.get(entry.queue, 0) + 1
        if state == "started":
            entry.started = stamp
            if entry.wait_from is not None:
                _histogram(self.queue_wait, name).observe(stamp - entry.wait_from)
            if not entry.done:
                self.running[uuid] = Running(uuid, name, host, stamp)
            return
        self.running.pop(uuid, None)
        if state == "rejected":
            if e.get("dead_lettered"):  # moved to the dead-letter store (qops workers)
                key = (name, "dead_lettered")
                counts[key] = counts.get(key, 0) + 1
            if e.get("requeue"):
                return  # back in the queue: it runs again
        if state in _FINAL:
            entry.done = True
        node = self.nodes.get(host)
        if state in ("succeeded", "failed"):
            runtime = e.get("runtime")
            if runtime is None and entry.started is not None:
                runtime = stamp - entry.started
            if runtime is not None:
                _histogram(self.runtime, name).observe(_float(runtime, 0.0))
            if node is not None:
                if state == "succeeded":
                    node.succeeded += 1
                else:
                    node.failed += 1
        if state == "failed":
            self.failures.append(Failure(stamp, uuid, name, host,
                                         str(e.get("exception") or "")))

    def _flush(self, now: float) -> None:
        """Events of a task whose name never came (it was received before this process
        listened) are counted as task ``unknown`` after ``ORPHAN_WAIT`` seconds."""
        for uuid, seen in list(self._orphans.items()):
            if now - seen < ORPHAN_WAIT:
                break
            entry = self._tasks.get(uuid)
            if entry is None:
                self._orphans.pop(uuid, None)
                continue
            entry.name = "unknown"
            self._settle(uuid, entry)

    def set_queues(self, rows: list[Any], now: float | None = None) -> None:
        """The queues counted by a poll (``qops.queues.QueueCounts``); others are gone."""
        now = time.time() if now is None else now
        with self.lock:
            fresh: dict[str, QueueView] = {}
            for r in rows:
                old = self.queues.get(r.name)
                view = QueueView(r.name, r.ready, r.in_flight, r.consumers)
                taken = self.queue_out.get(r.name, 0)
                if old is not None and old._sample is not None and now > old._sample[0]:
                    span = now - old._sample[0]
                    view.rate = (r.ready - old._sample[1]) / span
                    if self.queue_out:  # the workers' events name queues
                        view.out_rate = max(0, taken - old._sample[2]) / span
                view._sample = (now, r.ready, taken)
                fresh[r.name] = view
            self.queues = fresh

    def set_dead_letters(self, count: int | None) -> None:
        with self.lock:
            self.dead_letters = count

    def set_broker_up(self, up: bool) -> None:
        with self.lock:
            self.broker_up = up

    # -- reading ---------------------------------------------------------------------
    def snapshot(self, now: float | None = None, *, failures: int = 10) -> dict[str, Any]:
        """Everything, as plain JSON-able data (``qops top --json`` prints it)."""
        now = time.time() if now is None else now
        with self.lock:
            self._flush(now)
            for name in [n for n, v in self.nodes.items() if now - v.last_seen > self.forget]:
                del self.nodes[name]
            nodes = [{"name": n.name, "up": n.up(now, self.grace),
                      "last_seen": round(now - n.last_seen, 3), "active": n.active,
                      "processed": n.processed, "succeeded": n.succeeded,
                      "failed": n.failed, "rate": round(n.rate, 3),
                      "loadavg": n.loadavg, "sw": f"{n.sw_ident} {n.sw_ver}".strip(),
                      "pid": n.pid} for n in sorted(self.nodes.values(), key=_name)]
            queues = [{"name": q.name, "ready": q.ready, "in_flight": q.in_flight,
                       "consumers": q.consumers, "rate": round(q.rate, 3),
                       "in_rate": _round(q.in_rate), "out_rate": _round(q.out_rate)}
                      for q in sorted(self.queues.values(), key=_name)]
            tasks: dict[str, dict[str, int]] = {}
            for (name, state), n in sorted(self.counts.items()):
                tasks.setdefault(name, {})[state] = n
            running = [{"uuid": r.uuid, "name": r.name, "hostname": r.hostname,
                        "runtime": round(max(0.0, now - r.started), 3)}
                       for r in sorted(self.running.values(), key=lambda r: r.started)]
            recent = [{"time": f.time, "uuid": f.uuid, "name": f.name,
                       "hostname": f.hostname, "exception": f.exception}
                      for f in list(self.failures)[-failures:][::-1]] if failures else []
            return {"broker_up": self.broker_up,
                    "workers_online": sum(1 for n in nodes if n["up"]),
                    "nodes": nodes, "queues": queues, "tasks": tasks,
                    "running": running, "failures": recent,
                    "queue_out": dict(self.queue_out),
                    "dead_letters": self.dead_letters}

    def histograms(self) -> dict[str, dict[str, Histogram]]:
        """Copies of ``runtime`` and ``queue_wait`` by task name."""
        with self.lock:
            return {"runtime": {k: _copy(h) for k, h in self.runtime.items()},
                    "queue_wait": {k: _copy(h) for k, h in self.queue_wait.items()}}


def _histogram(by_name: dict[str, Histogram], name: str) -> Histogram:
    h = by_name.get(name)
    if h is None:
        h = by_name[name] = Histogram()
    return h


def _copy(h: Histogram) -> Histogram:
    return Histogram(list(h.counts), h.sum, h.count)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _name(x: Any) -> str:
    return str(x.name)


def _float(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default
