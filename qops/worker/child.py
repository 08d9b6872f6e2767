"""A pool child that consumes for itself (prefork on RabbitMQ): its main loop.

The parent's side -- starting, watching and replacing the children, forwarding
remote control -- is ``ChildPool`` in qops/worker/children.py, whose docstring tells
the design; the pipe messages and the slot table both sides use are in
qops/worker/shared.py. This module is what runs in the child after the fork: it is
not a Worker (the node) but owns a consumer loop (qops/worker/consumer.py), and talks
to the parent only through the pipe and its slot.
"""

from __future__ import annotations

import logging
import mmap
import threading
import time
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from qops.events import EventDispatcher
from qops.worker.consumer import ConsumerLoop
from qops.worker.control import run_task_command
from qops.worker.pool import InlinePool
from qops.worker.prefork import child_process_setup
from qops.worker.shared import (
    HARD_LIMIT_GRACE,
    LOST,
    MAX_CHILDREN,
    RUNNING,
    TIMED_OUT,
    Bye,
    Control,
    Died,
    Failed,
    Lost,
    Ready,
    Reply,
    Share,
    Slot,
    Stop,
    ToParent,
    lost_error,
)

if TYPE_CHECKING:
    from qops.worker.children import ChildPool

log = logging.getLogger("qops.worker")

KEEPALIVE_EVERY = 1.0  # seconds between broker keepalives while a child runs a task


def child_main(pool: ChildPool, index: int, conn: Connection, term: mmap.mmap,
               slot: Slot, ppid: int) -> int:
    if not child_process_setup(index, ppid, term, pool.child_init):
        return 0
    for other in pool.pipes():
        other.close()  # the parent's ends of the siblings' pipes
    return PoolChild(pool, index, conn, slot).run()


class PoolChild:
    """One pool child that consumes for itself: a consumer loop of its own (its own
    consumer, an inline pool, its timer run by the loop, its share of the rate
    limits), a thread that answers the parent, and the slot the parent reads. No
    control server or heartbeat of its own: the parent has them and forwards the
    commands about tasks."""

    def __init__(self, pool: ChildPool, index: int, conn: Connection, slot: Slot) -> None:
        record = pool.record
        self.app = record.app
        self.index = index
        self.conn = conn
        self.slot = slot
        self.max_tasks_per_child = pool.max_tasks_per_child
        self.task_events = record.events.task_events if record.events else pool.task_events
        self.loop = ConsumerLoop(record.app, hostname=record.hostname, queues=record.queues,
                                 prefetch=pool.prefetch, rate_share=pool.concurrency,
                                 lost_verdict=self.lost_verdict)
        self.loop.revoked.merge(record.revoked.items())
        self.loop.lost.update(record.lost)
        self.loop.lost_books.how.update(record.lost_books.how)
        self.siblings = [Slot(pool.table, i) for i in range(1, MAX_CHILDREN + 1)
                         if i != index]
        self._send_lock = threading.Lock()
        self._done = 0

    def send(self, msg: ToParent) -> None:
        try:
            with self._send_lock:
                self.conn.send(msg)
        except (OSError, ValueError):
            pass  # the parent is gone; PR_SET_PDEATHSIG ends us

    def run(self) -> int:
        loop = self.loop
        try:
            loop.apply_rate_limits()
            loop.connect()
        except Exception as exc:
            self.send(Failed(type(exc).__name__, str(exc)))
            return 1
        pool = InlinePool(self.app, self.max_tasks_per_child, on_run=self._on_run)
        loop.pool = pool
        loop.events = EventDispatcher(self.app, loop.hostname, task_events=self.task_events)
        threading.Thread(target=self._serve_parent, name="parent", daemon=True).start()
        self.send(Ready())
        try:
            loop.run_inline(pool)
        finally:
            loop.give_back(loop.take_back())
            loop.events.close()  # its last task events, and its thread stopped
            self.app.close()
            with loop.lock:
                self.send(Bye(dict(loop.processed)))
        return 0

    def _on_run(self, job: dict[str, Any] | None, hard: float | None) -> None:
        """Keep the slot the parent reads up to date."""
        if job is None:
            self._done += 1
            self.slot.end(self._done)
            return
        deadline = time.monotonic() + hard + HARD_LIMIT_GRACE if hard else 0.0
        self.slot.begin(str(job["id"]), str(job["name"]), deadline, self._done)

    def lost_verdict(self, task_id: str) -> Exception | None:
        """A redelivered task: did a sibling die running it? If a sibling's slot still
        shows it running, the parent has not decided yet: wait for the verdict (or for
        the sibling to finish it, if it only lost its connection)."""
        lost = self.loop.lost
        deadline = time.monotonic() + HARD_LIMIT_GRACE + 3.0
        while task_id not in lost and time.monotonic() < deadline:
            running = False
            for slot in self.siblings:
                view = slot.read()
                if view.task_id != task_id:
                    continue
                if view.state in (LOST, TIMED_OUT):
                    lost[task_id] = (view.state, view.status)
                running = running or view.state == RUNNING
            if not running:
                break
            time.sleep(0.02)
        verdict = lost.pop(task_id, None)
        return None if verdict is None else lost_error(*verdict)

    def _keepalive(self) -> None:
        consumer = self.loop.consumer
        if consumer is None:
            return
        try:
            consumer.keepalive()
        except Exception as exc:  # the main loop sees a lost connection itself
            log.debug("keepalive failed: %s", exc)

    def _serve_parent(self) -> None:
        """Answer the parent; while idle, keep the broker connection alive (the main
        thread does not pump it while a task runs)."""
        loop = self.loop
        while True:
            try:
                if not self.conn.poll(KEEPALIVE_EVERY):
                    self._keepalive()
                    continue
                msg = self.conn.recv()
            except (EOFError, OSError):
                return
            if isinstance(msg, Control):
                self.send(Reply(msg.seq, run_task_command(loop, msg.method, msg.arguments)))
            elif isinstance(msg, Stop):
                loop.stop()
            elif isinstance(msg, Lost):
                loop.lost[msg.task_id] = (msg.verdict, msg.status)
            elif isinstance(msg, Died):
                loop.lost_books.how[msg.task_id] = msg.how
            elif isinstance(msg, Share):
                loop.rate_limits.reshare(msg.concurrency)
