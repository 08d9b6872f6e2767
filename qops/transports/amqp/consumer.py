"""``_AMQPConsumer``: the AMQP transport's Consumer (work queues, and reply queues for
``reply_consumer``), on a connection of its own driven by the thread calling ``get()``.

The per-delivery path (``_on_message``, ``get``, ``_hand_out``) is tuned for
throughput: add no calls or locks to it. What was handed out and not settled, and the
room, are kept by ``Prefetch`` (qops/transports/prefetch.py) as for every consumer; the
batching of settlements (``_acks``/``_nacks``, ``_run_ops``) and the ``basic.qos``
window that follows exempt deliveries are AMQP's, and here.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pika.exceptions as pex

from qops.errors import BrokerUnreachable
from qops.transports.amqp import lost
from qops.transports.amqp.deadletters import dead_letter
from qops.transports.amqp.frames import Deliver
from qops.transports.amqp.link import (
    LINK_ERRORS,
    NOT_IMPLEMENTED,
    PUMP_SLICE,
    _channel_error,
    _Link,
    consumer_lost,
    lost_text,
)
from qops.transports.amqp.props import _message
from qops.transports.amqp.queueset import QueueSet
from qops.transports.amqp.rawio import DeliveryReader, write
from qops.transports.amqp.wire import settlements
from qops.transports.base import Consumer, Delivery, make_delivery
from qops.transports.prefetch import Prefetch

if TYPE_CHECKING:
    from qops.transports.amqp.transport import AMQPTransport

log = logging.getLogger(__name__)


#: a delivery as pika gave it: (tag, queue, redelivered, BasicProperties, body); buffered
#: until get() hands it out, then the value the books hold for its tag (reject() needs
#: its properties)
_Item = tuple[int, str, bool, Any, bytes]


class _AMQPConsumer(QueueSet, Consumer):
    """Reserves messages with ``basic.consume`` (manual acks, ``basic.qos`` = prefetch).

    The broker pushes at most ``prefetch`` unacknowledged messages; they wait in
    ``_buffer`` until ``get()`` hands them out. Delivery tags count from 1 on each
    channel, so after a reconnect they would collide with tags handed out before it:
    ``Delivery.tag`` is ``_base`` + the channel's tag, ``_base`` being the highest tag
    seen before the current channel. Settling a delivery from an older channel is a
    no-op: the broker already requeued it when that connection dropped.

    Threads: deliveries reach ``_take`` only while the connection is pumped (by
    ``DeliveryReader``, rawio.py, reading them off the socket itself, or by pika),
    which only ``get()``, ``keepalive()`` and ``close()`` do, each holding ``_io``; so
    ``_buffer`` (and ``_top``, ``_base``, the consumer tags) change only under ``_io``,
    and ``_take`` takes no lock. The books (``_books``: handed out, not settled) and the
    settlements not yet sent are shared with any thread, under ``_lock``; ``_hand_out``
    moves a delivery from ``_buffer`` to the books under it.

    Settlements are batched. ``ack``/``requeue`` (any thread) move the tag from the
    books to ``_acks``/``_nacks`` under ``_lock``, and wake the owner only while it is
    blocked pumping, once, when ``ack_batch`` of them wait or nothing else is held (a
    wake-up is a pipe write and a context switch; the pump's slice bounds the wait). A
    busy owner takes them at its next ``get()``, which writes them before it blocks,
    and while it has deliveries to hand out or its caller has other work (timeout 0)
    once there are ``ack_batch``. Each batch is one write: acks below the lowest tag
    still held, buffered or requeued become one ``basic.ack(multiple)`` (tags only grow
    on a channel; the books and ``_buffer`` keep that order), the others go one by one.

    The prefetch is a channel-wide ``basic.qos`` (``global``, in RabbitMQ's meaning:
    shared by the consumers of all our queues, as Celery sets it). ``exempt()`` grows
    that window by one for each exempt delivery (as Celery does for its ETA tasks), so
    the broker keeps sending ``prefetch`` countable messages; settling one shrinks it
    again, the new window sent before the settlement so that the broker never has room
    for one more. A quorum queue refuses a channel-wide prefetch (540 NOT_IMPLEMENTED,
    which closes the connection): a consumer of a queue configured as quorum starts with
    a per-consumer prefetch (as Celery with ``worker_detect_quorum_queues``), one that
    meets an unexpected quorum queue reconnects with one. RabbitMQ can't change a
    per-consumer prefetch under a running consumer, so then ``exempt()``
    raises NotImplementedError. Either way ``get()`` also counts what it handed out
    and not settled, exempt deliveries apart, and never exceeds ``prefetch``.
    """

    transport: AMQPTransport
    _reader: DeliveryReader  # reads the current channel's deliveries (set by _open)

    def __init__(self, transport: AMQPTransport, queues: list[str], prefetch: int,
                 cid: str, reply: bool = False,
                 binding: tuple[str, str] | None = None) -> None:
        self.transport = transport
        self.id = cid
        self.hold_limit = transport.hold_limit
        # _wanted, _books, _acks, _nacks, _ops, _woken. A plain Lock, taken directly (a
        # Condition's ``with`` is a Python call more); the books' Condition wraps it
        self._lock = threading.Lock()
        # handed out, not settled: tag -> its _Item, in hand-out order (ascending tags);
        # exempt ones apart (the window follows them). Nobody waits on its Condition:
        # get() blocks pumping the connection, and settlements wake that (_wake)
        self._books: Prefetch[_Item] = Prefetch(prefetch, threading.Condition(self._lock))
        self.prefetch = self._books.limit
        # a reply consumer: its one queue is a reply queue, declared on its connection
        # (again after a reconnect: the broker deleted it with the old connection), and
        # bound to (exchange, routing key) as kombu binds a pidbox reply queue
        self.reply = reply
        self.binding = binding
        self._io = threading.RLock()  # whoever drives the connection (get, close)
        self._wanted: list[str] = list(dict.fromkeys(queues))
        self._acks: list[int] = []  # settled, not yet sent
        self._nacks: list[int] = []
        self._qos_due = False  # the window must follow len(_books.exempted)
        self._window = self.prefetch  # basic.qos on the current channel (owner only)
        # channel-wide prefetch; per-consumer from the start when a queue is configured
        # as quorum (as Celery's worker_detect_quorum_queues), or once one refused it
        decl = transport.options.declarations
        self._global_qos = reply or not (decl.detect_quorum and decl.quorum(self._wanted))
        self._pumping = False  # the owner is blocked pumping the connection
        self._pump_itself = False  # ... in DeliveryReader's wait, not pika's
        self._woken = False  # ... and a wake-up is on its way to it
        # replace(): nothing is handed out until the replaced delivery's ack is written
        # (0: off, 1: the copy is on its way, 2: its original's ack is queued)
        self._replacing = 0
        self._ops: deque[tuple[str, str]] = deque()  # queue changes from any thread
        self._buffer: deque[_Item] = deque()  # delivered, not handed out (under _io)
        self._tags: dict[str, str] = {}  # queue -> consumer tag, on the current channel
        self._queue_of: dict[str, str] = {}  # consumer tag -> queue
        self._base = 0
        self._top = 0
        self._owner = threading.get_ident()
        self._closed = False
        self._link: _Link | None = None
        self._connect()

    # -- connection (owner thread only) ------------------------------------------------------
    def _connect(self) -> None:
        while True:
            try:
                self._open()
                return
            except pex.ConnectionClosedByBroker as exc:
                if exc.reply_code == NOT_IMPLEMENTED and self._global_qos:
                    log.info("consumer %s: a queue refuses a channel-wide prefetch (a "
                             "quorum queue?): using a per-consumer prefetch of %d; held ETA "
                             "tasks keep their prefetch slots", self.id, self.prefetch)
                    self._global_qos = False
                    continue
                raise BrokerUnreachable(
                    f"RabbitMQ at {self.transport.safe_url()} closed the connection while "
                    f"consumer {self.id} started ({exc.reply_code} {exc.reply_text})"
                ) from None

    def _open(self) -> None:
        link = _Link(self.transport.connect("consumer"))
        try:
            ch = link.main()
            ch.basic_qos(prefetch_count=self.prefetch, global_qos=self._global_qos)
            self._window = self.prefetch
            ch.add_on_cancel_callback(self._on_cancel)
            self._base = self._top
            self._tags.clear()
            self._queue_of.clear()
            self._reader = DeliveryReader(link.conn, ch.channel_number, self._queue_of,
                                          self._take)
            self._link = link
            with self._lock:
                wanted = list(self._wanted)
            for q in wanted:
                self._consume(q)
        except pex.ChannelClosedByBroker as exc:
            self._link = None
            link.close()
            raise _channel_error(exc, f"consuming from {self._wanted}",
                                 self.transport.safe_url()) from None
        except pex.ConnectionClosedByBroker:
            self._link = None
            raise  # _connect() decides
        except LINK_ERRORS as exc:
            self._link = None
            link.close()
            raise BrokerUnreachable(lost_text(self.transport.safe_url(), "starting to consume",
                                              exc)) from None

    def _forget_deliveries(self) -> None:
        """The connection is gone: its deliveries, and settlements of them, are moot
        (the broker requeues whatever it had given us)."""
        self._buffer.clear()
        with self._lock:
            self._books.clear_locked()
            self._acks.clear()
            self._nacks.clear()

    def _lost(self, exc: BaseException) -> None:
        """The connection is gone: the broker requeues everything it had given us."""
        log.warning("consumer %s %s; reconnecting", self.id, consumer_lost(exc))
        link, self._link = self._link, None
        if link is not None:
            link.close()
        self._forget_deliveries()
        with self._lock:
            # queue changes are replayed from _wanted on reconnect
            self._qos_due = False
            self._ops.clear()

    def _requeue_buffered(self, queue: str) -> None:
        """Messages of ``queue`` delivered and not handed out go back now (its consumer
        was cancelled)."""
        link = self._link
        assert link is not None
        keep: deque[_Item] = deque()
        for item in self._buffer:
            if item[1] == queue:
                link.main().basic_nack(item[0] - self._base, requeue=True)
            else:
                keep.append(item)
        self._buffer = keep

    def _on_message(self, _ch: Any, method: Any, props: Any, body: bytes) -> None:
        self._take((method.consumer_tag, method.delivery_tag, method.redelivered,
                    method.routing_key, props, body))

    def _take(self, d: Deliver) -> None:
        """A delivery, read by pika (``_on_message``) or by ``DeliveryReader``."""
        consumer_tag, tag, redelivered, routing_key, props, body = d
        tag += self._base
        if tag > self._top:
            self._top = tag
        # no lock: only the thread pumping under _io gets here (see the class doc)
        self._buffer.append((tag, self._queue_of.get(consumer_tag, routing_key), redelivered,
                             props, body))

    def _run_ops(self) -> bool:
        """Send the settlements made since the last call, then apply queue changes.
        Returns whether frames were written that still need a flush."""
        link = self._link
        assert link is not None
        with self._lock:
            acks, nacks = self._acks, self._nacks
            if not acks and not nacks and not self._ops and not self._qos_due:
                return False
            self._acks, self._nacks = [], []
            if self._replacing == 2:
                self._replacing = 0  # written below: hand-outs may go on
            ops = list(self._ops)
            self._ops.clear()
            # the lowest tag the broker still holds for us and that we don't ack now:
            # handed out (the books) or buffered, each in ascending order
            first = next(iter(self._books.held.values()), None)
            floor = first[0] if first is not None else self._top + 1
            if self._buffer and self._buffer[0][0] < floor:
                floor = self._buffer[0][0]
            window = self.prefetch + len(self._books.exempted)
            self._qos_due = False
        base = self._base
        written = False
        if window != self._window:
            # before the settlements: a smaller window must reach the broker before the
            # ack that frees the slot (basic_qos waits for its qos-ok)
            link.main().basic_qos(prefetch_count=window, global_qos=True)
            self._window = window
        if acks or nacks:
            ch = link.main()
            if not ch.is_open:
                raise pex.ChannelWrongStateError("Channel is closed.")
            floor = min(floor, *nacks) if nacks else floor
            # tags from a previous connection are back in their queue already
            frames = settlements(ch.channel_number, [t - base for t in acks if t > base],
                                 [t - base for t in nacks if t > base], floor - base)
            if frames:  # one write for the batch
                written = write(link.conn._impl, b"".join(frames), len(frames))
        for op, queue in ops:
            with self._lock:
                wanted = queue in self._wanted
            if op == "consume":
                if wanted and queue not in self._tags and not self._closed:
                    self._add(queue)
            elif not wanted:
                self._cancel(queue)
        return written

    def _wake(self, itself: bool) -> None:
        """Wake the owner's pump (from another thread), so it runs the queued ops."""
        if threading.get_ident() == self._owner:
            return  # the next get() (or close()) on this thread runs them
        try:
            self._reader.wake(itself)
        except LINK_ERRORS:
            pass  # closed: the broker requeues everything anyway

    # -- Consumer API ----------------------------------------------------------------------
    def get(self, timeout: float) -> Delivery | None:
        self._owner = threading.get_ident()
        deadline = time.monotonic() + timeout
        while True:
            with self._io:
                if self._closed:
                    return None
                try:
                    link = self._link
                    if link is not None and (why := link.broken()) is not None:
                        # closed under us (pika raises ValueError if pumped now)
                        self._lost(why)
                        link = None
                    if link is None:
                        self._connect()
                        link = self._link
                        assert link is not None
                    if self._buffer and (d := self._hand_out(False)) is not None:
                        return d
                    left = deadline - time.monotonic()
                    if left <= 0 and not self._buffer:
                        with self._lock:
                            if not self._due_locked():
                                return None  # the caller has work: settlements wait
                    if self._run_ops() and (self._buffer or left <= 0):
                        # what waits in pika's buffer goes now: settlements free prefetch
                        # slots, which the broker fills while the caller works
                        self._reader.pump(0)
                    if self._buffer and (d := self._hand_out(True)) is not None:
                        return d
                    if left <= 0:
                        return None
                    with self._lock:
                        if self._acks or self._nacks or self._ops or self._qos_due:
                            continue  # came in since _run_ops: send them first
                        self._pumping = True
                        self._pump_itself = self._reader.waits_itself()
                        self._woken = False
                    try:
                        # flushes what _run_ops left in pika's buffer, then waits for
                        # deliveries or a wake-up
                        self._reader.pump(min(left, PUMP_SLICE))
                    finally:
                        self._pumping = False
                except LINK_ERRORS as exc:
                    # reconnect on the next turn; if that fails, BrokerUnreachable goes up
                    self._lost(exc)
                    if time.monotonic() >= deadline:
                        return None

    def keepalive(self) -> None:
        """Pump the connection once (AMQP heartbeats, settlements) unless the owner has
        it; deliveries that arrive are buffered for the owner's next get()."""
        if not self._io.acquire(blocking=False):
            return
        try:
            link = self._link
            if self._closed or link is None or not link.conn.is_open:
                return
            try:
                self._run_ops()
                link.conn.process_data_events(0)
            except LINK_ERRORS as exc:
                self._lost(exc)  # get() reconnects
        finally:
            self._io.release()

    def _due_locked(self) -> bool:
        """``ack_batch`` settlements, or a queue or window change, wait to be written."""
        return (len(self._acks) + len(self._nacks) >= self.ack_batch or bool(self._ops)
                or self._qos_due)

    def _hand_out(self, now: bool) -> Delivery | None:
        """The oldest buffered delivery (``_buffer`` not empty; under ``_io``), now held,
        if there is room (fewer than ``prefetch`` handed out and not settled, exempt ones
        apart: the broker's window sees to it already, this is the guarantee) and,
        unless ``now``, what was settled or changed since the last write can wait for
        the next get() (fewer than ``ack_batch`` settlements, no queue or window
        change). Else None. One lock: this runs for every delivery."""
        buffer = self._buffer
        with self._lock:
            if self._replacing or not now and self._due_locked():
                return None
            item = buffer[0]
            if not self._books.hold_if_room_locked(item[0], item):
                return None
            buffer.popleft()
        tag, queue, redelivered, props, body = item
        return make_delivery(queue, tag, body, lambda raw: _message(props, raw), redelivered,
                             self.transport.options.max_message_size)

    def held(self, queue: str) -> int:
        """Deliveries of ``queue`` this consumer holds: handed out or buffered."""
        while True:
            with self._lock:  # a hand-out moves one from _buffer to the books under it
                try:
                    # _on_message appends without the lock; tuple() copies in one go
                    buffered = tuple(self._buffer)
                except RuntimeError:  # ... unless the copy let another thread run
                    continue
                return (sum(1 for item in self._books.held.values() if item[1] == queue)
                        + sum(1 for item in buffered if item[1] == queue))

    def buffered(self) -> list[Delivery]:
        while True:
            try:
                items = tuple(self._buffer)  # see held()
            except RuntimeError:
                continue
            return [make_delivery(queue, tag, body, functools.partial(_message, props),
                                  redelivered, self.transport.options.max_message_size)
                    for tag, queue, redelivered, props, body in items]

    def _settle(self, delivery: Delivery, acked: bool) -> None:
        tag = delivery.tag
        books = self._books
        with self._lock:
            exempt = tag in books.exempted
            if books.settle_locked(tag) is None:
                return  # settled already, or from a lost connection: acking twice would
                # be a channel error that drops every other reserved message
            (self._acks if acked else self._nacks).append(tag)
            if exempt:
                self._qos_due = True  # the window shrinks back
            if not self._pumping or self._woken:
                return  # the owner takes it before it blocks, or is being woken already
            if len(self._acks) + len(self._nacks) < self.ack_batch and books.held \
                    and not exempt:
                return  # more are coming: wake for a batch (PUMP_SLICE bounds the wait)
            self._woken = True
            itself = self._pump_itself
        self._wake(itself)

    def ack(self, delivery: Delivery) -> None:
        self._settle(delivery, True)

    def exempt(self, delivery: Delivery) -> None:
        if not self._global_qos:
            raise NotImplementedError(
                "RabbitMQ can't grow a per-consumer prefetch (quorum queue): the held "
                "delivery keeps its prefetch slot")
        with self._lock:
            if not self._books.exempt_locked(delivery.tag):
                return  # settled already, or from a lost connection
            self._qos_due = True
            if not self._pumping or self._woken:
                return
            self._woken = True
            itself = self._pump_itself
        self._wake(itself)

    def stale(self, delivery: Delivery) -> bool:
        # tags of the current channel are above _base (see the class doc)
        return delivery.tag <= self._base

    def requeue(self, delivery: Delivery) -> None:
        # basic.nack(requeue) puts it back at (or near) the head of its queue
        self._settle(delivery, False)

    def reject(self, delivery: Delivery, reason: str) -> None:
        """Dead-letter with the original headers and properties (a plain
        Transport.dead_letter only gets the body), then ack. If the DLQ publish fails
        the message stays reserved, so it is never lost."""
        item = self._books.peek(delivery.tag)
        if item is None:
            return
        dead_letter(self.transport, delivery.queue, delivery.raw, reason, item[3])
        self.ack(delivery)

    def worker_lost(self, delivery: Delivery, died: bool = False) -> tuple[int, bool]:
        return lost.count(delivery, died)  # every redelivery counts: see lost.py

    def after_lost(self, delivery: Delivery, count: int) -> bool:
        return lost.keep(self, delivery, count)

    def replace(self, deliveries: list[Delivery], publish: Callable[[], list[int]]
                ) -> list[Delivery]:
        """``publish`` copies of ``deliveries`` (it returns the indexes of the copies not
        confirmed), then ack those whose copy was; nothing is handed out from the start
        until the acks are written, so a copy never runs while the broker could still
        deliver the original again too (a crash of the copy's run before the ack went
        out would leave two). Returns the deliveries not acked."""
        with self._lock:
            self._replacing = 1
        try:
            unconfirmed = set(publish())
        except BaseException:
            with self._lock:
                self._replacing = 0
            raise
        with self._lock:
            self._replacing = 2
        for i, d in enumerate(deliveries):
            if i not in unconfirmed:
                self._settle(d, True)
        with self._lock:
            if self._replacing == 2 and not self._acks:
                self._replacing = 0  # nothing to wait for (settled already, or written)
        return [d for i, d in enumerate(deliveries) if i in unconfirmed]

    def heartbeat(self) -> None:
        """Nothing to do: AMQP heartbeats go while get() pumps (it is called all along)."""

    def renew(self, delivery: Delivery) -> None:
        lost.give_back(self, [delivery])  # (held past half the consumer_timeout)

    def give_back(self, unstarted: list[Delivery]) -> None:
        """Close on purpose: what has arrived is read, consuming stops (basic.cancel:
        nothing more comes), and what was handed out and not started (``unstarted``) or
        is still buffered goes back without counting as a worker loss (lost.give_back)."""
        with self._io:
            link, buffered = self._link, []
            if not self._closed and link is not None and link.conn.is_open:
                try:
                    link.cancel_consumers(list(self._tags.values()), self._reader.pump)
                    self._tags.clear()
                    buffered = self.buffered()
                    for item in self._buffer:
                        self._books.hold(item[0], item)
                    self._buffer.clear()
                except LINK_ERRORS:
                    buffered = []  # the close returns them all
                lost.give_back(self, [*unstarted, *buffered])
        self.close()

    def close(self) -> None:
        """Send the acks still queued, then close the connection: RabbitMQ puts every
        message still reserved back in its queue."""
        with self._io:
            if self._closed:
                return
            self._closed = True
            link, self._link = self._link, None
            if link is not None:
                try:
                    self._link = link
                    if link.conn.is_open and self._run_ops():
                        link.conn.process_data_events(0)  # flush the last settlements
                except LINK_ERRORS:
                    pass
                finally:
                    self._link = None
                    link.close()
            self._forget_deliveries()
        with self.transport._lock:
            self.transport._consumers.discard(self)
