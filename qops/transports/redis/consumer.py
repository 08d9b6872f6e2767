"""``RedisConsumer``: reserves from the queue lists into per-source in-flight lists, with
its prefetch and settlement books (see the class doc; the layout is in the package doc).

The per-delivery path (``get``, ``ack``, ``_exchange``) is tuned for throughput: one round
trip carries the queued acks and the next reserve batch as pre-packed RESP over a
``Link``."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from qops.transports.base import Consumer, Delivery, make_delivery, one_line
from qops.transports.lease import Lease, clock, is_stale, warn_taken_back
from qops.transports.prefetch import Prefetch
from qops.transports.redis import deadletters, lost, recovery
from qops.transports.redis.delivery import Tag, decode, tag_of
from qops.transports.redis.link import UNREACHABLE, Link, bulk, load_script
from qops.transports.redis.names import SEP, STEPS, list_name
from qops.transports.redis.registration import Registration

if TYPE_CHECKING:
    from qops.transports.redis.transport import RedisTransport

log = logging.getLogger(__name__)

# How long one BLMOVE waits on a single list before the consumer checks every list again.
# A message on the list being waited on wakes the consumer at once; one on another list
# (another queue, or a priority step) waits at most this long when the consumer is idle.
WAIT_SLICE = 0.1
LINGER = 0.002  # seconds get() waits for half its prefetch to come free (class doc)
# A queued ack waits for the next reserve to carry it to Redis at most about this long
# while get() is being called (once the consumer is idle in BLMOVE: one WAIT_SLICE).
ACK_DELAY = 0.1
HEAD_LOST = load_script("head_lost.lua")


@dataclass
class _Plan:
    """The reserve command for the current candidate lists, packed once: only the room,
    the list to block on and the acks change from call to call."""

    names: list[str]
    index: dict[str, int]  # list name -> k (1-based) in names
    keys: list[str]
    static_args: list[str]  # ARGV before the changing part
    packed: bytes  # numkeys, keys and static_args in RESP
    count: int  # how many RESP items ``packed`` holds


class RedisConsumer(Consumer):
    """Reserves from Redis lists into per-source in-flight lists (see the package doc).

    ``get`` runs on one thread and talks to Redis over a connection of its own (a
    ``Link``; BLMOVE blocks it). ``ack`` does not talk to Redis: it queues the ack, and
    the next reserve carries it in the same script and round trip (``lua/reserve.lua``
    removes the acked payloads from flight, then takes more). A queued ack waits at most
    about ``ACK_DELAY`` (one BLMOVE slice when idle); ``heartbeat()`` and ``close()``
    flush what is queued too. A queued ack counts as settled for the prefetch, and if
    the process dies before the flush the message runs again (at least once, as for any
    crash before an ack). Acks made on the thread that calls get() (early acks, see
    ``_flush_now``) are sent at once. requeue, reject and heartbeat go through the
    transport's pool.

    Reserving in batches: when less than half the prefetch is free and messages are in
    hand, get() waits up to ``LINGER`` for more acks, so that one round trip takes (and
    acks) several messages instead of one each. With the solo and threads pools
    (``pool_threads``) the pool thread whose ack frees that room yields the GIL to get(),
    so that the round trip overlaps the tasks still queued (bench/README.md, session 10).

    Taken for dead (see qops/transports/lease.py): every command about its in-flight
    lists (reserve, ack, requeue, reject, heartbeat) goes out under ``_wire``, after a
    check-in when the lease is overdue, so that a check-in that finds the consumer
    taken back is ordered with its reserves: whatever it holds then is stale, and
    nothing stale is ever sent (an ack of a stale copy could remove the requeued one,
    should this consumer have reserved it again)."""

    transport: RedisTransport

    def __init__(self, transport: RedisTransport, queues: list[str], prefetch: int,
                 cid: str) -> None:
        self.transport = transport
        self.id = cid
        self._queues = list(dict.fromkeys(queues))
        # Handed out and not yet settled: seq -> (list name, raw); and the exempt ones.
        # Guards the books and everything below; get() waits on it (through the books'
        # condition, made on it). Taken as the plain lock: a Condition's ``with`` runs
        # Python code, the lock's does not (several times per task).
        self._lock = threading.Lock()
        self._books: Prefetch[tuple[str, bytes]] = Prefetch(
            prefetch, threading.Condition(self._lock))
        self._batch = max(1, self._books.limit // 2)
        # Held for the whole of get(): close() takes it so that it never unregisters the
        # consumer while a reserve/BLMOVE may still add to its in-flight lists.
        self._get_lock = threading.Lock()
        self._closed = False
        # Already in flight on the server, not yet handed out (a reserve batch): pending
        # for the books' room.
        self._cache: deque[tuple[str, bytes]] = deque()
        # Acked, not yet removed from flight on the server: (list name, raw).
        self._acks: list[tuple[str, bytes]] = []
        self._acks_since = 0.0  # monotonic time of the oldest queued ack
        self._rotation = 0
        self._resync_needed = False
        self._last_beat = 0.0
        self._plan: _Plan | None = None  # rebuilt when the queues change
        self._get_thread = 0  # ident of the thread that calls get()
        # Held while a command about the in-flight lists is on its way (see the class doc).
        self._wire = threading.Lock()
        self._lease = Lease(transport.options.heartbeat_ttl)
        self._registered = False  # a first check-in went through
        # Every list name this consumer may hold messages from; re-registered by heartbeat().
        self._used: set[str] = set(self._candidates())
        self._registration = Registration(transport, cid)
        # No automatic retries on this connection: a retried reserve whose first reply was
        # lost would take messages twice. A failed call sets _resync_needed instead.
        self._pool = transport._make_pool(
            Retry(NoBackoff(), 0),
            socket_timeout=max(1.0, transport.options.connect_timeout) + WAIT_SLICE)
        self._link = Link(self._pool)
        self._lost = lost.LostRecords(transport, self._pool, cid)  # worker-lost records
        transport.bind(self._queues)
        self.heartbeat()

    # -- names ------------------------------------------------------------------------
    def _candidates(self) -> list[str]:
        """List names in service order: every queue's step 0, then step 3, ... (kombu's
        order), queues in order of preference within a step."""
        return [list_name(q, s) for s in STEPS for q in self._queues]

    def _inflight(self, name: str) -> str:
        return self.transport.inflight_key(self.id, name)

    def _make_plan(self) -> _Plan:
        t = self.transport
        names = self._candidates()
        keys = [t.key("qops.consumers"), t.key(f"qops.sources.{self.id}")]
        for name in names:
            keys += [t.key(name), self._inflight(name)]
        static_args = [str(len(names)), self.id, *names]
        items: list[str | int] = [len(keys), *keys, *static_args]
        return _Plan(names, {n: k for k, n in enumerate(names, 1)}, keys, static_args,
                     b"".join(bulk(i) for i in items), len(items))

    @property
    def queues(self) -> list[str]:
        with self._lock:
            return list(self._queues)

    def exempt(self, delivery: Delivery) -> None:
        self._books.exempt(tag_of(delivery).seq)

    # -- reserving ----------------------------------------------------------------------
    def get(self, timeout: float) -> Delivery | None:
        deadline = time.monotonic() + max(0.0, timeout)
        beat_every = self.transport.options.heartbeat_interval
        linger_until = 0.0
        with self._get_lock:
            self._get_thread = threading.get_ident()
            while True:
                now = time.monotonic()
                left = deadline - now
                with self._lock:
                    if self._closed:
                        return None
                    acks_due = bool(self._acks) and now - self._acks_since >= ACK_DELAY
                    if self._cache and not acks_due:
                        # Booked as handed out under the lock; decoded outside it so
                        # acks from other threads never wait for a big JSON parse.
                        name, raw = self._cache.popleft()
                        tag = Tag(self._books.take_locked((name, raw)), name,
                                  self._lease.epoch)
                        again = self._lost.again_locked((name, raw))
                    else:
                        tag = None
                        room = self._books.room_locked(len(self._cache))
                        if not acks_due:
                            if room == 0:
                                if left <= 0:
                                    return None
                                # Waits in slices so that close() is noticed quickly.
                                self._books.wait_locked(min(left, WAIT_SLICE))
                                continue
                            if room < self._batch and left > 0:
                                if not linger_until:
                                    linger_until = now + LINGER
                                wait = min(linger_until, deadline) - now
                                if wait > 0:
                                    # (close() empties the books: that is room enough)
                                    self._books.wait_for_room_locked(wait, want=self._batch)
                                    continue
                        if self._plan is None:
                            self._plan = self._make_plan()
                        plan = self._plan
                        nqueues = len(self._queues)
                if tag is not None:
                    return make_delivery(tag.name.split(SEP, 1)[0], tag, raw, decode,
                                         redelivered=again,
                                         limit=self.transport.options.max_message_size)
                linger_until = 0.0
                try:
                    if time.monotonic() - self._last_beat >= beat_every:
                        self.heartbeat()  # get() running proves we live, too
                    if self._resync_needed:
                        with self._wire:
                            self._resync()
                    if acks_due and (self._cache or room == 0 or not plan.names):
                        self._exchange(plan, 0, 0)  # only the acks
                        continue
                    if not plan.names:
                        if left <= 0:
                            return None
                        with self._lock:
                            self._books.wait_locked(min(left, WAIT_SLICE))
                        continue
                    wait_k = 0
                    if left > 0:
                        # Block on the base list of each queue in turn: the common case
                        # (one queue, no priority) always waits on the right list.
                        wait_k = self._rotation % nqueues + 1
                        self._rotation += 1
                    if self._exchange(plan, room, wait_k):
                        continue
                    if left <= 0:
                        return None
                    self._blmove(plan.names[wait_k - 1], min(left, WAIT_SLICE))
                except UNREACHABLE as exc:
                    # The reply may have been lost after Redis ran the command: messages
                    # may sit in our in-flight lists unknown to us. Reconcile next time.
                    self._resync_needed = True
                    raise self.transport.unreachable(exc, "reserving messages") from exc

    def _take_settled(self) -> tuple[list[tuple[str, bytes]], list[str]]:
        """The queued acks and worker-lost record deletes, for one round trip."""
        with self._lock:
            acks, self._acks = self._acks, []
            return acks, self._lost.take_clears_locked()

    def _put_back_acks(self, acks: list[tuple[str, bytes]],
                       clears: list[str] | None = None) -> None:
        """A flush failed: keep its acks queued (first, and due at once)."""
        if acks or clears:
            with self._lock:
                self._acks[:0] = acks
                self._lost.clears[:0] = clears or []
                self._acks_since = time.monotonic() - ACK_DELAY

    def _exchange(self, plan: _Plan, room: int, wait_k: int) -> bool:
        """One round trip: flush the queued acks, then reserve up to ``room`` messages
        (none when 0). True if any were taken."""
        with self._wire:
            if self._lease.must_check_in():
                self._check_in()
            return self._exchange_now(plan, room, wait_k)

    def _exchange_now(self, plan: _Plan, room: int, wait_k: int) -> bool:
        acks, clears = self._take_settled()
        tail: list[bytes] = [bulk(room), bulk(wait_k)]
        others: list[list[bytes | str | int | float]] = [["DEL", *clears]] if clears else []
        for name, raw in acks:
            k = plan.index.get(name)
            if k is None:  # from a queue no longer consumed (cancel_queue): rare
                others.append(["LREM", self._inflight(name), -1, raw])
            else:
                tail += [bulk(k), bulk(raw)]
        t = self.transport
        script = t._lua_reserve
        count = 2 + plan.count + len(tail)
        rest = plan.packed + b"".join(tail)
        try:
            try:  # the others ride in the same write
                evalsha = b"*%d\r\n" % count + bulk("EVALSHA") + bulk(cast("str", script.sha))
                res = (self._link.many_then(others, evalsha + rest) if others else
                       self._link.send_flat(evalsha + rest))
            except redis.exceptions.NoScriptError:  # did not run: run it once, with EVAL
                res = self._link.send(b"*%d\r\n" % count + bulk("EVAL") +
                                      bulk(cast("str", script.script)) + rest)
        except BaseException:
            self._put_back_acks(acks, clears)
            raise
        if res:
            names = plan.names
            got = [(names[abs(int(res[i])) - 1], bytes(res[i + 1]))
                   for i in range(0, len(res), 2)]
            flagged = [item for i, item in enumerate(got) if int(res[2 * i]) < 0]
            if flagged:
                with self._lock:
                    self._lost.flagged.update(flagged)
            self._taken(got)
        return bool(res)

    def _blmove(self, name: str, wait: float) -> None:
        # BLMOVE's timeout is in seconds (a double since Redis 6); 0 would mean forever.
        wait = max(0.01, round(wait, 3))
        inflight = self._inflight(name)
        with self._wire:
            if self._lease.must_check_in():
                self._check_in()
            # the lost-record check rides behind the BLMOVE: one round trip (head_lost.lua)
            raw, flagged = self._link.many([
                ["BLMOVE", self.transport.key(name), inflight, "RIGHT", "LEFT", wait],
                ["EVAL", HEAD_LOST, 1, inflight, self.transport.key("qops.lost.")]])
            if raw is not None:
                got = (name, bytes(raw))
                if flagged:  # a worker started it before
                    with self._lock:
                        self._lost.flagged.add(got)
                self._taken([got])

    def _taken(self, got: list[tuple[str, bytes]]) -> None:
        """Messages are now in our in-flight lists: cache them (they count against the
        prefetch from now on)."""
        with self._lock:
            closed = self._closed
            if not closed:
                self._cache.extend(got)
        if closed:
            # close() ran while the command was on its way: the messages landed in
            # flight after the consumer gave everything back, so give them back too.
            recovery.restore(self.transport, self.id, only_if_dead=False)

    def _resync(self) -> None:
        """Requeue whatever sits in our in-flight lists that we do not know about (taken by
        a command whose reply was lost). Settled-while-we-look ones are harmless: the
        requeue script pushes only what it actually removed from flight."""
        t = self.transport
        listed = cast("list[bytes]", self._link.call("SMEMBERS",
                                                     t.key(f"qops.sources.{self.id}")))
        with self._lock:
            used = set(self._used)
        names = sorted(used | {n.decode("utf-8", "replace") for n in listed})
        held = self._link.many([["LRANGE", self._inflight(name), 0, -1] for name in names])
        with self._lock:
            # Queued acks are still in flight on the server: known, not orphans.
            known = (Counter(self._cache) + Counter(self._books.held.values()) +
                     Counter(self._acks))
        for name, items in zip(names, held, strict=True):
            for raw in items:
                if known[(name, raw)] > 0:
                    known[(name, raw)] -= 1
                    continue
                self._link.script(t._lua_requeue, [self._inflight(name), t.key(name)], [raw])
        self._resync_needed = False

    # -- settling -------------------------------------------------------------------------
    # Settling: the books return None for a delivery settled already (or forgotten by
    # close()): nothing to do then. requeue and reject settle only once Redis has done
    # it, so that a failed call can be retried.
    def ack(self, delivery: Delivery) -> None:
        """Queue the ack: get() sends it with its next reserve (see the class doc)."""
        seq = tag_of(delivery).seq
        with self._lock:
            entry = self._books.settle_locked(seq)
            if entry is None:
                return
            if not self._acks:
                self._acks_since = time.monotonic()
            self._acks.append(entry)
            self._lost.settled_locked(seq, done=True)  # and so is its worker-lost record
            woke = self._books.woke_locked()
        if threading.get_ident() == self._get_thread:
            self._flush_now()
        elif woke and self.pool_threads:
            time.sleep(0)  # get() waits for this room to reserve: let it run (class doc)

    def _flush_now(self) -> None:
        """Send the queued acks at once, from the consumer thread between two get()s.

        An ack made there is an early ack (acks_late=False: the worker acks before the
        task runs, for at most once), and the task starts right after it: waiting for the
        next reserve would leave a window in which a crash runs it again. Late acks come
        from pool threads and stay queued. If Redis fails now, the ack stays queued for
        the next reserve: raising would stop the caller from running a task whose ack is
        already booked."""
        if not self._get_lock.acquire(blocking=False):
            return  # close() is running: it flushes
        try:
            with self._lock:
                if self._closed or not self._acks:
                    return
                if self._plan is None:
                    self._plan = self._make_plan()
                plan = self._plan
            self._exchange(plan, 0, 0)
        except UNREACHABLE as exc:
            log.warning("could not send an ack to Redis now (%s); it goes with the next "
                        "reserve", one_line(exc))
        finally:
            self._get_lock.release()

    def _held(self, delivery: Delivery) -> tuple[Tag, str, bytes] | None:
        """The delivery's tag, in-flight list and raw message while it is held."""
        tag = tag_of(delivery)
        entry = self._books.peek(tag.seq)
        return None if entry is None else (tag, *entry)

    def requeue(self, delivery: Delivery) -> None:
        held = self._held(delivery)
        if held is None:
            return
        tag, name, raw = held
        t = self.transport
        with self._wire, t.guard("requeueing a message"):
            if not self._current(tag):
                return  # taken back: the broker has it again
            t._lua_requeue(keys=[self._inflight(name), t.key(name)], args=[raw])
        self._books.settle(tag.seq)
        with self._lock:
            self._lost.settled_locked(tag.seq, done=False)  # goes on with the message

    def reject(self, delivery: Delivery, reason: str) -> None:
        """Dead-letter and settle in one atomic step (the base class's two steps could
        leave a dead letter whose message also runs again after a crash)."""
        held = self._held(delivery)
        if held is None:
            return
        tag, name, raw = held
        t = self.transport
        dl_id, record, now = deadletters.dlq_record(delivery.queue, raw, reason)
        with self._wire, t.guard("dead-lettering a message"):
            if not self._current(tag):
                return  # taken back: it runs elsewhere, it is no dead letter of ours
            t._lua_reject(keys=[self._inflight(name), t.key("qops.dlq"), t.key("qops.dlq.index")],
                          args=[raw, dl_id, record, now])
        self._books.settle(tag.seq)
        with self._lock:
            self._lost.settled_locked(tag.seq, done=True)

    def _current(self, tag: Tag) -> bool:
        """With ``_wire`` held: whether ``tag`` is still this consumer's to settle
        (checks in first when the lease is overdue)."""
        if self._lease.must_check_in():
            self._check_in()
        return tag.epoch == self._lease.epoch

    def stale(self, delivery: Delivery) -> bool:
        """True when the delivery was taken back (see qops/transports/lease.py)."""
        epoch = tag_of(delivery).epoch
        lease = self._lease
        if epoch == lease.epoch and not lease.overdue():
            return False  # (is_stale's answer, without its calls: asked twice per task)
        return is_stale(lease, epoch, self._check_in_now, self._taken_back, self.id)

    # -- worker-lost accounting (qops/worker/lost.py) -------------------------------------
    def mark_started(self, delivery: Delivery) -> None:
        lost.mark_started(self, delivery)

    def worker_lost(self, delivery: Delivery, died: bool = False) -> tuple[int, bool]:
        held = self._held(delivery)
        if held is None:
            return 0, False
        return self._lost.counted(held[0].seq, held[2], died, self._lock)

    def _flush_acks(self, pipe: Any) -> list[tuple[str, bytes]]:
        """Add the queued acks to ``pipe`` (a pipeline of the transport's client); the
        caller puts them back if it fails."""
        acks, clears = self._take_settled()
        for name, raw in acks:
            # (redis-py sends bytes as they are; its annotation only says str)
            pipe.lrem(self._inflight(name), -1, cast("str", raw))
        if clears:  # (not put back if the flush fails: they expire)
            pipe.delete(*clears)
        return acks

    # -- liveness and queues ---------------------------------------------------------------
    def heartbeat(self) -> None:
        """Check in (``_check_in``: the alive key and the registration) and flush the
        queued acks, in the same round trip unless the lease is overdue."""
        with self._lock:
            if self._closed:
                return
        t = self.transport
        with self._wire, t.guard("sending the consumer heartbeat"):
            if not self._lease.must_check_in():
                self._check_in(with_acks=True)
                return
            self._check_in()
            pipe = t._client.pipeline(transaction=True)
            acks = self._flush_acks(pipe)
            if acks:
                try:
                    pipe.execute()
                except BaseException:
                    self._put_back_acks(acks)
                    raise

    def _check_in_now(self) -> None:
        with self._wire, self.transport.guard("checking in with Redis"):
            self._check_in()

    def _check_in(self, with_acks: bool = False) -> None:
        """Register again, with ``_wire`` held. If a recover() took this consumer for
        dead since the last check-in (its hash is gone), or it assumed so itself (the
        lease's ``giveback_due``), give back what it holds in flight now, register
        again, and forget every delivery: a new epoch (see qops/transports/lease.py).

        ``with_acks``: the queued acks go in the same round trip, first. Only when the
        lease is not overdue: then no recover() ran since the last check-in, and no
        ack can remove a requeued copy this consumer reserved again."""
        with self._lock:
            queues = list(self._queues)
            used = sorted(self._used)
        t = self.transport
        sent = clock()
        pipe = t._client.pipeline(transaction=True)
        acks = self._flush_acks(pipe) if with_acks else []
        self._registration.queue(pipe, queues, used)
        try:
            added = pipe.execute()[len(acks) + 2]
        except BaseException:
            self._put_back_acks(acks)
            raise
        if (added and self._registered) or self._lease.giveback_due:
            pipe = t._client.pipeline(transaction=True)
            recovery.restore(t, self.id, only_if_dead=False, client=pipe)
            self._registration.queue(pipe, queues, used)
            moved = int(pipe.execute()[0])
            self._taken_back()
            warn_taken_back(self.id, self._lease, moved)
            self._lease.giveback_due = False
        self._registered = True
        self._lease.renewed(sent)
        self._last_beat = time.monotonic()

    def _taken_back(self) -> None:
        """Every delivery so far is stale: forget them (and their queued acks)."""
        with self._lock:
            self._lease.epoch += 1
            self._books.clear_locked()
            self._cache.clear()
            self._acks.clear()

    def add_queue(self, queue: str) -> None:
        with self._lock:
            if queue in self._queues:
                return
            self._queues.append(queue)
            self._used.update(self._candidates())
            self._plan = None
        self.transport.bind([queue])
        self.heartbeat()  # records the new queue and its lists
        with self._lock:
            self._books.cond.notify_all()

    def cancel_queue(self, queue: str) -> None:
        with self._lock:
            if queue not in self._queues:
                return
            self._queues.remove(queue)
            self._plan = None
        # Its lists stay in _used: messages already taken from it are still in flight.
        self.heartbeat()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._cache.clear()
            self._lost.flagged.clear()
            self._books.clear_locked()  # wakes get()
        # get() notices _closed within one wait slice; past a generous bound, give back
        # anyway (_taken() restores again if a late command still lands something).
        got_lock = self._get_lock.acquire(timeout=max(5.0, self.transport.options.connect_timeout))
        try:
            t = self.transport
            pipe = t._client.pipeline(transaction=True)
            acks = self._flush_acks(pipe)
            with t.guard("giving back reserved messages"):
                if acks:  # acked messages must not go back with the rest
                    pipe.execute()
                recovery.restore(t, self.id, only_if_dead=False)
        finally:
            if got_lock:
                self._get_lock.release()
            self._link.close()
            self._lost.close(self._lock)
            self._pool.disconnect()
