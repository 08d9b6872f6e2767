"""What a task's end leaves, for a consumer loop (``qops/worker/consumer.py``): its
state stored (by the pool child itself where it can), the events, the followers
(chains, links) or errbacks, a retry sent, a worker loss counted, then the message
settled (ack, requeue, dead letter)."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

from qops import protocol
from qops.backends.base import FAILURE, RETRY, REVOKED, SUCCESS
from qops.errors import TaskRevokedError
from qops.worker import followers
from qops.worker.request import LOST, REJECTED

if TYPE_CHECKING:
    from qops.protocol import TaskRequest
    from qops.task import Task
    from qops.transports.base import Delivery
    from qops.worker.consumer import ConsumerLoop

log = logging.getLogger("qops.worker")


class Outcomes:
    """One consumer loop's handling of its tasks' outcomes (see the module doc)."""

    def __init__(self, loop: ConsumerLoop) -> None:
        self.loop = loop

    @functools.cached_property
    def children_store(self) -> bool:
        """Whether the pool's children store a task's SUCCESS themselves (prefork, with
        a backend they may use after the fork): the result is out before the parent has
        read the child's answer. Fixed once the pool is there."""
        loop = self.loop
        return bool(loop.has_backend and loop.pool is not None and loop.pool.stores_results
                    and loop.app.backend.stored_by_children)

    def done(self, d: Delivery, req: TaskRequest, task: Task, outcome: dict[str, Any],
             acks_late: bool) -> None:
        """A task ended (called from a pool thread): record it, then ack."""
        loop = self.loop
        assert loop.consumer is not None
        state = outcome["state"]
        if state == LOST and req.id in loop.revoked:
            state = self._terminated(req)
        runtime = outcome.get("runtime", 0.0)
        requeue = False  # a Reject(requeue=True): back to the queue, acked early or not
        if state == SUCCESS:
            if log.isEnabledFor(logging.INFO):  # the repr only when it is logged
                log.info("Task %s[%s] succeeded in %.4fs: %s", req.name, req.id, runtime,
                         protocol.saferepr(outcome["result"], loop.repr_maxsize))
            if loop.has_backend:
                loop.store(req, SUCCESS, outcome["result"], stored=outcome.get("stored", False))
            if loop.sending_task_events:
                loop.event("task-succeeded", req,
                           result=protocol.saferepr(outcome["result"], loop.repr_maxsize),
                           runtime=runtime)
            if req.callbacks or req.chain:
                followers.send_followers(loop.app, req, outcome["result"])
        elif state == FAILURE:
            log.error("Task %s[%s] raised: %s\n%s", req.name, req.id,
                      protocol.shorten(_exc_line(outcome["result"]), loop.repr_maxsize),
                      outcome.get("traceback") or "")
            loop.store(req, FAILURE, outcome["result"], outcome.get("traceback"))
            loop.event("task-failed", req, exception=_exc_line(outcome["result"]),
                       traceback=outcome.get("traceback"))
            if req.errbacks:
                followers.send_errbacks(loop.app, req, protocol.dict_to_exception(
                    outcome["result"]), outcome.get("traceback"),
                    outcome.get("errbacks_called", ()))
            if req.chain:
                from qops.canvas import propagate_chain_failure

                propagate_chain_failure(loop.app, req.chain, outcome["result"],
                                        outcome.get("traceback"))
        elif state == RETRY:
            self.retry(req, d, outcome)
        elif state == REJECTED:
            if outcome.get("requeue"):
                requeue = True
                loop.event("task-rejected", req, requeue=True)
            else:
                loop.dead_letter(d, outcome["reason"])
                loop._count(req.name)
                return
        elif state == LOST:
            if loop.requeue_when_lost(task):  # counted, then requeued or dead-lettered
                loop.lost_books.died(d, req, task, outcome)
                loop._count(req.name)
                return
            else:
                log.error("Task %s[%s] failed: %s", req.name, req.id,
                          _exc_line(outcome["result"]))
                loop.store(req, FAILURE, outcome["result"])
        if requeue:
            loop.consumer.requeue(d)
        elif acks_late:  # (an at-most-once task was acked when it started)
            loop.consumer.ack(d)
        loop._count(req.name)

    def _terminated(self, req: TaskRequest) -> str:
        """A revoked task whose process died: killed by ``revoke --terminate``."""
        log.warning("Task %s[%s] terminated (revoked)", req.name, req.id)
        self.loop.store(req, REVOKED, TaskRevokedError("terminated"))
        self.loop.event("task-revoked", req, terminated=True, signum=None, expired=False)
        return REVOKED

    def retry(self, req: TaskRequest, d: Delivery, outcome: dict[str, Any]) -> None:
        when = float(outcome.get("when") or 0.0)
        log.info("Task %s[%s] retry %d in %.2fs: %s", req.name, req.id, req.retries + 1, when,
                 _exc_line(outcome["result"]))
        # Publish the new attempt before the old message is acked: a crash in between
        # runs the task once more rather than never.
        followers.send_retry(self.loop.app, req, d.queue, when, outcome)
        self.loop.store(req, RETRY, outcome["result"], outcome.get("traceback"))
        self.loop.event("task-retried", req, exception=_exc_line(outcome["result"]),
                        traceback=outcome.get("traceback"))

def _exc_line(meta: Any) -> str:
    if isinstance(meta, dict) and "exc_type" in meta:
        msg = meta.get("exc_message") or []
        text = ", ".join(str(m) for m in msg) if isinstance(msg, list) else str(msg)
        return f"{meta['exc_type']}({text})"
    return repr(meta)
