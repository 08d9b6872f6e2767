"""Worker-lost accounting on Redis: one small hash per message that a worker may have
been running when its node died (``qops.lost.<sha1 of the payload>``, docs/protocol.md
section 2).

A message runs **unwatched** until a node dies holding it: a solo or threads node
writes nothing when such a task starts. Such a consumer registers as ``unseen``
(registration.py: once, before its first task starts); when it is found dead,
``lua/restore.lua`` gives each message it held and that has no record one with
``running`` = '?' (it may have been running: nobody saw). From then on the message
runs **watched**: the reserve scripts tell which messages have a record (handed out as
redelivered), and ``mark_started`` writes ``running`` = the consumer id before such a
task runs (one round trip, ``lua/start.lua``, which also deletes the records of the
tasks that ended since and applies their acks when it may). ``lua/worker_lost.lua``
turns a ``running`` that was never settled (or a death the worker saw) into ``count`` +
1; the consumer deletes the hash when it acks or dead-letters the message (the delete
rides with the next start or reserve). A message's payload does not change when it is
given back or recovered, so every node finds the same hash. Each write sets an expiry
of ``LOST_TTL``: the record of a message that is gone (purged, or its hash left behind
by a crash) does not stay; and sets ``qops.lost`` with the same expiry, so that while
no record can exist the reserve script skips the lookup (a SHA-1 of each payload).
Why this order: docs/guarantees.md."""

from __future__ import annotations

import hashlib
import threading
from typing import TYPE_CHECKING, Any

import redis

from qops.transports.redis.link import UNREACHABLE, Link, bulk, load_script

if TYPE_CHECKING:
    from qops.transports.base import Delivery
    from qops.transports.redis.consumer import RedisConsumer
    from qops.transports.redis.transport import RedisTransport

#: seconds a worker-lost record is kept after its last change
LOST_TTL = 7 * 86400
START = load_script("start.lua")
#: what a start write settles first: (records to delete, acks as (in-flight list, payload))
Settled = tuple[list[str], list[tuple[str, bytes]]]


def lost_key(t: RedisTransport, raw: bytes) -> str:
    return t.key("qops.lost." + hashlib.sha1(raw).hexdigest())


def mark_started(c: RedisConsumer, delivery: Delivery) -> None:
    """``c.mark_started``: before ``c``'s first task, register it as ``unseen`` (one
    round trip, once). A delivery taken without a record then runs unwatched: nothing
    to write. One taken with a record (watched) gets its start written, settling in the
    same round trip what ended since the last one: the records of finished tasks are
    deleted, and their queued acks go too when ``c``'s wire is free right now and its
    lease needs no check-in (the reserve's rule; else they wait for the next reserve,
    as any queued ack). So a watched task that kills the process does not take the
    watched tasks that ended before it along: they are not counted again, nor, when
    acked here, run again."""
    if not c._registration.unseen:
        c._registration.mark_unseen()
    if not delivery.redelivered:
        return
    held = c._held(delivery)
    if held is None:
        return
    tag, _, raw = held
    wire = c._wire.acquire(blocking=False)
    try:
        if wire and c._lease.must_check_in():
            c._wire.release()  # acks after a check-in only: the next reserve's
            wire = False
        with c._lock:
            acks = c._acks if wire else []
            if wire:
                c._acks = []
            clears = c._lost.take_clears_locked()
        inflight = c._inflight
        try:
            c._lost.started(c.id, tag.seq, raw,
                            (clears, [(inflight(n), r) for n, r in acks]), c._lock)
        except BaseException:
            c._put_back_acks(acks, clears)
            raise
    finally:
        if wire:
            c._wire.release()


def count(t: RedisTransport, raw: bytes, died: bool) -> tuple[int, bool]:
    with t.guard("counting a lost worker"):
        n, new = t._lua_worker_lost(keys=[lost_key(t, raw)],
                                    args=["1" if died else "0", LOST_TTL])
    return int(n), bool(new)


class LostRecords:
    """A consumer's side of the records: which of its deliveries have one (deleted with
    their ack or dead letter), the deletes waiting for the next round trip, and the
    messages taken with a record (handed out as redelivered, so that the worker asks for
    their count). ``*_locked`` methods run under the consumer's lock; the others take
    it (``lock``) around their bookkeeping only, never around a round trip."""

    __slots__ = ("t", "keys", "clears", "flagged", "prefix", "_pool", "_local", "_links",
                 "_evalsha", "_static", "_static_none")

    def __init__(self, t: RedisTransport, pool: Any, cid: str) -> None:
        self.t = t
        self.prefix = t.key("qops.lost.")
        # the start command's fixed parts, packed once
        self._evalsha = bulk("EVALSHA") + bulk(hashlib.sha1(START.encode()).hexdigest())
        self._static = bulk(cid) + bulk(LOST_TTL)
        self._static_none = self._static + bulk(0)  # nothing settled with it
        # Starts are written on a Link of the starting thread's own (a pool thread: one
        # for solo, several for threads), made from the consumer's connection pool.
        self._pool = pool
        self._local = threading.local()
        self._links: list[Link] = []
        self.keys: dict[int, str] = {}  # seq -> record key, of deliveries handed out
        self.clears: list[str] = []  # record keys to delete with the next round trip
        self.flagged: set[tuple[str, bytes]] = set()  # (list, raw) taken with a record

    def again_locked(self, item: tuple[str, bytes]) -> bool:
        """Whether ``item``, handed out now, was taken with a record."""
        if self.flagged and item in self.flagged:
            self.flagged.discard(item)
            return True
        return False

    def settled_locked(self, seq: int, done: bool) -> None:
        """The delivery ``seq`` is settled: its record goes with the message (requeue),
        or is deleted with the next round trip (``done``: ack, dead letter)."""
        key = self.keys.pop(seq, None)
        if done and key is not None:
            self.clears.append(key)

    def take_clears_locked(self) -> list[str]:
        clears, self.clears = self.clears, []
        return clears

    def started(self, cid: str, seq: int, raw: bytes, settled: Settled, lock: Any) -> None:
        """Record the start (``running`` = ``cid``) before the task runs, in one command
        and one round trip (``lua/start.lua``) that first settles ``settled``: the
        records to delete and the acks (in-flight list, payload) taken for this write.
        It goes over the thread's own Link, packed here (not through redis-py's client
        and transaction pipeline: for a no-op task on the solo pool those were most of
        the per-task cost)."""
        key = self.prefix + hashlib.sha1(raw).hexdigest()
        link = getattr(self._local, "link", None)
        if link is None:
            link = self._local.link = Link(self._pool)
            with lock:
                self._links.append(link)
        clears, acks = settled
        nkeys = 1 + len(clears) + len(acks)
        k = key.encode()
        parts = [b"*%d\r\n" % (6 + nkeys + len(acks)), self._evalsha,
                 b"$%d\r\n%d\r\n$%d\r\n%s\r\n" % (len(str(nkeys)), nkeys, len(k), k)]
        if clears or acks:
            parts += [*map(bulk, clears), *(bulk(name) for name, _ in acks), self._static,
                      bulk(len(clears)), *(bulk(payload) for _, payload in acks)]
        else:
            parts.append(self._static_none)
        try:
            try:
                link.send_expecting(b"".join(parts), b":1\r\n")
            except redis.exceptions.NoScriptError:  # did not run: once with the script
                parts[1] = bulk("EVAL") + bulk(START)
                link.send(b"".join(parts))
        except UNREACHABLE as exc:
            raise self.t.unreachable(exc, "recording a task start") from exc
        with lock:
            self.keys[seq] = key

    def close(self, lock: Any) -> None:
        """Close the starting threads' Links (the consumer closes)."""
        with lock:
            links, self._links = self._links, []
        for link in links:
            link.close()

    def counted(self, seq: int, raw: bytes, died: bool, lock: Any) -> tuple[int, bool]:
        n, new = count(self.t, raw, died)
        if n:
            with lock:
                self.keys[seq] = lost_key(self.t, raw)
        return n, new
