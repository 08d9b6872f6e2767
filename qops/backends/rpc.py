"""``rpc://``: results travel back as messages, on the broker the tasks went through.

The client (the process that sends tasks) opens one reply queue per process, named by a
random id (its "oid"), and puts that name in the ``reply_to`` of every task it sends.
The worker publishes each state of the task (STARTED, RETRY, SUCCESS, ...) as the usual
meta dict (docs/protocol.md §6.2) to that queue with ``correlation_id`` = the task id, and
stores nothing anywhere. The client files what arrives by task id.

What follows from that, as with Celery's rpc backend:

- a result is visible only to the process that sent the task, and only while it runs:
  another process (or a child forked after the send) sees PENDING, and ``wait()`` there
  fails at once if this process never sent a task with a reply queue;
- a result lives in that process's memory: it is gone when the process ends, nothing is
  stored for ``result_expires``; ``forget()`` drops it;
- a reply queue is temporary: replies that arrive after the client went away are
  dropped by the broker;
- "never overwrite SUCCESS" holds on the client: once a SUCCESS is in for a task, later
  states for it are ignored.

Threads may share the backend: the reply consumer and the cache are guarded by locks,
and one thread at a time reads the reply queue for all of them. While the reply queue
is open, a daemon thread drains it every ``heartbeat_interval`` seconds: replies are
then filed (and acked) even when nobody waits, and the consumer's connection shows it is
alive (a RabbitMQ connection that nobody pumps misses its heartbeats and is closed,
which would delete the reply queue; a Redis reply list would expire).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from typing import Any

from qops import protocol
from qops.backends.base import READY_STATES, SUCCESS, ResultBackend
from qops.errors import QopsError, UsageError
from qops.protocol import Message
from qops.transports.base import Consumer, Delivery, Transport

log = logging.getLogger(__name__)

#: how long a "non-blocking" read may pump the broker connection: AMQP reads the socket
#: only while it waits, so 0 would never see replies that are not buffered yet
POLL = 0.01
#: at most this many replies are filed per read, so a flood cannot starve the caller
DRAIN_BATCH = 1000
#: results kept per process; past it the oldest finished ones are dropped (the
#: AsyncResult that waited for one keeps its own copy)
CACHE_MAX = 10000

#: every live backend, so that a forked child resets them all before it runs anything
_BACKENDS: weakref.WeakSet[RPCBackend] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for backend in list(_BACKENDS):
        backend._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class RPCBackend(ResultBackend):
    def __init__(self, url: str, *, expires: float | None = 86400,
                 prefix: str = "qops-task-meta-", transport: Transport | None = None) -> None:
        super().__init__(url, expires=expires, prefix=prefix)
        if transport is None:
            raise UsageError("the rpc:// result backend sends results through the broker: "
                             "it needs the app's transport (use it through an App)")
        self.transport = transport
        # _lock guards the cache and the consumer's existence; _io is held by whichever
        # thread reads the reply queue (Consumer.get is for one thread at a time).
        self._lock = threading.Lock()
        self._io = threading.Lock()
        self._pid = os.getpid()
        self._consumer: Consumer | None = None
        self._oid: str | None = None
        self._cache: OrderedDict[str, tuple[str, bytes]] = OrderedDict()  # id -> (state, meta)
        self._stop = threading.Event()
        _BACKENDS.add(self)

    # -- client: the reply queue ---------------------------------------------------------
    def _forked(self) -> None:
        """In a forked child: forget the parent's reply queue without touching it (reading
        it would steal the parent's results, closing it would delete it). The child opens
        its own when it sends a task. Runs right after the fork, in the child's only
        thread; the locks are new because a parent thread may have held them."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._io = threading.Lock()
        self._consumer = None
        self._oid = None
        self._cache = OrderedDict()
        self._stop = threading.Event()  # the keeper thread did not survive the fork

    def _check_fork(self) -> None:
        # The at-fork hook has normally done it; this covers a fork it did not see.
        if self._pid != os.getpid():
            self._forked()

    def prepare_send(self) -> str:
        """The name of this process's reply queue, opened on first use."""
        self._check_fork()
        with self._lock:
            if self._consumer is None:
                oid = uuid.uuid4().hex
                self._consumer = self.transport.reply_consumer(oid)
                self._oid = oid
                self._start_keeper(self._consumer)
            assert self._oid is not None
            return self._oid

    def _current(self) -> Consumer | None:
        self._check_fork()
        with self._lock:
            return self._consumer

    def _start_keeper(self, consumer: Consumer) -> None:
        stop = self._stop
        interval = max(0.1, float(self.transport.options.heartbeat_interval))
        # A weak reference: a backend dropped without close() must not be kept alive
        # (and its reply queue read forever) by this thread.
        ref = weakref.ref(self)

        def keep() -> None:
            while not stop.wait(interval):
                backend = ref()
                if backend is None:
                    consumer.close()  # nobody can read these replies any more
                    return
                if backend._current() is not consumer:
                    return  # closed, or replaced after a fork
                try:
                    backend._drain(0.0, wait_lock=False)
                except QopsError as exc:  # broker away: the next round tries again
                    log.warning("rpc results: cannot read the reply queue: %s", exc)
                except Exception:  # never let the keeper die silently on a bug
                    log.exception("rpc results: reading the reply queue failed")
                del backend

        threading.Thread(target=keep, name="qops-rpc-replies", daemon=True).start()

    def _drain(self, block: float, task_id: str | None = None, wait_lock: bool = True) -> None:
        """File the replies that have arrived; wait up to ``block`` seconds for the
        first one. If another thread is reading, wait for it instead (up to ``block``),
        unless ``wait_lock`` is false."""
        self._check_fork()
        io = self._io
        start = time.monotonic()
        got = io.acquire(timeout=max(block, 0.0)) if wait_lock else io.acquire(blocking=False)
        if not got:
            return
        try:
            consumer = self._current()
            if consumer is None:
                return
            if task_id is not None and self._ready(task_id):
                return  # the thread that read before us filed it
            d = consumer.get(max(block - (time.monotonic() - start), POLL))
            n = 0
            while d is not None:
                self._file(consumer, d)
                n += 1
                if n >= DRAIN_BATCH:
                    break
                d = consumer.get(0)
        finally:
            io.release()

    def _file(self, consumer: Consumer, d: Delivery) -> None:
        """Cache one reply by task id, then ack it (it is in memory now: a requeue
        could only hand it to us again)."""
        try:
            if d.message is None:
                raise ValueError(d.error or "undecodable envelope")
            meta = protocol.loads(d.message.body.decode(d.message.content_encoding or "utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("the reply is not a result dict")
            task_id = d.message.properties.get("correlation_id") or meta.get("task_id")
            state = meta.get("status")
            if not isinstance(task_id, str) or not isinstance(state, str):
                raise ValueError("the reply names no task id or no state")
        except (ValueError, UnicodeDecodeError, LookupError) as exc:
            log.warning("rpc results: dropping a malformed reply on %s: %s", d.queue, exc)
        else:
            with self._lock:
                old = self._cache.get(task_id)
                if old is None or old[0] != SUCCESS:
                    self._cache[task_id] = (state, d.message.body)
                    self._cache.move_to_end(task_id)
                    self._trim()
        consumer.ack(d)

    def _trim(self) -> None:
        """Keep the cache bounded; drop finished results first, oldest first (a result
        still running is what somebody may wait for). Called with _lock held."""
        excess = len(self._cache) - CACHE_MAX
        if excess <= 0:
            return
        for tid in [t for t, (state, _) in self._cache.items() if state in READY_STATES]:
            del self._cache[tid]
            excess -= 1
            if excess <= 0:
                break

    def _ready(self, task_id: str) -> bool:
        with self._lock:
            item = self._cache.get(task_id)
        return item is not None and item[0] in READY_STATES

    # -- ResultBackend ----------------------------------------------------------------------
    def _get(self, task_id: str) -> bytes | None:
        if self._current() is not None:
            self._drain(0.0, task_id)
        with self._lock:
            item = self._cache.get(task_id)
        return None if item is None else item[1]

    def wait(self, task_id: str, timeout: float | None = None) -> dict[str, Any]:
        if self._current() is None:
            raise UsageError(
                f"cannot wait for task {task_id} with the rpc:// result backend: results "
                "go only to the process that sent the task, and this process has sent none "
                "(use a stored result backend, e.g. redis://, to read results elsewhere)")
        return super().wait(task_id, timeout)

    def _wait(self, task_id: str, timeout: float) -> None:
        self._drain(timeout, task_id)

    def _store(self, task_id: str, data: bytes, state: str, *, reply_to: str | None) -> None:
        if not reply_to:
            return  # the sender asked for no result
        self.transport.send_reply(reply_to, Message(
            body=data, headers={}, properties={"correlation_id": task_id}))

    def _delete(self, task_id: str) -> None:
        with self._lock:
            self._cache.pop(task_id, None)

    def close(self) -> None:
        """Close the reply queue (the broker deletes it) and stop reading it."""
        self._check_fork()  # a child never closes its parent's queue
        with self._lock:
            consumer, self._consumer, self._oid = self._consumer, None, None
            self._stop.set()
            self._stop = threading.Event()
        if consumer is not None:
            with self._io:
                consumer.close()
