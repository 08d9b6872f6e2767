"""Execution pools: solo, threads and prefork.

Every pool takes jobs from one queue, in order. A job starts when a thread or slot takes
it from the queue: its ``start()`` is called then, on that thread (the consumer loop
checks the task again and marks it started there: see ConsumerLoop.begin), and says
whether it runs. ``drain_unstarted`` empties the queue (warm shutdown).

prefork: each slot is a parent thread that owns one child process and a pipe to it.
The thread sends a job, waits for the outcome -- at most the hard time limit, after
which it kills the child and starts a new one -- and reports the outcome. A child that
dies mid-task is reported as LOST. Children die with the parent (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import multiprocessing
import os
import queue
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection, Pipe
from typing import TYPE_CHECKING, Any

from qops import protocol
from qops.errors import TimeLimitExceeded, UsageError, WorkerLostError
from qops.worker.request import LOST, execute

if TYPE_CHECKING:
    from qops.app import App

log = logging.getLogger("qops.worker")

OnDone = Callable[[dict[str, Any]], None]
#: called when a slot takes the job, on its thread: False, and the job does not run
Start = Callable[[], bool]
_STOP = object()


class Pool(ABC):
    name = ""
    #: a task that kills its process kills the node too (threads, solo): its start must
    #: reach the broker before it runs, or a node that dies of it is never counted as a
    #: worker loss (qops/worker/lost.py). Where a child runs it, the parent sees the
    #: death and counts it itself.
    task_crash_kills_node = True

    def __init__(self, app: App, concurrency: int, max_tasks_per_child: int | None = None,
                 on_child_start: Callable[[int], None] | None = None) -> None:
        self.app = app
        self.concurrency = max(1, concurrency)
        self.max_tasks_per_child = max_tasks_per_child
        self.on_child_start = on_child_start
        # (SimpleQueue: put and get in C, no task_done bookkeeping: per task, it counts)
        self.jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.running: dict[str, dict[str, Any]] = {}  # task id -> job, while it runs
        self._lock = threading.Lock()

    def submit(self, job: dict[str, Any], on_done: OnDone, hard_limit: float | None,
               start: Start | None = None) -> None:
        """Run ``job`` when a slot is free, if ``start()`` (called then) says so; else the
        job is dropped (``on_done`` is not called: ``start`` saw to it)."""
        self.jobs.put((job, on_done, hard_limit, start))

    def drain_unstarted(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            try:
                item = self.jobs.get_nowait()
            except queue.Empty:
                return out
            if item is not _STOP:
                out.append(item[0])

    def busy(self) -> int:
        with self._lock:
            return len(self.running)

    def running_jobs(self) -> list[dict[str, Any]]:
        """The jobs running now (a copy)."""
        with self._lock:
            return list(self.running.values())

    def processed_elsewhere(self) -> int:
        """Tasks finished by processes that report them to no one else (pool children
        that consume for themselves)."""
        return 0

    def gather(self, method: str, arguments: dict[str, Any], reply: Any) -> Any:
        """A remote-control reply of this node, given the worker's own ``reply``: pools
        whose processes take tasks themselves ask them too and merge the answers."""
        return reply

    def _mark(self, job: dict[str, Any], started: bool) -> None:
        with self._lock:
            if started:
                job["time_start"] = time.time()
                self.running[job["id"]] = job
            else:
                self.running.pop(job["id"], None)

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self, timeout: float | None = None) -> None:
        """Warm: let running jobs finish, then stop."""

    @abstractmethod
    def terminate(self) -> None:
        """Cold: stop at once, killing what runs."""

    def pids(self) -> list[int]:
        return [os.getpid()]

    def terminate_job(self, task_id: str, sig: int) -> bool:
        """Signal the process running ``task_id`` (prefork only)."""
        return False

    @abstractmethod
    def grow(self, n: int) -> None: ...

    def restart(self) -> None:
        """Replace every pool process by a new one (``pool_restart``), each once its
        task is done; pools that have no processes of their own have nothing to do."""
        return None

    def shrink(self, n: int) -> None:
        """Run ``n`` fewer jobs at a time (at least one): as many stop markers as that
        go into the job queue, and each ends the thread or slot that takes it once its
        job is done."""
        for _ in range(self._fewer(n)):
            self.jobs.put(_STOP)

    def _fewer(self, n: int) -> int:
        """Lower the concurrency by ``n``, keeping at least one; returns by how much."""
        n = min(n, self.concurrency - 1)
        self.concurrency -= n
        return n


class ThreadPool(Pool):
    """Runs tasks in threads of the worker process. Time limits are not enforced here
    (a thread cannot be killed); use prefork for them."""

    name = "threads"

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._run, name=f"{self.name}-{i + 1}",
                                         daemon=True) for i in range(self.concurrency)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        while True:
            item = self.jobs.get()
            if item is _STOP:
                return
            job, on_done, _hard, start = item
            if start is not None and not start():
                continue
            job["worker_pid"] = os.getpid()
            self._mark(job, True)
            try:
                outcome = execute(self.app, job)
            finally:
                self._mark(job, False)
            _report(on_done, outcome)

    def stop(self, timeout: float | None = None) -> None:
        _stop_and_join(self.jobs, self.threads, timeout)

    def terminate(self) -> None:
        for _ in self.threads:
            self.jobs.put(_STOP)

    def grow(self, n: int) -> None:
        for i in range(n):
            t = threading.Thread(target=self._run, name=f"{self.name}-{len(self.threads) + i}",
                                 daemon=True)
            self.threads.append(t)
            t.start()
        self.concurrency += n


class SoloPool(ThreadPool):
    """One task at a time."""

    name = "solo"

    def __init__(self, app: App, concurrency: int = 1, **kwargs: Any) -> None:
        super().__init__(app, 1, **kwargs)


def _stop_and_join(jobs: queue.SimpleQueue[Any], threads: list[Any],
                   timeout: float | None) -> None:
    """One stop marker per thread (each takes one and ends), then wait for them all."""
    for _ in threads:
        jobs.put(_STOP)
    deadline = None if timeout is None else time.monotonic() + timeout
    for t in threads:
        t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))


def _report(on_done: OnDone, outcome: dict[str, Any]) -> None:
    try:
        on_done(outcome)
    except Exception:  # the worker logs its own errors; this keeps the pool alive
        log.exception("error while handling a task outcome")


# -- prefork ------------------------------------------------------------------------------

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
            if item is _STOP:
                break
            job, on_done, hard, start = item
            if start is not None and not start():
                continue
            with self.lock:
                self.renew()
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
            _report(on_done, outcome)
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
            child.conn.send(job)
            ready = child.conn.poll(hard) if hard else child.conn.poll(None)
            if not ready:
                self.reap(kill=True)
                exc = TimeLimitExceeded(f"hard time limit ({hard}s) exceeded")
                return {"state": "FAILURE", "result": protocol.exception_to_dict(exc),
                        "traceback": None, "runtime": time.monotonic() - start}
            outcome: dict[str, Any] = child.conn.recv()
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


def describe_status(status: int | None) -> str:
    if status is None:
        return "unknown status"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"killed by {signal.Signals(sig).name} (signal {sig})"
    return f"exit code {os.WEXITSTATUS(status)}"


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
            job = conn.recv()
        except (EOFError, OSError):
            return 0
        outcome = execute(pool.app, job)
        done += 1
        if limit and done >= limit:
            outcome["_exit"] = True
        conn.send(outcome)
        if outcome.get("_exit"):
            return 0


class PreforkPool(Pool):
    name = "prefork"
    task_crash_kills_node = False

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
        _stop_and_join(self.jobs, self.slots, timeout)

    def terminate(self) -> None:
        for s in self.slots:
            s.stopping = True
            s.reap(kill=True)
        for _ in self.slots:
            self.jobs.put(_STOP)

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


class InlinePool(Pool):
    """Runs a job on the thread that calls ``run_next()``: the loop of a pool child that
    consumes for itself (ConsumerLoop.run_inline, qops/worker/child.py), between two
    gets. Jobs come from ``submit()`` on that same thread (ETA and rate-limit waits too:
    the child runs its timer in that loop). ``on_run(job, hard)`` is told when a job
    starts and ``on_run(None, None)`` when it ends."""

    name = "inline"
    task_crash_kills_node = False  # it runs in a pool child: the node's parent sees a death

    def __init__(self, app: App, max_tasks_per_child: int | None = None,
                 on_run: Callable[[dict[str, Any] | None, float | None], None] | None = None
                 ) -> None:
        super().__init__(app, 1, max_tasks_per_child)
        self.pending: deque[tuple[dict[str, Any], OnDone, float | None, Start | None]] = deque()
        self.on_run = on_run
        self.done = 0
        self.exit_requested = False  # the process should be replaced (max tasks, hard limit)

    def start(self) -> None:
        pass

    def submit(self, job: dict[str, Any], on_done: OnDone, hard_limit: float | None,
               start: Start | None = None) -> None:
        self.pending.append((job, on_done, hard_limit, start))

    def drain_unstarted(self) -> list[dict[str, Any]]:
        jobs = [item[0] for item in self.pending]
        self.pending.clear()
        return jobs

    def run_next(self) -> None:
        """Run the next pending job that starts (at most one)."""
        while self.pending and not self.exit_requested:
            job, on_done, hard, start = self.pending.popleft()
            if start is not None and not start():
                continue
            job["worker_pid"] = os.getpid()
            job["hard_time_limit"] = hard  # enforced in execute(), by a signal
            self._mark(job, True)
            if self.on_run:
                self.on_run(job, hard)
            try:
                outcome = execute(self.app, job)
            finally:
                if self.on_run:
                    self.on_run(None, None)
                self._mark(job, False)
            self.done += 1
            limit = self.max_tasks_per_child
            if outcome.pop("_exit", False) or (limit and self.done >= limit):
                self.exit_requested = True
            _report(on_done, outcome)
            return

    def stop(self, timeout: float | None = None) -> None:
        pass  # nothing runs outside run_next()

    def terminate(self) -> None:
        pass

    def grow(self, n: int) -> None:
        raise UsageError("a pool child runs one task at a time")

    shrink = grow


POOLS: dict[str, type[Pool]] = {"prefork": PreforkPool, "threads": ThreadPool,
                                "solo": SoloPool}


def make_pool(kind: str, app: App, concurrency: int, **kwargs: Any) -> Pool:
    try:
        cls = POOLS[kind]
    except KeyError:
        raise UsageError(f"unknown pool {kind!r}: choose prefork, threads or solo") from None
    if cls is not PreforkPool:
        kwargs.pop("child_init", None)
    return cls(app, concurrency, **kwargs)
