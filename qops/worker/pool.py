"""Execution pools: solo, threads and prefork.

Every pool takes jobs from one queue, in order. A job starts when a thread or slot takes
it from the queue: its ``start()`` is called then, on that thread (the consumer loop
checks the task again and marks it started there: see ConsumerLoop.begin), and says
whether it runs. ``drain_unstarted`` empties the queue (warm shutdown).

prefork lives in qops/worker/prefork.py (imported by ``make_pool`` when asked for).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qops.errors import UsageError
from qops.worker.request import execute

if TYPE_CHECKING:
    from qops.app import App

log = logging.getLogger("qops.worker")

OnDone = Callable[[dict[str, Any]], None]
#: called when a slot takes the job, on its thread: False, and the job does not run
Start = Callable[[], bool]
STOP = object()


class Pool(ABC):
    name = ""
    #: a task that kills its process kills the node too (threads, solo): its start must
    #: reach the broker before it runs, or a node that dies of it is never counted as a
    #: worker loss (qops/worker/lost.py). Where a child runs it, the parent sees the
    #: death and counts it itself.
    task_crash_kills_node = True
    #: a job's ``store`` asks the process that runs it to store a SUCCESS itself
    #: (prefork: the child, so the result is out before the parent hears of it)
    stores_results = False

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
            if item is not STOP:
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

    def cannot_terminate(self, task_ids: list[str]) -> list[str]:
        """Those of ``task_ids`` running here that ``terminate_job`` cannot stop: none,
        but where they run on a thread of the worker itself (threads, solo)."""
        return []

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
            self.jobs.put(STOP)

    def _fewer(self, n: int) -> int:
        """Lower the concurrency by ``n``, keeping at least one; returns by how much."""
        n = min(n, self.concurrency - 1)
        self.concurrency -= n
        return n


class ThreadPool(Pool):
    """Runs tasks in threads of the worker process. Time limits are not enforced here
    (a thread cannot be killed); use prefork for them."""

    name = "threads"

    def cannot_terminate(self, task_ids: list[str]) -> list[str]:
        running = {job.get("id") for job in self.running_jobs()}
        return [t for t in task_ids if t in running]

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._run, name=f"{self.name}-{i + 1}",
                                         daemon=True) for i in range(self.concurrency)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        while True:
            item = self.jobs.get()
            if item is STOP:
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
            report(on_done, outcome)

    def stop(self, timeout: float | None = None) -> None:
        stop_and_join(self.jobs, self.threads, timeout)

    def terminate(self) -> None:
        for _ in self.threads:
            self.jobs.put(STOP)

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


def stop_and_join(jobs: queue.SimpleQueue[Any], threads: list[Any],
                  timeout: float | None) -> None:
    """One stop marker per thread (each takes one and ends), then wait for them all."""
    for _ in threads:
        jobs.put(STOP)
    deadline = None if timeout is None else time.monotonic() + timeout
    for t in threads:
        t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))


def report(on_done: OnDone, outcome: dict[str, Any]) -> None:
    try:
        on_done(outcome)
    except Exception:  # the worker logs its own errors; this keeps the pool alive
        log.exception("error while handling a task outcome")


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
            report(on_done, outcome)
            return

    def stop(self, timeout: float | None = None) -> None:
        pass  # nothing runs outside run_next()

    def terminate(self) -> None:
        pass

    def grow(self, n: int) -> None:
        raise UsageError("a pool child runs one task at a time")

    shrink = grow


def describe_status(status: int | None) -> str:
    if status is None:
        return "unknown status"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"killed by {signal.Signals(sig).name} (signal {sig})"
    return f"exit code {os.WEXITSTATUS(status)}"


POOLS: dict[str, type[Pool]] = {"threads": ThreadPool, "solo": SoloPool}


def make_pool(kind: str, app: App, concurrency: int, **kwargs: Any) -> Pool:
    if kind == "prefork":
        # its own module: multiprocessing, ctypes and mmap are for prefork alone
        from qops.worker.prefork import PreforkPool

        return PreforkPool(app, concurrency, **kwargs)
    try:
        cls = POOLS[kind]
    except KeyError:
        raise UsageError(f"unknown pool {kind!r}: choose prefork, threads or solo") from None
    kwargs.pop("child_init", None)
    return cls(app, concurrency, **kwargs)
