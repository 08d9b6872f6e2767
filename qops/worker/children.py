"""Prefork pool children that consume for themselves (RabbitMQ): the parent's side.

With the prefork pool on a transport that says so (``Transport.consume_in_pool_children``:
AMQP), each pool child runs the worker's consumer loop on its own broker connection: it
takes a message, runs the task, stores the result and acks, with no hop through the
parent. The parent keeps what makes the node one node: remote control, heartbeats and
worker events, signals, and supervision of its children.

    parent (Worker, split: ChildPool)      child (PoolChild), one per pool slot
    ----------------------                 ---------------------------------------
    control server  -- Control ---->       runs the same handler, replies
                    <-- Reply ------       (Pool.gather merges the replies)
    warm shutdown   -- Stop ------->       finishes its task, requeues the rest, exits
    hard-limit watchdog (reads the slot)   writes its running task to a shared slot
    respawns a child that ends             Bye with its counts, then exits

The child's side is qops/worker/child.py; the pipe messages and the slot table both
sides use are in qops/worker/shared.py. Imports: the node imports this module, this
one the child's, and that one the consumer loop.

Why: on RabbitMQ the parent's one connection was the bottleneck (consume, dispatch and
ack for every child); see bench/README.md for the numbers.

What differs from the parent-consumes design, all per child instead of per node:
the prefetch (``worker_prefetch_multiplier`` messages each, the same total), rate limits
(each child gets an equal share of the node's rate) and ETA tasks (held by the child
that received them, run when it is free).

A child that dies takes its connection with it, and RabbitMQ delivers again what it
held, the task it was running included; nothing can ack that one any more. So the
parent reads from the dead child's slot which task it was running and, unless the
task's ``reject_on_worker_lost`` wants it run again, records it as lost (in every
child, and in the slot for a sibling that gets the message before hearing of it): the
redelivered message then fails with WorkerLostError on this node instead of running.
A hard time limit is a signal in the child (the task is interrupted, FAILURE stored,
the message acked and the child replaced); a task that does not stop within
``HARD_LIMIT_GRACE`` is killed by the parent and, delivered again here, fails with
TimeLimitExceeded. Another node that gets such a message runs it (at-least-once).
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import queue
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from qops import errors
from qops.backends.base import FAILURE, REVOKED
from qops.worker.child import child_main
from qops.worker.pool import Pool, describe_status
from qops.worker.prefork import fork_child, signal_child
from qops.worker.shared import (
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
    ToChild,
    lost_error,
    new_table,
)

if TYPE_CHECKING:
    from qops.worker.consumer import ConsumerLoop

log = logging.getLogger("qops.worker")

FORWARD_TIMEOUT = 0.5  # seconds the parent waits for its children's control replies


class _Child:
    def __init__(self, index: int, pid: int, conn: Connection, term: mmap.mmap,
                 slot: Slot) -> None:
        self.index = index
        self.pid = pid
        self.conn = conn
        self.term = term
        self.slot = slot
        self.born = time.monotonic()
        self.send_lock = threading.Lock()
        self.ready = threading.Event()
        self.ended = threading.Event()
        self.failure: Failed | None = None  # why it could not start
        self.retired = False  # said bye: its counts are the worker's now
        self.killed = False  # by the hard-limit watchdog


class ChildPool(Pool):
    """The parent's side: starts, watches and replaces the children, and talks to them.

    ``record`` is the node's consumer loop, which does not consume here: children start
    from its revoked and lost tasks and its queues, and their counts end up in it."""

    name = "prefork"

    def __init__(self, record: ConsumerLoop, concurrency: int,
                 max_tasks_per_child: int | None, *, prefetch: int, task_events: bool,
                 child_init: Callable[[int], None] | None = None) -> None:
        super().__init__(record.app, concurrency, max_tasks_per_child)
        self.record = record
        self.prefetch = prefetch  # each child's
        self.task_events = task_events  # until the node's event dispatcher exists
        self.child_init = child_init
        self.children: dict[int, _Child] = {}  # slot index (from 1) -> child
        self.table = new_table()
        self._cond = threading.Condition()  # children, _replies
        self._spawning = threading.RLock()
        self._replies: dict[int, list[Any]] = {}
        self._seq = itertools.count(1)
        self._stopping = threading.Event()
        # (slot index, not before): children to start on the supervisor thread
        self._due: queue.SimpleQueue[tuple[int, float]] = queue.SimpleQueue()

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the children and wait until each consumes (or one could not).

        Children are forked on this thread and, later, on the supervisor thread only:
        PR_SET_PDEATHSIG kills a child when the *thread* that forked it ends, so both
        live as long as the children."""
        started = [self._spawn(index) for index in range(1, self.concurrency + 1)]
        failed = None
        for child in started:
            if child is None:
                continue
            while not child.ready.wait(0.1):
                if child.ended.is_set():
                    failed = child
                    break
            if failed:
                break
        if failed is not None:
            self.stop()
            name, message = failed.failure or Failed("QopsError", "a pool process exited "
                                                      "at start-up")
            cls = getattr(errors, name, None)
            if not (isinstance(cls, type) and issubclass(cls, errors.QopsError)):
                cls = errors.QopsError
            raise cls(message)
        threading.Thread(target=self._supervise, name="pool-supervisor", daemon=True).start()

    def _spawn(self, index: int) -> _Child | None:
        with self._spawning:
            if self._stopping.is_set() or index in self.children:
                return None
            slot = Slot(self.table, index)
            ppid = os.getpid()
            pid, conn, term = fork_child(
                lambda c, t: child_main(self, index, c, t, slot, ppid))
            child = _Child(index, pid, conn, term, slot)
            with self._cond:
                self.children[index] = child
            threading.Thread(target=self._keep, args=(child,), name=f"pool-{index}",
                             daemon=True).start()
            return child

    def _keep(self, child: _Child) -> None:
        """Read what the child says until it ends; then reap it and start a new one
        unless the pool is stopping or shrank."""
        while True:
            try:
                msg = child.conn.recv()
            except (EOFError, OSError):
                break
            if isinstance(msg, Reply):
                with self._cond:
                    if msg.seq in self._replies:
                        self._replies[msg.seq].append(msg.reply)
                        self._cond.notify_all()
            elif isinstance(msg, Ready):
                child.ready.set()
            elif isinstance(msg, Failed):
                child.failure = msg
            elif isinstance(msg, Bye):
                record = self.record
                with record.lock:
                    for name, n in msg.processed.items():
                        record.processed[name] = record.processed.get(name, 0) + n
                    child.retired = True
        child.conn.close()
        try:
            _, status = os.waitpid(child.pid, 0)
        except ChildProcessError:
            status = None
        if not child.retired:
            self._lost(child, status)
        with self._cond:
            if self.children.get(child.index) is child:
                del self.children[child.index]
            self._cond.notify_all()
        child.ended.set()
        if self._stopping.is_set() or child.index > self.concurrency:
            return  # (before start() is done, the supervisor takes the request later)
        if child.failure is not None:
            log.error("pool process %d could not start: %s; trying again", child.pid,
                      child.failure.message)
        elif not child.retired:
            log.error("pool process %d ended (%s); starting a new one", child.pid,
                      describe_status(status))
        # one that could not even start (broker down?) must not be replaced in a loop
        self._due.put((child.index, child.born + 1.0))

    def _lost(self, child: _Child, status: int | None) -> None:
        """A child died: decide about the task it was running (see the module doc)."""
        view = child.slot.read()
        if view.state != RUNNING:
            return
        record, task_id, name = self.record, view.task_id, view.name
        task = record.app.tasks.get(name)
        if task_id in record.revoked:  # killed by revoke --terminate
            log.warning("Task %s[%s] terminated (revoked)", name, task_id)
            child.slot.end(view.done)
            if record.has_backend:  # (delivered again, it is revoked again: not run)
                try:
                    record.app.backend.store(task_id, REVOKED,
                                             errors.TaskRevokedError("terminated"))
                except Exception as err:
                    log.error("Task %s[%s]: could not store REVOKED: %s", name, task_id, err)
            return
        verdict = TIMED_OUT if child.killed else LOST
        exc = lost_error(verdict, status)
        if verdict == LOST and task is not None and record.requeue_when_lost(task):
            log.error("Task %s[%s]: %s; RabbitMQ delivers it again", name, task_id, exc)
            how = describe_status(status)
            record.lost_books.how[task_id] = how  # for children started later
            self._tell_all(Died(task_id, how))  # before the slot ends
            child.slot.end(view.done)
            return
        log.error("Task %s[%s] failed: %s", name, task_id, exc)
        record.lost[task_id] = (verdict, status)
        child.slot.mark(verdict, status)
        self._tell_all(Lost(task_id, verdict, status))
        if task is not None and not record.acks_late_for(name) and record.has_backend:
            # acked before it ran: no redelivery will record the failure
            try:
                record.app.backend.store(task_id, FAILURE, exc)
            except Exception as err:
                log.error("Task %s[%s]: could not store FAILURE: %s", name, task_id, err)

    def _supervise(self) -> None:
        """Start children in place of those that ended; kill a child whose task ran past
        its hard time limit without stopping. Ends once the pool stopped."""
        waiting: dict[int, float] = {}
        while True:
            try:
                index, when = self._due.get(timeout=0.25)
                waiting[index] = when
            except queue.Empty:
                pass
            if self._stopping.is_set():
                waiting.clear()
                with self._cond:
                    if not self.children:
                        return
            now = time.monotonic()
            for index, when in list(waiting.items()):
                if when <= now:
                    del waiting[index]
                    if index <= self.concurrency:
                        try:
                            self._spawn(index)
                        except OSError as exc:
                            log.error("could not start a pool process: %s", exc)
            self._enforce_hard_limits(now)

    def _enforce_hard_limits(self, now: float) -> None:
        for child in list(self.children.values()):
            view = child.slot.read()
            if view.state != RUNNING or not view.deadline or now < view.deadline \
                    or child.killed:
                continue
            child.killed = True
            log.error("Task %s[%s] did not stop at its hard time limit: killing pool "
                      "process %d", view.name, view.task_id, child.pid)
            signal_child(child.pid, child.term, signal.SIGKILL)

    def _wait_gone(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self.children:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return
                self._cond.wait(left)

    def stop(self, timeout: float | None = None) -> None:
        """Warm: each child finishes its task, gives back what it holds and exits."""
        self._stopping.set()
        self._tell_all(Stop())
        self._wait_gone(timeout)

    def terminate(self) -> None:
        """Cold: kill the children; RabbitMQ requeues whatever they held."""
        self._stopping.set()
        for child in list(self.children.values()):
            signal_child(child.pid, child.term, signal.SIGKILL)
        self._wait_gone(10.0)

    # -- talking to the children --------------------------------------------------------------
    def _tell(self, child: _Child, msg: ToChild) -> bool:
        try:
            with child.send_lock:
                child.conn.send(msg)
            return True
        except (OSError, ValueError):  # it ended
            return False

    def _tell_all(self, msg: ToChild) -> None:
        for child in list(self.children.values()):
            self._tell(child, msg)

    def gather(self, method: str, arguments: dict[str, Any], reply: Any) -> Any:
        seq = next(self._seq)
        with self._cond:
            self._replies[seq] = []
            asked = [c for c in self.children.values() if c.ready.is_set() and not c.retired]
        sent = sum(self._tell(c, Control(seq, method, arguments)) for c in asked)
        deadline = time.monotonic() + FORWARD_TIMEOUT
        with self._cond:
            while len(self._replies[seq]) < sent:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            theirs = self._replies.pop(seq)
        if len(theirs) < sent:
            log.warning("control %s: %d of %d pool processes did not answer in %gs", method,
                        sent - len(theirs), sent, FORWARD_TIMEOUT)
        return merge(method, reply, theirs)

    # -- facts and changes ------------------------------------------------------------------
    def pipes(self) -> list[Connection]:
        """This process's ends of the children's pipes (a new child closes its copies)."""
        return [c.conn for c in list(self.children.values())]

    def pids(self) -> list[int]:
        return [c.pid for c in list(self.children.values())]

    def busy(self) -> int:
        return sum(1 for c in list(self.children.values()) if c.slot.read().state == RUNNING)

    def processed_elsewhere(self) -> int:
        return sum(c.slot.read().done for c in list(self.children.values()) if not c.retired)

    def terminate_job(self, task_id: str, sig: int) -> bool:
        for child in list(self.children.values()):
            view = child.slot.read()
            if view.state == RUNNING and view.task_id == task_id:
                signal_child(child.pid, child.term, sig)
                return True
        return False

    def grow(self, n: int) -> None:
        if self.concurrency + n > MAX_CHILDREN:
            raise errors.UsageError(f"a node has at most {MAX_CHILDREN} pool processes")
        self.concurrency += n
        self._tell_all(Share(self.concurrency))
        for index in range(1, self.concurrency + 1):
            self._due.put((index, 0.0))  # a no-op for slots that have a child

    def restart(self) -> None:
        """pool_restart: every child finishes its task, gives back what it holds and
        exits; the supervisor forks a new one in its place (a second after the old one
        was born, at the soonest)."""
        self._tell_all(Stop())

    def shrink(self, n: int) -> None:
        self._fewer(n)
        for child in list(self.children.values()):
            self._tell(child, Stop() if child.index > self.concurrency
                       else Share(self.concurrency))


def merge(method: str, mine: Any, theirs: list[Any]) -> Any:
    """One node's reply from the parent's and its children's."""
    if isinstance(mine, list):
        return mine + [item for reply in theirs if isinstance(reply, list) for item in reply]
    if not isinstance(mine, dict) or "error" in mine:
        return mine
    if method == "query_task":
        found = dict(mine)
        for reply in theirs:
            found.update(reply)
        return found
    failed = [r for r in theirs if isinstance(r, dict) and "error" in r]
    if failed:
        return failed[0]
    if method == "stats":
        total: Counter[str] = Counter(mine.get("total", {}))
        for reply in theirs:
            total.update(reply.get("total", {}))
        return {**mine, "total": dict(total)}
    return mine
