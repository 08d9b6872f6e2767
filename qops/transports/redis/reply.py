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

from qops.transports.base import (
    REPLY_PREFETCH,
    REPLY_TTL,
    Consumer,
    Delivery,
    ReplyOnly,
    make_delivery,
)
from qops.transports.prefetch import Prefetch
from qops.transports.redis.delivery import Tag, decode, tag_of

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
        # Handed out and not yet settled: seq -> raw. Its lock guards the cache too.
        self._books: Prefetch[bytes] = Prefetch(REPLY_PREFETCH)
        self._lock = self._books.cond
        self._get_lock = threading.Lock()
        self._closed = False
        # Popped, not handed out yet. get() hands these out before it pops more, so it
        # asks the books for room only when this is empty: nothing pending then.
        self._cache: deque[bytes] = deque()
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
                left = deadline - time.monotonic()
                with self._lock:
                    if self._closed:
                        return None
                    if self._cache:
                        raw = self._cache.popleft()
                        tag = Tag(self._books.take_locked(raw), self.name)
                    else:
                        tag = None
                        room = self._books.room_locked()
                        if room == 0:
                            if left <= 0:
                                return None
                            # Woken by a settlement (a requeue puts its reply in the
                            # cache: handed out next time round) and by close().
                            self._books.wait_locked(min(left, REPLY_WAIT_SLICE))
                            continue
                if tag is not None:  # decoded outside the lock
                    return make_delivery(self.name, tag, raw, decode)
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
            self._cache.extend(got)

    def ack(self, delivery: Delivery) -> None:
        self._books.settle(tag_of(delivery).seq)

    def requeue(self, delivery: Delivery) -> None:
        """Back at the head of the queue: this consumer is its only reader and holds
        what it popped ahead of it, so the head is the front of its own cache."""
        seq = tag_of(delivery).seq
        with self._lock:
            raw = self._books.settle_locked(seq)
            if raw is not None:  # (None after close(), too: the books are empty then)
                self._cache.appendleft(raw)

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
            self._books.clear_locked()  # wakes get()
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
