"""The worker node: start-up as a readable sequence of steps, signals, remote control,
heartbeats and events, shutdown.

    worker = Worker(app, hostname="w1@host", queues=["qops"], concurrency=4)
    worker.start()     # blocks until TERM/INT/QUIT or worker.request_stop()

The node does not handle messages itself: its consumer loop does
(``qops/worker/consumer.py``: delivery -> task -> outcome -> ack), on this process's
main thread, the pool running the tasks. With prefork on a transport whose pool
children consume for themselves (RabbitMQ, ``qops/worker/children.py``) each child
runs a loop of its own, and this process only supervises them; its loop then holds
the node's record (revoked and lost tasks, queues, counts) and never connects.

Imports run one way: node -> consumer loop (and the pools, remote control) -> pool,
request, timer, rate limits.

Delivery guarantees (docs/guarantees.md): with ``acks_late`` (the default) a message is
acked after its task ends, so a worker that dies mid-task leaves it to be run again.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from qops.events import EventDispatcher
from qops.ops.nodes import expand
from qops.values import file_name
from qops.worker.consumer import ConsumerLoop
from qops.worker.control import ControlServer
from qops.worker.pool import Pool, ThreadPool, make_pool

if TYPE_CHECKING:
    from qops.app import App

log = logging.getLogger("qops.worker")

WARM, COLD = "warm", "cold"


class Worker:
    def __init__(self, app: App, *, hostname: str, queues: Sequence[str] | None = None,
                 concurrency: int | None = None, pool: str | None = None,
                 prefetch_multiplier: int | None = None,
                 max_tasks_per_child: int | None = None,
                 task_events: bool | None = None,
                 on_ready: Callable[[Worker], None] | None = None,
                 child_init: Callable[[int], None] | None = None,
                 statedb: str | None = None) -> None:
        conf = app.conf
        self.app = app
        self.hostname = hostname
        self.concurrency = int(concurrency or conf.worker_concurrency or os.cpu_count() or 1)
        self.pool_kind = pool or conf.worker_pool
        if self.pool_kind == "solo":
            self.concurrency = 1
        self.prefetch_multiplier = max(1, int(prefetch_multiplier or
                                              conf.worker_prefetch_multiplier))
        self.prefetch = self.concurrency * self.prefetch_multiplier
        self.max_tasks_per_child = max_tasks_per_child or conf.worker_max_tasks_per_child
        self.on_ready = on_ready
        self.child_init = child_init
        self.task_events = bool(conf.worker_send_task_events if task_events is None
                                else task_events)
        self.loop = ConsumerLoop(app, hostname=hostname,
                                 queues=list(queues or [app.default_queue]),
                                 prefetch=self.prefetch)
        # revoked ids that outlive a restart (qops/worker/state.py)
        self.statedb = file_name(statedb, "the state db (-S)") or conf.worker_state_db or None
        if self.statedb:
            self.loop.revoked.load(expand(self.statedb, hostname))
        self.started_at = time.time()
        self._stop: str | None = None
        self._stop_event = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self.pool: Pool | None = None
        self.events: EventDispatcher | None = None
        self.control: ControlServer | None = None
        # prefork on a transport that says so (RabbitMQ): each pool child consumes and
        # acks for itself; this process keeps control, heartbeats and supervision
        self.split = False

    @property
    def queues(self) -> list[str]:
        return self.loop.queues

    # -- start-up, in order --------------------------------------------------------------
    def start(self) -> int:
        """Run until asked to stop; returns the process exit code."""
        self.install_signal_handlers()
        self.apply_rate_limits()
        self.connect()
        self.start_pool()
        if not self.split:  # pool children run their own timers
            self.loop.timer.start()
        self.start_control()
        self.start_heartbeat()
        log.info("%s ready.", self.hostname)
        if self.on_ready:
            self.on_ready(self)
        try:
            self.consume()
        finally:
            self.shutdown()
        return 0

    def install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop(WARM))
        signal.signal(signal.SIGQUIT, lambda *_: self.request_stop(COLD))
        signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, *_: Any) -> None:
        # First Ctrl-C: warm shutdown; a second one: cold.
        self.request_stop(COLD if self._stop else WARM)

    def request_stop(self, how: str = WARM) -> None:
        if self._stop == COLD:
            return
        if how == COLD and self._stop == WARM:
            log.warning("Cold shutdown: killing running tasks (they go back to the queue).")
            self._stop = COLD
            if self.pool:
                self.pool.terminate()
        else:
            if how == WARM:
                log.warning("Warm shutdown: running tasks finish, the rest go back to the "
                            "queue (press Ctrl-C again or send QUIT for a cold shutdown).")
            self._stop = how
        self._stop_event.set()
        self.loop.stop()

    def apply_rate_limits(self) -> None:
        self.loop.apply_rate_limits()

    def connect(self) -> None:
        self.split = (self.pool_kind == "prefork"
                      and self.app.transport.consume_in_pool_children)
        self.loop.connect(consume=not self.split)  # else each pool child consumes

    def start_pool(self) -> None:
        if self.split:
            from qops.worker.children import ChildPool

            self.pool = self.loop.pool = ChildPool(
                self.loop, self.concurrency, self.max_tasks_per_child,
                prefetch=self.prefetch_multiplier, task_events=self.task_events,
                child_init=self.child_init)
            self.pool.start()  # returns once every child consumes
            return
        self.pool = self.loop.pool = make_pool(
            self.pool_kind, self.app, self.concurrency,
            max_tasks_per_child=self.max_tasks_per_child, child_init=self.child_init)
        if self.loop.consumer is not None:
            self.loop.consumer.pool_threads = isinstance(self.pool, ThreadPool)
        if isinstance(self.pool, ThreadPool):
            self._warn_time_limits()
        self.pool.start()

    def _warn_time_limits(self) -> None:
        """A threads or solo pool cannot stop a task: say so, once, for the tasks that
        have a time limit (it would be ignored without a word)."""
        app = self.app
        limits = (("time_limit", "task_time_limit"), ("soft_time_limit", "task_soft_time_limit"))
        # a limit for every task: the setting; else the tasks that have one of their own
        limited = [f"{s}={app.conf.get(s)}" for _, s in limits if app.conf.get(s)]
        if not limited:
            limited = sorted(name for name, task in app.tasks.items()
                             if any(app.option_for(task, key, setting)
                                    for key, setting in limits))
        if limited:
            log.warning("time limits are not enforced by the %s pool (a task running on "
                        "a thread cannot be stopped; -P prefork enforces them): %s",
                        self.pool_kind, ", ".join(limited))

    def start_control(self) -> None:
        """Remote control and events: subscribe to the mailbox, say we are online."""
        self.events = self.loop.events = EventDispatcher(self.app, self.hostname,
                                                         task_events=self.task_events)
        self.control = ControlServer(self)
        self.control.start()
        self._beat("worker-online")

    def start_heartbeat(self) -> None:
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat",
                                           daemon=True)
        self._heartbeat.start()

    def _beat(self, event: str) -> None:
        """Prove this node is alive: consumer liveness, the node registry (which tells
        clients whom to wait for), and a worker event."""
        assert self.events is not None
        interval = float(self.app.conf.worker_heartbeat_interval)
        transport = self.app.transport
        if self.loop.consumer is not None:
            self.loop.consumer.heartbeat()
        if event == "worker-offline":
            transport.unregister_node(self.hostname)
        else:
            transport.register_node(self.hostname, {"pid": os.getpid(), "queues": self.queues},
                                    float(self.app.conf.worker_heartbeat_ttl))
        self.events.worker_event(event, freq=interval,
                                 active=self.pool.busy() if self.pool else 0,
                                 processed=self.processed_count())

    def _heartbeat_loop(self) -> None:
        interval = float(self.app.conf.worker_heartbeat_interval)
        transport = self.app.transport
        while not self._stop_event.wait(interval):
            try:
                self._beat("worker-heartbeat")
                moved = transport.recover()
                if moved:
                    log.warning("Recovered %d message(s) held by dead workers.", moved)
            except Exception as exc:
                log.error("heartbeat failed: %s", exc)

    def processed_count(self) -> int:
        """Tasks this node has finished (its pool children's too)."""
        with self.loop.lock:
            done = sum(self.loop.processed.values())
        return done + (self.pool.processed_elsewhere() if self.pool else 0)

    # -- running ---------------------------------------------------------------------------------
    def consume(self) -> None:
        if self.split:  # the pool children consume; this process waits for a signal
            while not self._stop:
                self._stop_event.wait(1.0)
            return
        self.loop.run()

    # -- shutdown ------------------------------------------------------------------------------
    def shutdown(self) -> None:
        from qops.ops.daemon import sd_notify

        sd_notify("STOPPING=1")
        pool = self.pool
        cold = self._stop == COLD
        # Our threads stop before the connections they use are closed (closing a
        # SQLite connection another thread is using can crash the process).
        self._stop_event.set()
        if self.control is not None:
            self.control.stop()
        if self._heartbeat is not None:
            self._heartbeat.join(10.0)
        # Messages taken but not started go back to the broker at once.
        unstarted = self.loop.take_back()
        if pool is not None:
            if cold:
                pool.terminate()
            else:
                pool.stop()
        if self.events is not None:
            self.events.close()  # its last task events, and its thread stopped
            try:
                self._beat("worker-offline")
            except Exception as exc:
                log.error("could not announce going offline: %s", exc)
        self.loop.give_back(unstarted)
        self.loop.revoked.save()
        self.app.close()
        log.info("%s stopped.", self.hostname)

    # -- facts for banners and remote control ---------------------------------------------
    def info(self) -> dict[str, Any]:
        from qops.builtins import is_builtin
        from qops.signing import remote_control_line

        return {
            "hostname": self.hostname,
            "pid": os.getpid(),
            "app": self.app.main,
            "transport": self.app.transport.safe_url(),
            "results": _mask(self.app.result_backend_url) or "disabled",
            "concurrency": f"{self.concurrency} ({self.pool_kind})",
            "prefetch": self.prefetch,
            "queues": self.queues,
            "tasks": sorted(n for n in self.app.tasks if not is_builtin(n)),
            "remote_control": remote_control_line(self.app),
        }


def _mask(url: str | None) -> str | None:
    from qops.transports.urls import mask_password

    return mask_password(url) if url else None


