"""In-process transport for unit tests (``memory://name``): same contract, no broker.

Every transport opened on the same URL in one process shares one broker state.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from qops.errors import UsageError
from qops.protocol import Message, decode_envelope, encode_envelope
from qops.transports.base import (
    REPLY_ONLY,
    REPLY_PREFETCH,
    Consumer,
    DeadLetter,
    Delivery,
    QueueStats,
    Subscription,
    Transport,
    TransportOptions,
    make_delivery,
    topic_matches,
)
from qops.transports.prefetch import Prefetch


@dataclass
class _State:
    lock: threading.Condition = field(default_factory=threading.Condition)
    queues: dict[str, deque[bytes]] = field(default_factory=dict)
    # consumer id -> its books: tag -> (queue, raw) of each message it holds
    in_flight: dict[str, Prefetch[tuple[str, bytes]]] = field(default_factory=dict)
    consumers: dict[str, list[str]] = field(default_factory=dict)
    subscribers: dict[str, list[_MemorySubscription]] = field(default_factory=dict)
    dead: dict[str, DeadLetter] = field(default_factory=dict)
    # (registry, name) -> alive until
    nodes: dict[tuple[str, str], float] = field(default_factory=dict)
    # reply queues (also in ``queues`` while their consumer is open)
    replies: set[str] = field(default_factory=set)
    locks: dict[str, tuple[str, float]] = field(default_factory=dict)  # name -> (owner, until)
    # worker-lost accounting: payload -> [started (0/1), worker losses]
    lost: dict[bytes, list[int]] = field(default_factory=dict)


_STATES: dict[str, _State] = {}
_STATES_LOCK = threading.Lock()


class MemoryTransport(Transport):
    scheme = "memory"

    def __init__(self, url: str, options: TransportOptions | None = None) -> None:
        super().__init__(url, options)
        with _STATES_LOCK:
            self.state = _STATES.setdefault(url, _State())

    def publish(self, queue: str, message: Message) -> None:
        raw = encode_envelope(queue, message)
        self.check_size(f"queue {queue!r}", raw)
        st = self.state
        with st.lock:
            q = st.queues.setdefault(queue, deque())
            # qops scale: 9 runs first; keep the deque ordered by priority, FIFO within one
            q.append(raw)
            if message.priority:
                items = sorted(q, key=lambda r: -_priority(r))
                q.clear()
                q.extend(items)
            st.lock.notify_all()

    def consumer(self, queues: Sequence[str], prefetch: int,
                 consumer_id: str | None = None) -> Consumer:
        return _MemoryConsumer(self, list(queues), prefetch, consumer_id or uuid.uuid4().hex)

    def reply_consumer(self, name: str, *, exchange: str | None = None,
                       routing_key: str | None = None) -> Consumer:
        with self.state.lock:
            self.state.queues.setdefault(name, deque())
            self.state.replies.add(name)
        return _MemoryConsumer(self, [name], REPLY_PREFETCH, uuid.uuid4().hex, reply=name)

    def send_reply(self, name: str, message: Message) -> None:
        raw = encode_envelope(name, message)
        self.check_size(f"reply queue {name!r}", raw)
        st = self.state
        with st.lock:
            if name not in st.replies:
                return  # its consumer is gone: nobody would read it
            st.queues[name].append(raw)
            st.lock.notify_all()

    def purge(self, queue: str) -> int:
        with self.state.lock:
            q = self.state.queues.get(queue)
            n = len(q) if q else 0
            if q:
                q.clear()
            return n

    def queue_stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        st = self.state
        with st.lock:
            names = list(queues) if queues is not None else sorted(
                set(st.queues) - st.replies)
            out = []
            for name in names:
                flight = sum(1 for books in st.in_flight.values()
                             for (qn, _) in books.held.values() if qn == name)
                cons = sum(1 for qs in st.consumers.values() if name in qs)
                out.append(QueueStats(name, len(st.queues.get(name, ())), flight, cons))
            return out

    def queue_exists(self, queue: str) -> bool:
        with self.state.lock:
            return queue in self.state.queues

    def broadcast(self, channel: str, message: Message, *,
                  routing_key: str | None = None) -> None:
        with self.state.lock:
            for sub in list(self.state.subscribers.get(channel, ())):
                if topic_matches(sub.pattern, routing_key):
                    sub.items.append(message)
            self.state.lock.notify_all()

    def subscribe(self, channel: str, *, pattern: str | None = None,
                  lag: float = 0.0) -> Subscription:
        sub = _MemorySubscription(self, channel, pattern)
        with self.state.lock:
            self.state.subscribers.setdefault(channel, []).append(sub)
        return sub

    def register_node(self, name: str, info: dict[str, Any], ttl: float) -> None:
        with self.state.lock:
            self.state.nodes[(self.options.registry, name)] = time.time() + ttl

    def unregister_node(self, name: str) -> None:
        with self.state.lock:
            self.state.nodes.pop((self.options.registry, name), None)

    def live_nodes(self) -> list[str]:
        now = time.time()
        with self.state.lock:
            return sorted(n for (r, n), until in self.state.nodes.items()
                          if r == self.options.registry and until >= now)

    def dead_letter(self, queue: str, raw: bytes, reason: str) -> None:
        dl = DeadLetter(uuid.uuid4().hex, queue, reason, raw, time.time())
        with self.state.lock:
            self.state.dead[dl.id] = dl

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        with self.state.lock:
            return list(self.state.dead.values())[:limit]

    def dead_letter_count(self) -> int:
        with self.state.lock:
            return len(self.state.dead)

    def requeue_dead_letters(self, ids: Sequence[str] | None = None) -> int:
        st = self.state
        with st.lock:
            chosen = list(st.dead) if ids is None else [i for i in ids if i in st.dead]
            for i in chosen:
                dl = st.dead.pop(i)
                st.queues.setdefault(dl.queue, deque()).append(dl.raw)
            st.lock.notify_all()
            return len(chosen)

    def purge_dead_letters(self) -> int:
        with self.state.lock:
            n = len(self.state.dead)
            self.state.dead.clear()
            return n

    def acquire_lock(self, name: str, owner: str, ttl: float) -> bool:
        now = time.monotonic()
        with self.state.lock:
            held = self.state.locks.get(name)
            if held is not None and held[0] != owner and held[1] > now:
                return False
            self.state.locks[name] = (owner, now + ttl)
            return True

    def release_lock(self, name: str, owner: str) -> None:
        with self.state.lock:
            held = self.state.locks.get(name)
            if held is not None and held[0] == owner:
                del self.state.locks[name]

    def close(self) -> None:
        pass


class _MemoryConsumer(Consumer):
    transport: MemoryTransport

    def __init__(self, transport: MemoryTransport, queues: list[str], prefetch: int,
                 cid: str, reply: str | None = None) -> None:
        self.transport = transport
        self.id = cid
        st = transport.state
        # kept under the state's lock, which get() waits on for messages too
        self._books: Prefetch[tuple[str, bytes]] = Prefetch(prefetch, st.lock)
        self.prefetch = self._books.limit
        self.reply = reply  # the reply queue this consumer owns, if it is a reply consumer
        self._closed = False
        with st.lock:
            st.consumers[cid] = list(queues)
            st.in_flight[cid] = self._books

    @property
    def queues(self) -> list[str]:
        with self.transport.state.lock:
            return list(self.transport.state.consumers.get(self.id, []))

    def get(self, timeout: float) -> Delivery | None:
        got = self._reserve(time.monotonic() + timeout)
        if got is None:
            return None
        queue, tag, raw = got
        return make_delivery(queue, tag, raw, decode_envelope,  # outside the lock
                             limit=self.transport.options.max_message_size)

    def _reserve(self, deadline: float) -> tuple[str, int, bytes] | None:
        """Wait for room and a message until ``deadline``; hold it."""
        st = self.transport.state
        with st.lock:
            while not self._closed:
                got = self._take_locked() if self._books.room_locked() else None
                if got is not None:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._books.wait_locked(left)
            return None

    def _take_locked(self) -> tuple[str, int, bytes] | None:
        """The next message of our queues, held now (with the state's lock held)."""
        st = self.transport.state
        for q in st.consumers.get(self.id, []):
            dq = st.queues.get(q)
            if dq:
                raw = dq.popleft()
                return q, self._books.take_locked((q, raw)), raw
        return None

    def exempt(self, delivery: Delivery) -> None:
        self._books.exempt(delivery.tag)

    def _settle(self, delivery: Delivery, requeue: bool) -> None:
        st = self.transport.state
        with st.lock:
            item = self._books.settle_locked(delivery.tag)
            if item is not None and requeue:
                st.queues.setdefault(item[0], deque()).appendleft(item[1])
                st.lock.notify_all()  # for every consumer of that queue

    def ack(self, delivery: Delivery) -> None:
        self._settle(delivery, requeue=False)
        with self.transport.state.lock:
            self.transport.state.lost.pop(delivery.raw, None)

    def mark_started(self, delivery: Delivery) -> None:
        with self.transport.state.lock:
            self.transport.state.lost.setdefault(delivery.raw, [0, 0])[0] = 1

    def worker_lost(self, delivery: Delivery, died: bool = False) -> tuple[int, bool]:
        with self.transport.state.lock:
            record = self.transport.state.lost.setdefault(delivery.raw, [0, 0])
            new = bool(record[0]) or died
            record[0], record[1] = 0, record[1] + new
            return record[1], new

    def requeue(self, delivery: Delivery) -> None:
        self._settle(delivery, requeue=True)

    def heartbeat(self) -> None:
        pass

    def add_queue(self, queue: str) -> None:
        if self.reply is not None:
            raise UsageError(REPLY_ONLY)
        with self.transport.state.lock:
            qs = self.transport.state.consumers.setdefault(self.id, [])
            if queue not in qs:
                qs.append(queue)
            self.transport.state.queues.setdefault(queue, deque())
            self.transport.state.lock.notify_all()

    def cancel_queue(self, queue: str) -> None:
        if self.reply is not None:
            raise UsageError(REPLY_ONLY)
        with self.transport.state.lock:
            qs = self.transport.state.consumers.get(self.id, [])
            if queue in qs:
                qs.remove(queue)

    def close(self) -> None:
        st = self.transport.state
        with st.lock:
            self._closed = True
            st.in_flight.pop(self.id, None)
            held = self._books.clear_locked()
            st.consumers.pop(self.id, None)
            if self.reply is not None:
                # the reply queue ends with its consumer, unread replies with it
                st.replies.discard(self.reply)
                st.queues.pop(self.reply, None)
            else:
                for q, raw in reversed(list(held.values())):
                    st.queues.setdefault(q, deque()).appendleft(raw)
            st.lock.notify_all()


def _priority(raw: bytes) -> int:
    """The priority of a queued message; 0 for one that can't be decoded (it is
    dead-lettered when reserved: it must not stop publishes to its queue now)."""
    try:
        return decode_envelope(raw).priority
    except Exception:
        return 0


class _MemorySubscription(Subscription):
    transport: MemoryTransport

    def __init__(self, transport: MemoryTransport, channel: str,
                 pattern: str | None = None) -> None:
        self.transport = transport
        self.channel = channel
        self.pattern = pattern
        self.items: deque[Message] = deque()

    def get(self, timeout: float) -> Message | None:
        st = self.transport.state
        deadline = time.monotonic() + timeout
        with st.lock:
            while not self.items:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                st.lock.wait(left)
            return self.items.popleft()

    def close(self) -> None:
        with self.transport.state.lock:
            subs = self.transport.state.subscribers.get(self.channel, [])
            if self in subs:
                subs.remove(self)
