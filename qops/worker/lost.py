"""Worker-lost accounting: a task that kills its process must not run forever.

A message whose worker died while running it (the pool child exited or was killed, or
the whole node died: OOM killer, ``kill -9``, ``os._exit`` in a solo/threads pool) is
delivered again by the broker. The broker side remembers how many times that happened
(``Consumer.mark_started`` / ``worker_lost`` / ``after_lost``, each transport its own
way; the rule per transport is in docs/guarantees.md), so the count survives restarts
and is the same on every node:

- an acks_late task records its start (``started``, as it starts; the transport may
  skip it: Redis writes starts only of messages a node died holding, and counts that
  death from its recovery);
- when the node sees its process die running it (``died``), or when a message comes
  back redelivered (``redelivered``), the start that never ended counts one loss;
- after ``task_max_worker_lost`` losses (task option ``max_worker_lost``) the message
  goes to the dead-letter store ("worker lost 3 times: exit code 3") and its result is
  FAILURE with WorkerLostError;
- before that it runs again at once after the first loss, and after each later one
  waits ``task_worker_lost_backoff`` seconds (doubled at each loss, at most
  ``MAX_BACKOFF``); the worker meanwhile takes other work.

An ack (success, failure, retry) ends the count with the message. Tasks acked before
they run (acks_late off) are never delivered again after a death: nothing to count.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qops.backends.base import FAILURE
from qops.errors import ConfigError, WorkerLostError
from qops.worker import followers

if TYPE_CHECKING:
    from qops.protocol import TaskRequest
    from qops.task import Task
    from qops.transports.base import Delivery
    from qops.worker.consumer import ConsumerLoop

log = logging.getLogger("qops.worker")

MAX_BACKOFF = 60.0  # seconds, the longest wait between two worker losses
#: why a loss happened when no live process saw it
UNSEEN = "the process running it ended with its node"


class LostBooks:
    """One consumer loop's side of the accounting (see the module doc)."""

    def __init__(self, loop: ConsumerLoop) -> None:
        conf = loop.app.conf
        self.loop = loop
        self.limit = _positive_int(conf.task_max_worker_lost, "task_max_worker_lost")
        self.backoff = float(conf.task_worker_lost_backoff)
        if self.backoff < 0:
            raise ConfigError("setting 'task_worker_lost_backoff' must be 0 or more, got "
                              f"{self.backoff!r}")
        #: deliveries whose count was looked at, waited out, and may run now
        self._cleared: set[int] = set()
        #: task id -> how its process died, when a parent told (pool children)
        self.how: dict[str, str] = {}

    def limit_for(self, task: Task) -> int:
        value = self.loop.app.option_for(task, "max_worker_lost", "task_max_worker_lost")
        try:
            return _positive_int(value, f"max_worker_lost of {task.name}")
        except ConfigError as exc:
            log.error("%s; using %d", exc, self.limit)
            return self.limit

    def wait(self, n: int) -> float:
        """Seconds before a run after the ``n``-th loss: none after the first (a worker
        that dies once is recovered from as fast as ever), then the backoff, doubled
        at each loss."""
        if n <= 1:
            return 0.0
        return min(self.backoff * 2 ** (n - 2), MAX_BACKOFF)

    # -- before a run --------------------------------------------------------------------
    def started(self, d: Delivery) -> None:
        """An acks_late task starts (on the pool's thread, after its last checks): record
        the start with the broker where a task that kills its process takes the node
        with it (threads, solo). Where a pool child runs it, the node sees the child die
        and counts that itself: no write per task."""
        pool = self.loop.pool
        if pool is not None and not pool.task_crash_kills_node:
            return
        consumer = self.loop.consumer
        assert consumer is not None
        try:
            consumer.mark_started(d)
        except Exception as exc:  # run anyway: at least once; this start uncounted
            log.warning("could not record a task start: %s", exc)

    def redelivered(self, d: Delivery, req: TaskRequest, task: Task,
                    again: Callable[[], None]) -> bool:
        """A redelivered acks_late message: count a start that never ended. True when
        it is taken care of here (dead-lettered, or waiting before ``again()``)."""
        if id(d) in self._cleared:
            self._cleared.discard(id(d))
            return False
        consumer = self.loop.consumer
        assert consumer is not None
        try:
            n, new = consumer.worker_lost(d)
        except Exception as exc:
            log.warning("Task %s[%s]: could not read its worker-lost count (%s); it runs",
                        req.name, req.id, exc)
            return False
        if n >= self.limit_for(task):
            self.give_up(d, req, n, self.how.pop(req.id, UNSEEN))
            return True
        if not new:
            return False
        wait = self.wait(n)
        log.error("Task %s[%s]: its worker died holding it (%d of %d); it runs again in "
                  "%gs", req.name, req.id, n, self.limit_for(task), wait)
        self.how.pop(req.id, None)
        self.loop.hold(d)

        def later() -> None:
            try:
                run_here = consumer.after_lost(d, n)
            except Exception as exc:  # e.g. the copy was not published: try again later
                log.error("Task %s[%s]: could not keep its worker-lost count: %s",
                          req.name, req.id, exc)
                self.loop.timer.call_later(self.wait(n), later, d)
                return
            if run_here:
                self._cleared.add(id(d))
                again()
            else:
                self.loop._forget_reserved(d)

        self.loop.timer.call_later(wait, later, d)
        return True

    # -- after a death the node saw ------------------------------------------------------
    def died(self, d: Delivery, req: TaskRequest, task: Task, outcome: dict[str, Any]) -> None:
        """The pool saw the process running ``d`` die and the task wants to run again
        (``reject_on_worker_lost``): count it, then dead-letter it or requeue it after
        the backoff."""
        consumer = self.loop.consumer
        assert consumer is not None
        how = str(outcome.get("how") or UNSEEN)
        try:
            n, _ = consumer.worker_lost(d, died=True)
        except Exception as exc:
            log.error("Task %s[%s]: could not count its worker loss (%s); it goes back "
                      "to the queue", req.name, req.id, exc)
            n = 0
        limit = self.limit_for(task)
        if n >= limit:
            self.give_up(d, req, n, how)
            return
        wait = self.wait(n)
        log.error("Task %s[%s]: pool process exited during the task (%s), %d of %d; it "
                  "goes back to the queue in %gs", req.name, req.id, how, n, limit, wait)
        self.loop.hold(d)

        def later() -> None:
            try:
                if consumer.after_lost(d, n):
                    consumer.requeue(d)
            except Exception as exc:
                log.error("Task %s[%s]: could not requeue it: %s", req.name, req.id, exc)
                self.loop.timer.call_later(self.wait(n), later, d)

        self.loop.timer.call_later(wait, later, d)

    def give_up(self, d: Delivery, req: TaskRequest, n: int, how: str) -> None:
        """Dead-letter the message and fail the task."""
        loop = self.loop
        reason = f"worker lost {n} times: {how}"
        log.error("Task %s[%s] failed: %s; moved to the dead-letter store", req.name,
                  req.id, reason)
        loop.dead_letter(d, reason)
        loop._forget_reserved(d)
        exc = WorkerLostError(reason)
        loop.store(req, FAILURE, exc)
        loop.event("task-failed", req, exception=f"WorkerLostError({reason})", traceback=None)
        followers.send_errbacks(loop.app, req, exc)
        loop._count(req.name)


def _positive_int(value: Any, what: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if isinstance(value, bool) or n < 1:
        raise ConfigError(f"{what} must be a whole number of 1 or more, got {value!r}")
    return n
