"""``RedisReplyConsumer``: pops replies off one plain list (see the package doc on reply
queues); settling is local, as this consumer is the list's only reader."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from qops.errors import UsageError
from qops.transports.base import (
    REPLY_PREFETCH,
    REPLY_TTL,
    Consumer,
    Delivery,
    PrefetchGate,
    ReplyOnly,
)
from qops.transports.redis.delivery import Tag, make_delivery

if TYPE_CHECKING:
    from qops.transports.redis.transport import RedisTransport

# A reply consumer waits on its one list, where BRPOP wakes at once on a push: the slice
# only bounds how long close() from another thread takes to be noticed.
REPLY_WAIT_SLICE = 1.0


class RedisReplyConsumer(ReplyOnly, Consumer):
    """Pops replies off one list (see the package doc), up to the prefetch at a time.
    ``get`` blocks with BRPOP on a connection of its own, in slices so that ``close()``
    from another thread is noticed. Settling does not touch Redis: the reply was taken
    off the list already, and this consumer is its only reader."""

    transport: RedisTransport

    def __init__(self, transport: RedisTransport, name: str, cid: str,
                 binding: tuple[str, str] | None = None) -> None:
        self.transport = transport
        self.id = cid
        self.name = name
        self._key = transport.key(name)
        self._binding = binding  # (set key, member) of a kombu reply binding, if any
        if binding is not None:
            with transport.guard(f"binding the reply queue {name!r}"):
                transport._client.sadd(binding[0], binding[1])
        self._gate = PrefetchGate(REPLY_PREFETCH)
        self._lock = threading.Lock()
        self._get_lock = threading.Lock()
        self._closed = False
        self._cache: deque[bytes] = deque()  # popped, not handed out yet
        self._unsettled: dict[int, bytes] = {}
        self._seq = 0
        self._last_beat = 0.0
        # No retries: a retried pop whose first reply was lost would lose that reply.
        self._pool = transport._make_pool(
            Retry(NoBackoff(), 0),
            socket_timeout=max(1.0, transport.options.connect_timeout) + REPLY_WAIT_SLICE)
        self._conn = redis.Redis(connection_pool=self._pool)

    @property
    def queues(self) -> list[str]:
        return [self.name]

    def get(self, timeout: float) -> Delivery | None:
        deadline = time.monotonic() + max(0.0, timeout)
        with self._get_lock:
            while True:
                with self._lock:
                    if self._closed:
                        return None
                    if self._cache:
                        raw = self._cache.popleft()
                        self._seq += 1
                        self._unsettled[self._seq] = raw
                        return make_delivery(self.name, raw, Tag(self._seq, self.name))
                left = deadline - time.monotonic()
                room = self._gate.room()
                if room == 0:
                    if left <= 0:
                        return None
                    self._gate.wait_for_room(min(left, REPLY_WAIT_SLICE))
                    continue
                with self.transport.guard("reading replies"):
                    if time.monotonic() - self._last_beat >= \
                            self.transport.options.heartbeat_interval:
                        self.heartbeat()
                    got = cast("list[bytes] | None", self._conn.rpop(self._key, room))
                    if not got and left > 0:
                        # BRPOP's timeout is in seconds (a double since Redis 6); 0 = forever
                        wait = max(0.01, round(min(left, REPLY_WAIT_SLICE), 3))
                        popped = cast("tuple[bytes, bytes] | None",
                                      self._conn.brpop([self._key], wait))
                        got = [popped[1]] if popped else None
                if got:
                    self._taken([bytes(r) for r in got])
                elif left <= 0:
                    return None

    def _taken(self, got: list[bytes]) -> None:
        with self._lock:
            if self._closed:
                return  # the queue is gone: so are its replies
            self._gate.take(len(got))
            self._cache.extend(got)

    def _unsettle(self, delivery: Delivery) -> bytes | None:
        tag = delivery.tag
        if not isinstance(tag, Tag):
            raise UsageError(f"delivery {tag!r} was not reserved by a Redis consumer")
        with self._lock:
            return self._unsettled.pop(tag.seq, None)

    def ack(self, delivery: Delivery) -> None:
        if self._unsettle(delivery) is not None:
            self._gate.release()

    def requeue(self, delivery: Delivery) -> None:
        """Back at the head of the queue: this consumer is its only reader and holds
        what it popped ahead of it, so the head is the front of its own cache (still
        counted against the prefetch, as the cache is)."""
        raw = self._unsettle(delivery)
        if raw is None:
            return
        with self._lock:
            if not self._closed:
                self._cache.appendleft(raw)
                return
        self._gate.release()

    def heartbeat(self) -> None:
        """Keep unread replies from expiring while their reader lives (a list that is
        empty does not exist, and needs nothing)."""
        if self._closed:
            return
        with self.transport.guard("refreshing the reply queue"):
            self.transport._client.expire(self._key, REPLY_TTL)
        self._last_beat = time.monotonic()

    def close(self) -> None:
        """Delete the reply queue with whatever it still holds."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._cache.clear()
            self._unsettled.clear()
        # A get() in another thread notices _closed within one wait slice; disconnecting
        # its connection under it would make it fail instead.
        got_lock = self._get_lock.acquire(timeout=REPLY_WAIT_SLICE + 1.0)
        try:
            pipe = self.transport._client.pipeline(transaction=True)
            pipe.delete(self._key)
            if self._binding is not None:
                pipe.srem(self._binding[0], self._binding[1])
            with self.transport.guard("deleting the reply queue"):
                pipe.execute()
        finally:
            if got_lock:
                self._get_lock.release()
            self._pool.disconnect()
