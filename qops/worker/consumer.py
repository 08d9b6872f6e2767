"""The consumer loop: from a delivery to a settled message.

    delivery -> parse and check -> ETA timer / rate limit -> pool -> outcome
             -> result store, events, followers (chains, links) or errbacks, retries
             -> ack / requeue / dead-letter

(from the outcome on: ``qops/worker/outcomes.py``)

A ``ConsumerLoop`` owns a transport Consumer, a timer (ETA and rate-limit waits) and
what a process knows about its tasks: reserved (taken, not started: waiting for an ETA,
a rate limit or a free slot in the pool's queue), revoked, lost, processed, rate limits
and each task's options. A task starts when a pool thread or slot takes it (``begin``,
on that thread): only then does it leave ``reserved``, get its last revoke check, its
at-most-once ack, STARTED and ``task-started``. The node
(``qops/worker/worker.py``) makes one and runs it on its main thread, the pool running
tasks on its threads or children; a pool child that consumes for itself
(``qops/worker/child.py``) makes its own, with an inline pool and its timer run by
the loop (``run_inline``). Remote control reads and changes this state through the
handlers in ``qops/worker/control.py``.

Where the pool children consume, the node's own loop never connects or runs: it is
the node's record of what its children start from (revoked and lost tasks, queues)
and of what they finished.

Imports run one way: the node imports this module; this one imports the pool, the
request, the timer and the rate limits, never the node.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from qops import chords, protocol
from qops.backends.base import FAILURE, READY_STATES, REVOKED, STARTED
from qops.errors import NotRegistered, ProtocolError, TaskRevokedError
from qops.events import dead_letter_fields
from qops.signing import HEADER, SignatureError, task_context, task_signer
from qops.worker.lost import LostBooks
from qops.worker.outcomes import Outcomes
from qops.worker.ratelimit import RateLimits
from qops.worker.request import make_job
from qops.worker.state import Revoked
from qops.worker.timer import Timer

if TYPE_CHECKING:
    from qops.app import App
    from qops.events import EventDispatcher
    from qops.protocol import TaskRequest
    from qops.task import Task
    from qops.transports.base import Consumer, Delivery
    from qops.worker.pool import InlinePool, Pool

log = logging.getLogger("qops.worker")

RETRY_HANDLING_AFTER = 5.0  # seconds a message we failed to handle is put aside

#: why a redelivered task must not run again here (None: run it); see lost_verdict
LostVerdict = Callable[[str], Exception | None]


class ConsumerLoop:
    def __init__(self, app: App, *, hostname: str, queues: Sequence[str], prefetch: int,
                 rate_share: int = 1, lost_verdict: LostVerdict | None = None) -> None:
        conf = app.conf
        self.app = app
        self.hostname = hostname
        self.queues = list(queues)
        self.prefetch = prefetch
        self.rate_limits = RateLimits(share=rate_share)
        self.revoked = Revoked()
        # with pool children that consume: tasks whose process died running them and
        # that must not run again -> (why, wait status); see qops/worker/children.py
        self.lost: dict[str, tuple[int, int | None]] = {}
        #: a redelivered task: did a process of this node die running it? (pool
        #: children that consume for themselves ask their siblings' slots)
        self.lost_verdict = lost_verdict
        # taken, not started: id(delivery) -> (task, delivery). By delivery, not task
        # id: two copies of one task are two entries
        self.reserved: dict[int, tuple[TaskRequest, Delivery]] = {}
        self.processed: dict[str, int] = {}
        self.lock = threading.Lock()
        self.max_message_size = int(conf.task_max_message_size)
        #: task_signing: only tasks signed with the key run (docs/security.md)
        self.signer = task_signer(app, sender=hostname)
        self.repr_maxsize = int(conf.worker_log_repr_maxsize)  # log lines, events
        # fixed for the worker's life; checked per task
        self.has_backend = app.has_backend
        self.track_started = bool(conf.task_track_started)
        self.consumer: Consumer | None = None
        self.pool: Pool | None = None
        self.timer = Timer()
        self.events: EventDispatcher | None = None
        self._options: dict[str, tuple[bool, float | None, float | None]] = {}
        self._backoff = 0.5  # seconds before asking a broker that failed again
        self.stopping = False
        self._stop_event = threading.Event()
        self.lost_books = LostBooks(self)  # worker-lost accounting
        self.outcomes = Outcomes(self)  # what a task's end leaves

    # -- set-up ---------------------------------------------------------------------------------
    def apply_rate_limits(self) -> None:
        for name, task in self.app.tasks.items():
            rate = self.app.rate_limit_for(task)
            if rate:
                self.rate_limits.set(name, rate)

    def connect(self, consume: bool = True) -> None:
        """Make the transport consumer (not when ``consume`` is false: the node whose
        pool children consume), and connect to the result backend now, so that a bad
        URL fails at start-up."""
        if consume:
            self.consumer = self.app.transport.consumer(
                self.queues, self.prefetch, consumer_id=f"{self.hostname}.{os.getpid()}")
            # settlements go out two or more at a time while more deliveries are held (a
            # write and a wake-up fewer each; AMQP): half the prefetch keeps the broker
            # sending while the rest run
            self.consumer.ack_batch = max(1, self.prefetch // 2)
        if self.has_backend:
            self.app.backend  # noqa: B018

    def stop(self) -> None:
        """Take no more messages (run() returns; a due task no longer starts)."""
        self.stopping = True
        self._stop_event.set()

    @property
    def consumed_queues(self) -> list[str]:
        return self.consumer.queues if self.consumer is not None else list(self.queues)

    def add_queue(self, queue: str) -> None:
        """Consume ``queue`` too. Without a consumer of its own (pool children consume)
        this only records it: remote control forwards the command to the children, and
        children started later consume it."""
        if self.consumer is not None:
            self.consumer.add_queue(queue)
        if queue not in self.queues:
            self.queues = [*self.queues, queue]

    def cancel_queue(self, queue: str) -> None:
        if self.consumer is not None:
            self.consumer.cancel_queue(queue)
        self.queues = [q for q in self.queues if q != queue]

    def acks_late_for(self, name: str) -> bool:
        task = self.app.tasks.get(name)
        if task is None:
            return bool(self.app.conf.task_acks_late)
        return self.options_for(task)[0]

    def options_for(self, task: Task) -> tuple[bool, float | None, float | None]:
        """(acks_late, hard limit, soft limit) of a task, worked out once per task; the
        control commands that change them call forget_options()."""
        opts = self._options.get(task.name)
        if opts is None:
            opt = self.app.option_for
            hard = opt(task, "time_limit", "task_time_limit")
            soft = opt(task, "soft_time_limit", "task_soft_time_limit")
            opts = (bool(opt(task, "acks_late", "task_acks_late")),
                    float(hard) if hard else None, float(soft) if soft else None)
            self._options[task.name] = opts
        return opts

    def forget_options(self, name: str) -> None:
        self._options.pop(name, None)

    @property
    def sending_task_events(self) -> bool:
        return self.events is not None and self.events.task_events

    def event(self, type_: str, req: TaskRequest, **fields: Any) -> None:
        if self.events is not None and self.events.task_events:
            fields["uuid"] = req.id
            self.event_fields(type_, fields)

    def event_fields(self, type_: str, fields: dict[str, Any]) -> None:
        if self.events is not None and self.events.task_events:
            try:
                self.events.send(type_, **fields)
            except Exception as exc:
                log.debug("could not send %s: %s", type_, exc)

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> None:
        """Take and handle messages until stop(); the pool runs the tasks on its threads
        or processes and the timer on its own thread."""
        while not self.stopping:
            delivery = self.next_delivery(0.25)
            if delivery is not None:
                self.handle(delivery)

    def run_inline(self, pool: InlinePool) -> None:
        """Take messages, make the timer's calls and run the tasks, all on this thread,
        until stop() or until the pool wants its process replaced (a pool child that
        consumes for itself). What the consumer has received is taken (reserved) before
        the next task runs, so that remote control sees and can revoke it."""
        timer = self.timer
        while True:
            timer.run_due()
            if self.stopping or pool.exit_requested:
                return
            delivery = self.next_delivery(0.0 if pool.pending else timer.next_in(0.25))
            if delivery is not None:
                self.handle(delivery)
            else:
                pool.run_next()

    def next_delivery(self, timeout: float) -> Delivery | None:
        """The next message, or None after ``timeout`` or a broker error (then after a
        wait that grows with each failure; the transport reconnects on the next call)."""
        assert self.consumer is not None
        try:
            delivery = self.consumer.get(timeout)
        except Exception as exc:
            log.error("consumer error: %s; retrying in %.1fs", exc, self._backoff)
            self._stop_event.wait(self._backoff)
            # Waits stay within a heartbeat interval: longer, and this worker's liveness
            # key could expire while the broker is back, making its messages look
            # orphaned.
            longest = max(1.0, float(self.app.conf.worker_heartbeat_interval))
            self._backoff = min(self._backoff * 2, longest)
            return None
        if self._backoff > 0.5:
            log.warning("Connection to the broker is back.")
            self._backoff = 0.5
        return delivery

    def handle(self, delivery: Delivery) -> None:
        try:
            self.on_delivery(delivery)
        except Exception as exc:
            # e.g. the dead-letter store refused a write. The message stays reserved
            # (not lost), is put aside for a while so it can't block the queue's head,
            # then goes back to the queue to be tried again.
            log.error("could not handle a message from %r: %s; it goes back to the "
                      "queue in %gs", delivery.queue, exc, RETRY_HANDLING_AFTER)
            self.hold(delivery)
            self.timer.call_later(RETRY_HANDLING_AFTER,
                                  functools.partial(self._requeue_quietly, delivery),
                                  delivery)

    def on_delivery(self, d: Delivery) -> None:
        assert self.consumer is not None
        if d.error or d.message is None:
            self.dead_letter(d, d.error or "undecodable message")
            return
        if len(d.raw) > self.max_message_size:
            self.dead_letter(d, f"message of {len(d.raw)} bytes is larger than "
                                f"task_max_message_size ({self.max_message_size})")
            return
        if self.signer is not None:
            try:
                self.signer.verify("task", d.message.body, d.message.headers.get(HEADER),
                                   task_context(d.message.headers), fresh=False)
            except SignatureError as exc:
                self.dead_letter(d, f"task message refused: {exc} (task_signing is on)")
                return
        try:
            req = protocol.parse_task_message(d.message)
        except ProtocolError as exc:
            self.dead_letter(d, str(exc))
            self.fail_unparsed(d, exc)
            return
        task = self.app.tasks.get(req.name)
        if task is None:
            reason = f"unknown task {req.name!r} (not registered on this worker)"
            self.dead_letter(d, reason)
            self.store(req, FAILURE, NotRegistered(reason))
            return
        try:
            task.check_arguments(req.args, req.kwargs)
        except TypeError as exc:
            reason = f"arguments do not fit {req.name}: {exc}"
            self.dead_letter(d, reason)
            self.store(req, FAILURE, TypeError(reason))
            return
        log.info("Task %s[%s] received", req.name, req.id)
        if self.sending_task_events:
            self.event("task-received", req, name=req.name,
                       args=protocol.saferepr(req.args, self.repr_maxsize),
                       kwargs=protocol.saferepr(req.kwargs, self.repr_maxsize),
                       root_id=req.root_id, parent_id=req.parent_id,
                       retries=req.retries, eta=req.eta and req.eta.isoformat(),
                       expires=req.expires and req.expires.isoformat(), queue=d.queue)
        with self.lock:
            self.reserved[id(d)] = (req, d)
        if req.eta is not None:
            wait = (req.eta - dt.datetime.now(dt.timezone.utc)).total_seconds()
            if wait > 0:
                # Held (reserved, so neither lost nor taken by another worker) but not
                # counted against the prefetch: far-future tasks never stall the worker.
                self.hold(d)
                limit = self.consumer.hold_limit if self.consumer is not None else None
                if limit and wait > limit:  # RabbitMQ would take it back first
                    self.timer.call_later(limit, lambda: self.renew(d), d)
                else:
                    self.timer.call_later(wait, lambda: self.on_due(d, req, task), d)
                return
        self.on_due(d, req, task)

    def renew(self, d: Delivery) -> None:
        """A message held for its ETA longer than the broker lets a delivery stay
        unsettled: given back now (it comes back, and is held again)."""
        assert self.consumer is not None
        with self.lock:
            if self.stopping or self.reserved.pop(id(d), None) is None:
                return  # settled meanwhile (revoked), or shutdown gives it back
        try:
            self.consumer.renew(d)
        except Exception as exc:  # the broker takes it back itself, then
            log.error("could not give back a message held for its ETA: %s", exc)

    def _requeue_quietly(self, d: Delivery) -> None:
        try:
            assert self.consumer is not None
            self.consumer.requeue(d)
        except Exception as exc:
            log.error("could not requeue a message: %s", exc)

    def hold(self, d: Delivery) -> None:
        assert self.consumer is not None
        try:
            self.consumer.exempt(d)
        except NotImplementedError:
            pass  # the transport can't: the held message keeps its prefetch slot

    def dead_letter(self, d: Delivery, reason: str) -> None:
        assert self.consumer is not None
        self.consumer.reject(d, reason)
        log.error("Rejected a message from %r: %s (kept in the dead-letter store)",
                  d.queue, reason)
        if self.sending_task_events:  # the one place a worker dead-letters a message
            self.event_fields("task-rejected", dead_letter_fields(d, reason))

    def fail_unparsed(self, d: Delivery, exc: ProtocolError) -> None:
        """A message that can't be parsed but names its task: tell a waiting client."""
        if d.message is None or not self.has_backend:
            return
        task_id = (d.message.headers or {}).get("id") or \
            d.message.properties.get("correlation_id")
        if not isinstance(task_id, str) or not task_id:
            return
        try:
            self.app.backend.store(task_id, FAILURE, exc,
                                   reply_to=d.message.properties.get("reply_to") or None)
        except Exception as err:
            log.error("could not mark task %s FAILURE: %s", task_id, err)

    def on_due(self, d: Delivery, req: TaskRequest, task: Task) -> None:
        """The task may run now (its ETA has come): check expiry and rate, then hand it
        to the pool (where it stays reserved until a slot takes it: begin()).

        The stale, revoked and expiry checks are made here and again in begin(): with
        them left to begin() for a just-taken delivery, test_frozen_worker[amqp] once saw
        a task run twice (a worker frozen past its heartbeat, whose dead connection's
        task RabbitMQ had given to another worker); the cause is not proven."""
        assert self.consumer is not None and self.pool is not None
        if self.stopping:
            return  # shutdown requeues what is still reserved
        if id(d) not in self.reserved:  # (a dict read: no lock)
            return  # settled already (revoked while it waited)
        if self.consumer.stale(d):
            self._skip(req, d)
            return
        if (req.id in self.revoked or req.expires is not None) and \
                self._revoked_now(d, req):
            return
        if d.redelivered and self.lost_verdict is not None:
            lost = self.lost_verdict(req.id)
            if lost is not None:
                log.error("Task %s[%s] failed: %s; not run again", req.name, req.id, lost)
                self._forget_reserved(d)
                self.store(req, FAILURE, lost)
                self.consumer.ack(d)
                self._count(req.name)
                return
        acks_late, hard, soft = self.options_for(task)
        if acks_late and d.redelivered and self.lost_books.redelivered(
                d, req, task, lambda: self.on_due(d, req, task)):
            return
        wait = self.rate_limits.take(req.name) if self.rate_limits.buckets else 0.0
        if wait > 0:
            self.timer.call_later(wait, lambda: self.on_due(d, req, task), d)
            return
        hard = req.time_limit or hard
        soft = req.soft_time_limit or soft
        job = make_job(req, self.hostname,
                       {"exchange": "", "routing_key": d.queue, "priority": req.priority,
                        "redelivered": d.redelivered}, soft)
        # the result goes nowhere: don't check that it could be serialized
        job["check_result"] = bool((self.has_backend and not req.ignore_result)
                                   or req.callbacks or req.chain)
        if self.outcomes.children_store and not req.ignore_result:
            job["store"], job["reply_to"] = True, req.reply_to
        self.pool.submit(job, lambda outcome: self.outcomes.done(d, req, task, outcome,
                                                              acks_late),
                         hard, functools.partial(self.begin, d, req, acks_late))

    def begin(self, d: Delivery, req: TaskRequest, acks_late: bool) -> bool:
        """A pool thread or slot takes the task (on its thread): whether it runs. It does
        unless it was settled meanwhile (revoked) or given back (shutdown), its message
        was taken back by the broker, or it was revoked or expired while it waited. If
        it runs it is started now: out of ``reserved``, acked if at-most-once, STARTED
        stored (``task_track_started``), ``task-started`` sent."""
        assert self.consumer is not None
        with self.lock:
            if self.stopping:
                return False  # still reserved: shutdown gives it back
            if self.reserved.pop(id(d), None) is None:
                return False  # settled or given back already
        if self.consumer.stale(d):
            self._skip(req, d)
            return False
        if (req.id in self.revoked or req.expires is not None) and \
                self._revoked_now(d, req, claimed=True):
            return False
        if not acks_late:
            self.consumer.ack(d)  # at-most-once: acked as it starts
        else:
            self.lost_books.started(d)  # the broker's record of a start (lost.py)
        if self.track_started:
            self.store(req, STARTED, {"pid": os.getpid(), "hostname": self.hostname})
        self.event("task-started", req, queue=d.queue)
        return True

    def _revoked_now(self, d: Delivery, req: TaskRequest, claimed: bool = False) -> bool:
        """If the task is revoked or expired, settle it so (see _settle_revoked) unless
        another thread does (``claimed``: this one took it out of reserved already).
        Whether it is revoked or expired."""
        if req.id in self.revoked:
            why = "revoked"
        elif req.expires is not None and req.expires <= dt.datetime.now(dt.timezone.utc):
            why = "expired"
        else:
            return False
        if claimed or self._claim(d):
            self._settle_revoked(d, req, why)
        return True

    def _settle_revoked(self, d: Delivery, req: TaskRequest, why: str) -> None:
        """REVOKED stored, ``task-revoked`` sent, the message acked."""
        assert self.consumer is not None
        log.info("Task %s[%s] %s: not run", req.name, req.id, why)
        self.store(req, REVOKED, TaskRevokedError(why))
        self.event("task-revoked", req, terminated=False, signum=None, expired=why == "expired")
        self.consumer.ack(d)

    def revoke_reserved(self, ids: Sequence[str]) -> None:
        """Settle the reserved tasks among ``ids`` now (remote control's thread), not when
        their turn comes: whichever thread takes one out of reserved first settles or
        starts it (see begin)."""
        wanted = set(ids)
        with self.lock:
            found = [entry for entry in self.reserved.values() if entry[0].id in wanted]
        for req, d in found:
            if self._claim(d):
                self._settle_revoked(d, req, "revoked")

    def _claim(self, d: Delivery) -> bool:
        """Take ``d`` out of reserved; False if another thread did first."""
        with self.lock:
            return self.reserved.pop(id(d), None) is not None

    def requeue_when_lost(self, task: Task) -> bool:
        """Whether a task whose process died mid-run goes back to the queue (else it
        fails with WorkerLostError): ``reject_on_worker_lost``, for acks_late tasks."""
        reject = task.reject_on_worker_lost
        if reject is None:
            reject = bool(self.app.conf.task_reject_on_worker_lost)
        return reject and self.options_for(task)[0]

    def _skip(self, req: TaskRequest, d: Delivery) -> None:
        """The broker took the message back when the connection it came on dropped, and
        delivers it again: this copy is not run (else it would run twice)."""
        self._forget_reserved(d)
        log.info("Task %s[%s] not run from an old connection: the broker delivers it "
                 "again", req.name, req.id)

    def _forget_reserved(self, d: Delivery) -> None:
        with self.lock:
            self.reserved.pop(id(d), None)

    def _count(self, name: str) -> None:
        with self.lock:
            self.processed[name] = self.processed.get(name, 0) + 1

    def store(self, req: TaskRequest, state: str, result: Any,
              traceback: str | None = None, stored: bool = False) -> None:
        """Store the task's state (``stored``: the pool child did, or tried); a chord header
        task's final state is also its part of the chord (qops/chords.py), even when
        its result is ignored."""
        if not self.has_backend:
            return
        if not stored and (not req.ignore_result or state == FAILURE):
            try:
                self.app.backend.store(req.id, state, result, traceback,
                                       reply_to=req.reply_to)
            except Exception as exc:
                log.error("Task %s[%s]: could not store %s: %s", req.name, req.id, state,
                          exc)
        if req.chord and state in READY_STATES:
            chords.part_return(self.app, req.group, req.id, req.group_index, req.chord,
                               state, result)


    # -- shutdown ------------------------------------------------------------------------------
    def take_back(self) -> list[Delivery]:
        """Stop the timer and take back the messages taken but not started (prefetched,
        waiting for an ETA or a rate limit, queued in the pool), to go back to the
        broker at once so other workers can run them. None of them is acked yet (an
        at-most-once task is acked as it starts)."""
        held = {id(d): d for d in self.timer.drain() if d is not None}
        self.timer.join(10.0)
        with self.lock:
            held.update((key, d) for key, (_, d) in self.reserved.items())
            self.reserved.clear()  # a pool slot that takes one of them now drops it
        if self.pool is not None:
            self.pool.drain_unstarted()
        return list(held.values())

    def give_back(self, unstarted: list[Delivery]) -> None:
        """Give ``unstarted`` (from take_back()) back and close the consumer, which
        returns every message still unacked."""
        consumer = self.consumer
        if consumer is None:
            return
        try:
            consumer.give_back(unstarted)
        except Exception as exc:
            log.error("giving back the messages not started failed: %s", exc)
            try:
                consumer.close()
            except Exception as exc2:
                log.error("closing the consumer failed: %s", exc2)

