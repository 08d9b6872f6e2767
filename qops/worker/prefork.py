"""The prefork pool: each slot is a parent thread that owns one child process and a pipe
to it. The thread sends a job, waits for the outcome -- at most the hard time limit,
after which it kills the child and starts a new one -- and reports the outcome. A child
that dies mid-task is reported as LOST. Children die with the parent
(PR_SET_PDEATHSIG).

A module of its own (``make_pool`` imports it): multiprocessing's pipes, ctypes and mmap
cost a solo or threads worker memory it would never use.
"""

from __future__ import annotations

import ctypes
import mmap
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, Pipe
from typing import TYPE_CHECKING, Any

from qops import protocol
from qops.backends.base import SUCCESS
from qops.errors import TimeLimitExceeded, WorkerLostError
from qops.worker.pool import STOP, Pool, describe_status, log, report, stop_and_join
from qops.worker.request import LOST, execute

if TYPE_CHECKING:
    from qops.app import App

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def fork_child(main: Callable[[Connection, mmap.mmap], int]
               ) -> tuple[int, Connection, mmap.mmap]:
    """Fork a pool child that runs ``main`` with its end of a pipe and its TERM flag
    (see signal_child) and exits with the code it returns (1 if it raises). Returns the
    child's pid, our end of the pipe and the flag."""
    parent_conn, child_conn = Pipe()
    term = mmap.mmap(-1, 1)  # shared with the child
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            parent_conn.close()
            code = main(child_conn, term)
        except BaseException:
            log.exception("pool process %d failed", os.getpid())
        finally:
            os._exit(code)
    child_conn.close()
    return pid, parent_conn, term


def signal_child(pid: int, term: mmap.mmap, sig: int) -> None:
    """Send ``sig`` to a pool child (revoke --terminate). Children ignore a TERM that
    was not meant for them alone (one sent to the whole process group, as systemd's
    KillMode=control-group does, must not cut their tasks short); the flag tells them
    that this one is."""
    if sig == signal.SIGTERM:
        term[0] = 1
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _send(conn: Connection, obj: dict[str, Any]) -> None:
    """A job or an outcome down the pipe, pickled as plain data: multiprocessing's own
    ``send`` builds a ForkingPickler (a Pickler subclass with a copy of its dispatch
    table) for every call, a seventh of the parent's time a task (bench/README.md)."""
    conn.send_bytes(pickle.dumps(obj, pickle.HIGHEST_PROTOCOL))


def _receive(conn: Connection) -> dict[str, Any]:
    obj: dict[str, Any] = pickle.loads(conn.recv_bytes())
    return obj


class _Child:
    def __init__(self, pid: int, conn: Connection, term: mmap.mmap) -> None:
        self.pid = pid
        self.conn = conn
        self.term = term
        self.done = 0


class _Slot(threading.Thread):
    def __init__(self, pool: PreforkPool, index: int) -> None:
        super().__init__(name=f"prefork-slot-{index}", daemon=True)
        self.pool = pool
        self.index = index
        self.child: _Child | None = None
        self.job: dict[str, Any] | None = None
        self.stopping = False
        self.generation = 0  # the pool's generation its child was forked in
        self.lock = threading.Lock()  # the child and the job, against restart()

    def spawn(self) -> None:
        self.generation = self.pool.generation
        ppid = os.getpid()
        pid, parent_conn, term = fork_child(
            lambda conn, term: _child_main(self.pool, self.index, conn, term, ppid))
        self.child = _Child(pid, parent_conn, term)
        if self.pool.on_child_start:
            self.pool.on_child_start(pid)

    def reap(self, kill: bool) -> int | None:
        child, self.child = self.child, None
        if child is None:
            return None
        if kill:
            signal_child(child.pid, child.term, signal.SIGKILL)
        child.conn.close()
        try:
            _, status = os.waitpid(child.pid, 0)
        except ChildProcessError:
            return None
        return status

    def run(self) -> None:
        # A child is forked on this thread (PR_SET_PDEATHSIG kills a child when the
        # thread that forked it ends): a slot added by pool_grow on the control thread
        # gets its first child here, and pool_restart's new children are made here.
        pool = self.pool
        with self.lock:
            self.renew()
        while True:
            try:
                item = pool.jobs.get(timeout=0.5)
            except queue.Empty:
                if self.generation != pool.generation:
                    with self.lock:
                        self.renew()  # pool_restart, while idle
                continue
            if item is STOP:
                break
            job, on_done, hard, start = item
            with self.lock:
                self.renew()  # a pool_restart asked before this job: a new child runs it
            if start is not None and not start():
                continue
            # Started now (STARTED stored, task-started sent): a pool_restart asked from
            # here on replaces the child after this job, never before it.
            with self.lock:
                if self.child is None:  # reaped meanwhile (a cold shutdown)
                    self.spawn()
                assert self.child is not None
                job["worker_pid"] = self.child.pid
                self.job = job
            pool._mark(job, True)
            try:
                outcome = self._run_one(job, hard)
            finally:
                pool._mark(job, False)
                with self.lock:
                    self.job = None
                    if self.generation != pool.generation and not self.stopping:
                        self.renew()  # restarted while it ran: replace it now
            report(on_done, outcome)
        self.reap(kill=False)

    def renew(self) -> None:
        """A child of the pool's current generation (the slot's lock held): the one
        it has, or a new one in place of an older or missing one."""
        child = self.child
        if child is not None and self.generation != self.pool.generation:
            # it runs nothing now; TERM, since a sibling forked meanwhile may hold our
            # end of its pipe open, so that it would not see EOF
            signal_child(child.pid, child.term, signal.SIGTERM)
            self.reap(kill=False)
        if self.child is None:
            self.spawn()

    def _run_one(self, job: dict[str, Any], hard: float | None) -> dict[str, Any]:
        child = self.child
        assert child is not None
        start = time.monotonic()
        try:
            _send(child.conn, job)
            if hard and not child.conn.poll(hard):
                self.reap(kill=True)
                exc = TimeLimitExceeded(f"hard time limit ({hard}s) exceeded")
                return {"state": "FAILURE", "result": protocol.exception_to_dict(exc),
                        "traceback": None, "runtime": time.monotonic() - start}
            outcome: dict[str, Any] = _receive(child.conn)
        except (EOFError, OSError):
            status = self.reap(kill=True)
            how = describe_status(status)
            exc2 = WorkerLostError(f"pool process exited during the task ({how})")
            return {"state": LOST, "result": protocol.exception_to_dict(exc2),
                    "traceback": None, "runtime": time.monotonic() - start, "how": how}
        child.done += 1
        if outcome.pop("_exit", False):
            self.reap(kill=False)
        return outcome


def child_process_setup(index: int, ppid: int, term: mmap.mmap,
                        child_init: Callable[[int], None] | None) -> bool:
    """First steps in a freshly forked pool child; False if the parent is gone already."""
    _die_with_parent()
    if os.getppid() != ppid:  # the parent died before prctl took effect
        return False
    # The parent decides about shutdown: a TERM or INT sent to the whole process group
    # must not stop a task half-way (warm shutdown lets it finish). A TERM the parent
    # sends to this child alone (signal_child) ends it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def on_term(signum: int, frame: Any) -> None:
        if term[0]:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    from qops.ops.daemon import reopen_log_files

    signal.signal(signal.SIGHUP, lambda *_: reopen_log_files())  # logrotate
    os.environ.pop("NOTIFY_SOCKET", None)  # systemd hears from the worker, not its pool
    os.environ["QOPS_POOL_INDEX"] = str(index)
    multiprocessing.current_process().name = f"PoolWorker-{index}"  # in log lines
    if child_init:
        child_init(index)
    return True


def _child_main(pool: PreforkPool, index: int, conn: Connection, term: mmap.mmap,
                ppid: int) -> int:
    if not child_process_setup(index, ppid, term, pool.child_init):
        return 0
    done = 0
    limit = pool.max_tasks_per_child
    while True:
        try:
            job = _receive(conn)
        except (EOFError, OSError):
            return 0
        outcome = execute(pool.app, job)
        if job.get("store") and outcome["state"] == SUCCESS:
            try:
                pool.app.backend.store(job["id"], SUCCESS, outcome["result"],
                                       reply_to=job.get("reply_to"))
            except Exception as exc:  # as the parent would log it
                log.error("Task %s[%s]: could not store %s: %s", job["name"], job["id"],
                          SUCCESS, exc)
            outcome["stored"] = True  # (not again by the parent: the backend said why)
        done += 1
        if limit and done >= limit:
            outcome["_exit"] = True
        _send(conn, outcome)
        if outcome.get("_exit"):
            return 0


class PreforkPool(Pool):
    name = "prefork"
    task_crash_kills_node = False
    stores_results = True

    def __init__(self, app: App, concurrency: int, max_tasks_per_child: int | None = None,
                 on_child_start: Callable[[int], None] | None = None,
                 child_init: Callable[[int], None] | None = None) -> None:
        super().__init__(app, concurrency, max_tasks_per_child, on_child_start)
        self.child_init = child_init
        self.slots: list[_Slot] = []
        self.generation = 0  # pool_restart: children of an older one are replaced

    def start(self) -> None:
        for _ in range(self.concurrency):
            self._add_slot()

    def _add_slot(self, spawn: bool = True) -> None:
        slot = _Slot(self, len(self.slots) + 1)
        if spawn:
            slot.spawn()  # children start now, so a broken app fails at start-up
        self.slots.append(slot)
        slot.start()

    def stop(self, timeout: float | None = None) -> None:
        stop_and_join(self.jobs, self.slots, timeout)

    def terminate(self) -> None:
        for s in self.slots:
            s.stopping = True
            s.reap(kill=True)
        for _ in self.slots:
            self.jobs.put(STOP)

    def pids(self) -> list[int]:
        return [s.child.pid for s in self.slots if s.child is not None]

    def terminate_job(self, task_id: str, sig: int) -> bool:
        for s in self.slots:
            if s.job is not None and s.job["id"] == task_id and s.child is not None:
                signal_child(s.child.pid, s.child.term, sig)
                return True
        return False

    def grow(self, n: int) -> None:
        for _ in range(n):
            self._add_slot(spawn=False)  # forked on the slot's thread, not the caller's
        self.concurrency += n

    def restart(self) -> None:
        """New children forked from the node as it is now, each by its slot's thread:
        idle ones within half a second, busy ones as soon as their task is done."""
        self.generation += 1
