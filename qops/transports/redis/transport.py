"""``RedisTransport`` and its consumers (the wire layout is in the package doc)."""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from qops.errors import BrokerUnreachable, PublishError, UsageError
from qops.protocol import Message, decode_envelope, encode_envelope
from qops.transports.base import (
    REPLY_PREFETCH,
    REPLY_TTL,
    Consumer,
    DeadLetter,
    Delivery,
    PrefetchGate,
    QueueStats,
    ReplyOnly,
    Subscription,
    Transport,
    TransportOptions,
    topic_matches,
)
from qops.transports.redis.link import UNREACHABLE, Link, bulk, load_script, one_line
from qops.transports.redis.names import (
    BINDING_PREFIX,
    NODES,
    NODES_INFO,
    SEP,
    STEPS,
    binding_member,
    glob_escape,
    list_name,
    qops_priority,
    raw_step,
    split_url,
    topic_glob,
    wire_step,
)

log = logging.getLogger(__name__)

NODE_SWEEP_EVERY = 60.0  # seconds between live_nodes() calls that forget expired nodes

# How long one BLMOVE waits on a single list before the consumer checks every list again.
# A message on the list being waited on wakes the consumer at once; one on another list
# (another queue, or a priority step) waits at most this long when the consumer is idle.
WAIT_SLICE = 0.1
# A reply consumer waits on its one list, where BRPOP wakes at once on a push: the slice
# only bounds how long close() from another thread takes to be noticed.
REPLY_WAIT_SLICE = 1.0
# When less than half of a consumer's prefetch is free and messages are in hand, get()
# waits up to this long for more acks before it reserves, so that one round trip takes
# (and acks) several messages instead of one each.
LINGER = 0.002
# A queued ack waits for the next reserve to carry it to Redis at most about this long
# while get() is being called (once the consumer is idle in BLMOVE: one WAIT_SLICE).
ACK_DELAY = 0.1


@dataclass(frozen=True)
class _Tag:
    """Delivery.tag: which hand-out of this consumer, and the list it was taken from."""

    seq: int
    name: str


class RedisTransport(Transport):
    scheme = "redis"

    def __init__(self, url: str, options: TransportOptions | None = None) -> None:
        super().__init__(url, options)
        self._redis_url, self.prefix = split_url(url)
        # Stale pooled connections (e.g. after a Redis restart) fail once and are retried
        # once at once; an unreachable server still fails fast (no backoff loop).
        self._pool = self._make_pool(Retry(NoBackoff(), 1),
                                     socket_timeout=max(30.0, self.options.connect_timeout))
        self._client = redis.Redis(connection_pool=self._pool)
        self.db = int(self._pool.connection_kwargs.get("db") or 0)
        self._lua_reserve = self._client.register_script(load_script("reserve.lua"))
        self._lua_requeue = self._client.register_script(load_script("requeue.lua"))
        self._lua_reject = self._client.register_script(load_script("reject.lua"))
        self._lua_restore = self._client.register_script(load_script("restore.lua"))
        self._lua_dlq_requeue = self._client.register_script(load_script("dlq_requeue.lua"))
        self._lua_register_node = self._client.register_script(
            load_script("register_node.lua"))
        self._lua_live_nodes = self._client.register_script(load_script("live_nodes.lua"))
        self._lua_lock_renew = self._client.register_script(load_script("lock_renew.lua"))
        self._lua_lock_release = self._client.register_script(
            load_script("lock_release.lua"))
        self._nodes_swept = 0.0  # when live_nodes() last forgot expired nodes
        # Queues whose kombu binding this transport has already written (kombu caches
        # declarations the same way): publishing then costs one LPUSH.
        self._bound: set[str] = set()

    def _make_pool(self, retry: Retry, socket_timeout: float) -> redis.ConnectionPool:
        try:
            return redis.ConnectionPool.from_url(
                self._redis_url, retry=retry, socket_timeout=socket_timeout,
                socket_connect_timeout=self.options.connect_timeout, client_name="qops")
        except ValueError as exc:
            raise UsageError(f"bad Redis URL {self.safe_url()}: {exc}; expected "
                             "redis://[:password@]host:6379/<db>, rediss://... (TLS) "
                             "or unix:///path/to/redis.sock?db=<db>") from None

    # -- key names --------------------------------------------------------------------
    def key(self, name: str) -> str:
        return self.prefix + name

    def queue_keys(self, queue: str) -> list[str]:
        return [self.key(list_name(queue, s)) for s in STEPS]

    def inflight_key(self, cid: str, name: str) -> str:
        return self.key(f"qops.unacked.{cid}/{name}")

    # -- errors -----------------------------------------------------------------------
    def unreachable(self, exc: BaseException, doing: str) -> BrokerUnreachable:
        if isinstance(exc, redis.AuthenticationError | redis.exceptions.NoPermissionError):
            hint = ("check the password (redis://:PASSWORD@host:6379/db) and the ACL "
                    "user's permissions")
        else:
            hint = ("check that redis-server is running and that the URL's host, port, "
                    "db and TLS scheme (rediss://) are right")
        return BrokerUnreachable(f"Redis broker {self.safe_url()} unreachable while {doing}: "
                                 f"{one_line(exc)}; {hint}")

    @contextmanager
    def guard(self, doing: str) -> Iterator[None]:
        try:
            yield
        except UNREACHABLE as exc:
            raise self.unreachable(exc, doing) from exc

    # -- queues -------------------------------------------------------------------------
    def encode(self, queue: str, message: Message) -> tuple[str, bytes]:
        """(list name, envelope) for ``message`` on ``queue``; the envelope's priority is
        the wire step (Celery's meaning), as kombu would have written it."""
        step = wire_step(message.properties.get("priority"))
        props = dict(message.properties)
        props["priority"] = step
        raw = encode_envelope(queue, replace(message, properties=props))
        return list_name(queue, step), raw

    def publish(self, queue: str, message: Message) -> None:
        name, raw = self.encode(queue, message)
        self.check_size(f"queue {queue!r}", raw)
        with self.guard(f"publishing to {queue!r}"):
            try:
                if queue in self._bound:
                    self._client.lpush(self.key(name), raw)
                else:
                    pipe = self._client.pipeline(transaction=False)
                    pipe.sadd(self.key(BINDING_PREFIX + queue), binding_member(queue))
                    pipe.lpush(self.key(name), raw)
                    pipe.execute()
                    self._bound.add(queue)
            except redis.RedisError as exc:
                if isinstance(exc, UNREACHABLE):
                    raise
                # e.g. OOM (maxmemory reached) or READONLY (a replica): not taken.
                raise PublishError(f"Redis {self.safe_url()} refused the message for "
                                   f"{queue!r}: {one_line(exc)}") from None

    def bind(self, queues: Sequence[str]) -> None:
        """Write the kombu bindings of ``queues`` (once per transport)."""
        todo = [q for q in queues if q not in self._bound]
        if not todo:
            return
        pipe = self._client.pipeline(transaction=False)
        for q in todo:
            pipe.sadd(self.key(BINDING_PREFIX + q), binding_member(q))
        with self.guard("declaring queues"):
            pipe.execute()
        self._bound.update(todo)

    def consumer(self, queues: Sequence[str], prefetch: int,
                 consumer_id: str | None = None) -> Consumer:
        return RedisConsumer(self, list(queues), prefetch, consumer_id or uuid.uuid4().hex)

    def reply_consumer(self, name: str, *, exchange: str | None = None,
                       routing_key: str | None = None) -> Consumer:
        binding = None
        if exchange and routing_key is not None:
            # kombu's binding of a pidbox reply queue: a Celery node replying through
            # ``exchange`` with ``routing_key`` looks it up and LPUSHes to our list.
            binding = (self.key(BINDING_PREFIX + exchange), f"{routing_key}{SEP}{SEP}{name}")
        return RedisReplyConsumer(self, name, uuid.uuid4().hex, binding)

    def send_reply(self, name: str, message: Message) -> None:
        # Always the base list: a reply queue has no priority steps.
        props = {k: v for k, v in message.properties.items() if k != "priority"}
        raw = encode_envelope(name, replace(message, properties=props))
        self.check_size(f"reply queue {name!r}", raw)
        # Pushed even when nobody listens (checking first would race with the consumer's
        # close); the EXPIRE makes sure such a list does not stay behind.
        pipe = self._client.pipeline(transaction=True)
        pipe.lpush(self.key(name), raw)
        pipe.expire(self.key(name), REPLY_TTL)
        with self.guard(f"sending a reply to {name!r}"):
            try:
                pipe.execute()
            except redis.RedisError as exc:
                if isinstance(exc, UNREACHABLE):
                    raise
                raise PublishError(f"Redis {self.safe_url()} refused the reply for "
                                   f"{name!r}: {one_line(exc)}") from None

    def purge(self, queue: str) -> int:
        keys = self.queue_keys(queue)
        # LLEN + DEL in one MULTI, as Celery does: nothing pushed in between is lost
        # uncounted. In-flight lists are other keys, so they are left alone.
        pipe = self._client.pipeline(transaction=True)
        for k in keys:
            pipe.llen(k)
        pipe.delete(*keys)
        with self.guard(f"purging {queue!r}"):
            res = pipe.execute()
        return int(sum(res[: len(keys)]))

    def _consumer_ids(self) -> list[str]:
        members = cast("set[bytes]", self._client.smembers(self.key("qops.consumers")))
        return sorted(m.decode() for m in members)

    def _consumers_view(self) -> tuple[dict[str, list[str]], dict[str, int]]:
        """(live consumer id -> its queues, queue -> messages in flight on any consumer).

        In flight counts every registered consumer, dead-but-not-yet-recovered ones too:
        their messages are not ready either."""
        client = self._client
        cids = self._consumer_ids()
        if not cids:
            return {}, {}
        pipe = client.pipeline(transaction=False)
        for cid in cids:
            pipe.exists(self.key(f"qops.alive.{cid}"))
            pipe.hget(self.key(f"qops.consumer.{cid}"), "queues")
            pipe.smembers(self.key(f"qops.sources.{cid}"))
        res = pipe.execute()
        live: dict[str, list[str]] = {}
        sources: list[tuple[str, str]] = []
        for i, cid in enumerate(cids):
            alive, queues_json, names = res[3 * i: 3 * i + 3]
            if alive:
                try:
                    live[cid] = [str(q) for q in json.loads(queues_json or b"[]")]
                except ValueError:
                    live[cid] = []
            sources.extend((cid, n.decode("utf-8", "replace")) for n in names)
        flight: dict[str, int] = {}
        if sources:
            pipe = client.pipeline(transaction=False)
            for cid, name in sources:
                pipe.llen(self.inflight_key(cid, name))
            for (_, name), n in zip(sources, pipe.execute(), strict=True):
                if n:
                    q = name.split(SEP, 1)[0]
                    flight[q] = flight.get(q, 0) + int(n)
        return live, flight

    def _bound_queues(self) -> set[str]:
        """Every queue named in a ``_kombu.binding.*`` set (the third field of members)."""
        client = self._client
        pattern = glob_escape(self.key(BINDING_PREFIX)) + "*"
        # Reply exchanges (``reply.<mailbox>``) bind temporary reply queues: not queues.
        replies = self.key(BINDING_PREFIX + "reply.").encode()
        keys = [k for k in client.scan_iter(match=pattern, count=1000, _type="SET")
                if not bytes(k).startswith(replies)]
        names: set[str] = set()
        if not keys:
            return names
        pipe = client.pipeline(transaction=False)
        for k in keys:
            pipe.smembers(k)
        for members in pipe.execute():
            for m in members:
                fields = m.decode("utf-8", "replace").split(SEP)
                if len(fields) == 3 and fields[2]:
                    names.add(fields[2])
        return names

    def queue_stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        with self.guard("reading queue stats"):
            live, flight = self._consumers_view()
            names = list(queues) if queues is not None else sorted(
                self._bound_queues() | set(flight))
            if not names:
                return []
            pipe = self._client.pipeline(transaction=False)
            for name in names:
                for k in self.queue_keys(name):
                    pipe.llen(k)
            lens = pipe.execute()
        out = []
        for i, name in enumerate(names):
            ready = int(sum(lens[4 * i: 4 * i + 4]))
            cons = sum(1 for qs in live.values() if name in qs)
            out.append(QueueStats(name, ready, flight.get(name, 0), cons))
        return out

    def queue_exists(self, queue: str) -> bool:
        with self.guard(f"looking up {queue!r}"):
            n = self._client.exists(self.key(BINDING_PREFIX + queue), *self.queue_keys(queue))
        return int(n) > 0

    def recover(self) -> int:
        """Give back the messages of every registered consumer whose heartbeat expired.

        The liveness check is repeated inside the Lua script, so a consumer that beats
        between the check here and the move keeps its messages."""
        client = self._client
        with self.guard("recovering messages of dead consumers"):
            cids = self._consumer_ids()
            if not cids:
                return 0
            pipe = client.pipeline(transaction=False)
            for cid in cids:
                pipe.exists(self.key(f"qops.alive.{cid}"))
            alive = pipe.execute()
            total = 0
            for cid, is_alive in zip(cids, alive, strict=True):
                if is_alive:
                    continue
                n = int(self.restore(cid, only_if_dead=True))
                if n > 0:
                    log.warning("consumer %s stopped beating: %d message(s) put back on "
                                "their queues", cid, n)
                if n >= 0:
                    total += n
            return total

    def restore(self, cid: str, only_if_dead: bool) -> int:
        keys = [self.key("qops.consumers"), self.key(f"qops.alive.{cid}"),
                self.key(f"qops.sources.{cid}"), self.key(f"qops.consumer.{cid}")]
        mode = "1" if only_if_dead else "0"
        return int(self._lua_restore(keys=keys, args=[cid, self.prefix, mode]))

    # -- fanout -----------------------------------------------------------------------
    def channel_name(self, channel: str) -> str:
        return self.key(f"/{self.db}.{channel}")

    def broadcast(self, channel: str, message: Message, *,
                  routing_key: str | None = None) -> None:
        # kombu's fanout layout: '/<db>.<exchange>', with fanout_patterns (Celery's
        # events) '/<db>.<exchange>/<routing key>'; the envelope names both.
        raw = encode_envelope(routing_key or "", message, exchange=channel)
        self.check_size(f"channel {channel!r}", raw)
        name = self.channel_name(channel)
        if routing_key:
            name = f"{name}/{routing_key}"
        with self.guard(f"broadcasting on {channel!r}"):
            try:
                self._client.publish(name, raw)
            except redis.RedisError as exc:
                if isinstance(exc, UNREACHABLE):
                    raise
                raise PublishError(f"Redis {self.safe_url()} refused the broadcast on "
                                   f"{channel!r}: {one_line(exc)}") from None

    def subscribe(self, channel: str, *, pattern: str | None = None) -> Subscription:
        return RedisSubscription(self, channel, pattern)

    # -- the live-node registry -----------------------------------------------------------
    def register_node(self, name: str, info: dict[str, Any], ttl: float) -> None:
        keys = [self.key(NODES), self.key(NODES_INFO)]
        with self.guard("registering the node"):
            self._lua_register_node(keys=keys, args=[name, repr(float(ttl)),
                                                     json.dumps(info, default=str)])

    def unregister_node(self, name: str) -> None:
        pipe = self._client.pipeline(transaction=True)
        pipe.zrem(self.key(NODES), name)
        pipe.hdel(self.key(NODES_INFO), name)
        with self.guard("unregistering the node"):
            pipe.execute()

    def live_nodes(self) -> list[str]:
        now = time.monotonic()
        sweep = now - self._nodes_swept >= NODE_SWEEP_EVERY
        with self.guard("listing live nodes"):
            names = cast("list[bytes]", self._lua_live_nodes(
                keys=[self.key(NODES), self.key(NODES_INFO)], args=["1" if sweep else "0"]))
        if sweep:
            self._nodes_swept = now
        return sorted(n.decode("utf-8", "replace") for n in names)

    # -- locks (one beat per schedule) ---------------------------------------------------
    def acquire_lock(self, name: str, owner: str, ttl: float) -> bool:
        """``SET NX PX`` takes it; the owner renews it with a script that checks the
        value, so a lock that expired and was taken by another is never renewed."""
        key = self.key(f"qops.lock.{name}")
        ms = max(1, int(ttl * 1000))
        with self.guard(f"taking the lock {name!r}"):
            if self._client.set(key, owner, nx=True, px=ms):
                return True
            return bool(self._lua_lock_renew(keys=[key], args=[owner, ms]))

    def release_lock(self, name: str, owner: str) -> None:
        with self.guard(f"releasing the lock {name!r}"):
            self._lua_lock_release(keys=[self.key(f"qops.lock.{name}")], args=[owner])

    # -- dead letters -------------------------------------------------------------------
    def dlq_record(self, queue: str, raw: bytes, reason: str) -> tuple[str, str, float]:
        dl_id, now = uuid.uuid4().hex, time.time()
        record = json.dumps({"id": dl_id, "queue": queue, "reason": reason,
                             "raw": base64.b64encode(raw).decode("ascii"), "time": now})
        return dl_id, record, now

    def dead_letter(self, queue: str, raw: bytes, reason: str) -> None:
        dl_id, record, now = self.dlq_record(queue, raw, reason)
        pipe = self._client.pipeline(transaction=True)
        pipe.hset(self.key("qops.dlq"), dl_id, record)
        pipe.zadd(self.key("qops.dlq.index"), {dl_id: now})
        with self.guard("storing a dead letter"):
            pipe.execute()

    def _dead_records(self, ids: Sequence[str]) -> list[DeadLetter]:
        if not ids:
            return []
        raws = cast("list[bytes | None]", self._client.hmget(self.key("qops.dlq"), list(ids)))
        out = []
        for dl_id, rec in zip(ids, raws, strict=True):
            if rec is None:
                continue
            try:
                d = json.loads(rec)
                out.append(DeadLetter(str(d["id"]), str(d["queue"]), str(d["reason"]),
                                      base64.b64decode(d["raw"]), float(d["time"])))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("skipping unreadable dead-letter record %s: %s", dl_id, exc)
        return out

    def _dlq_ids(self, last: int) -> list[str]:
        """Dead-letter ids, oldest first, up to index ``last`` (-1 = all)."""
        ids = cast("list[bytes]", self._client.zrange(self.key("qops.dlq.index"), 0, last))
        return [i.decode() for i in ids]

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        if limit <= 0:
            return []
        with self.guard("listing dead letters"):
            ids = self._dlq_ids(limit - 1)
            return self._dead_records(ids)

    def requeue_dead_letters(self, ids: Sequence[str] | None = None) -> int:
        with self.guard("requeueing dead letters"):
            if ids is None:
                ids = self._dlq_ids(-1)
            done = 0
            for start in range(0, len(ids), 500):
                for dl in self._dead_records(ids[start: start + 500]):
                    if not dl.queue:
                        log.warning("dead letter %s has no queue to go back to; kept", dl.id)
                        continue
                    step = raw_step(dl.raw)
                    self.bind([dl.queue])
                    keys = [self.key("qops.dlq"), self.key("qops.dlq.index"),
                            self.key(list_name(dl.queue, step))]
                    done += int(self._lua_dlq_requeue(keys=keys, args=[dl.id, dl.raw]))
            return done

    def purge_dead_letters(self) -> int:
        pipe = self._client.pipeline(transaction=True)
        pipe.hlen(self.key("qops.dlq"))
        pipe.delete(self.key("qops.dlq"), self.key("qops.dlq.index"))
        with self.guard("purging dead letters"):
            return int(pipe.execute()[0])

    # -- lifecycle ----------------------------------------------------------------------
    def ping(self) -> None:
        with self.guard("connecting"):
            self._client.ping()

    def close(self) -> None:
        self._pool.disconnect()


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
    """Reserves from Redis lists into per-source in-flight lists (see the module doc).

    ``get`` runs on one thread and talks to Redis over a connection of its own (a
    ``Link``; BLMOVE blocks it). ``ack`` does not talk to Redis: it queues the ack, and
    the next reserve carries it in the same script and round trip (``redis_reserve.lua``
    removes the acked payloads from flight, then takes more). A queued ack waits at most
    about ``ACK_DELAY`` (one BLMOVE slice when idle); ``heartbeat()`` and ``close()``
    flush what is queued too. A queued ack counts as settled for the prefetch, and if
    the process dies before the flush the message runs again (at least once, as for any
    crash before an ack). Acks made on the thread that calls get() (early acks, see
    ``_flush_now``) are sent at once. requeue, reject and heartbeat go through the
    transport's pool.

    Reserving in batches: when less than half the prefetch is free and messages are in
    hand, get() waits up to ``LINGER`` for more acks, so that one round trip takes (and
    acks) several messages instead of one each."""

    transport: RedisTransport

    def __init__(self, transport: RedisTransport, queues: list[str], prefetch: int,
                 cid: str) -> None:
        self.transport = transport
        self.id = cid
        self._queues = list(dict.fromkeys(queues))
        self._limit = max(1, prefetch)
        self._batch = max(1, self._limit // 2)
        # Guards the books below; get() waits on it for room, ack() notifies it.
        self._lock = threading.Condition(threading.Lock())
        # Held for the whole of get(): close() takes it so that it never unregisters the
        # consumer while a reserve/BLMOVE may still add to its in-flight lists.
        self._get_lock = threading.Lock()
        self._closed = False
        # Already in flight on the server, not yet handed out (a reserve batch).
        self._cache: deque[tuple[str, bytes]] = deque()
        # Handed out and not yet settled: seq -> (list name, raw).
        self._unsettled: dict[int, tuple[str, bytes]] = {}
        # Unsettled ones that don't count against the prefetch (held for an ETA).
        self._exempt: set[int] = set()
        # Acked, not yet removed from flight on the server: (list name, raw).
        self._acks: list[tuple[str, bytes]] = []
        self._acks_since = 0.0  # monotonic time of the oldest queued ack
        self._seq = 0
        self._rotation = 0
        self._resync_needed = False
        self._last_beat = 0.0
        self._plan: _Plan | None = None  # rebuilt when the queues change
        self._get_thread = 0  # ident of the thread that calls get()
        # Every list name this consumer may hold messages from; re-registered by heartbeat().
        self._used: set[str] = set(self._candidates())
        self._alive_value = f"{os.getpid()}@{socket.gethostname()}"
        # No automatic retries on this connection: a retried reserve whose first reply was
        # lost would take messages twice. A failed call sets _resync_needed instead.
        self._pool = transport._make_pool(
            Retry(NoBackoff(), 0),
            socket_timeout=max(1.0, transport.options.connect_timeout) + WAIT_SLICE)
        self._link = Link(self._pool)
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

    def _room(self) -> int:
        """Free prefetch slots (call with the lock held)."""
        counted = len(self._unsettled) - len(self._exempt)
        return self._limit - len(self._cache) - counted

    def exempt(self, delivery: Delivery) -> None:
        tag = delivery.tag
        if not isinstance(tag, _Tag):
            raise UsageError(f"delivery {tag!r} was not reserved by a Redis consumer")
        with self._lock:
            if tag.seq in self._unsettled:
                self._exempt.add(tag.seq)
                self._lock.notify_all()

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
                        self._seq += 1
                        self._unsettled[self._seq] = (name, raw)
                        tag = _Tag(self._seq, name)
                    else:
                        tag = None
                        room = self._room()
                        if not acks_due:
                            if room == 0:
                                if left <= 0:
                                    return None
                                # Waits in slices so that close() is noticed quickly.
                                self._lock.wait(min(left, WAIT_SLICE))
                                continue
                            if room < self._batch and left > 0:
                                if not linger_until:
                                    linger_until = now + LINGER
                                wait = min(linger_until, deadline) - now
                                if wait > 0:
                                    self._lock.wait_for(self._batch_ready, wait)
                                    continue
                        if self._plan is None:
                            self._plan = self._make_plan()
                        plan = self._plan
                        nqueues = len(self._queues)
                if tag is not None:
                    return _make_delivery(tag.name, raw, tag)
                linger_until = 0.0
                try:
                    if time.monotonic() - self._last_beat >= beat_every:
                        self.heartbeat()  # get() running proves we live, too
                    if self._resync_needed:
                        self._resync()
                    if acks_due and (self._cache or room == 0 or not plan.names):
                        self._exchange(plan, 0, 0)  # only the acks
                        continue
                    if not plan.names:
                        if left <= 0:
                            return None
                        with self._lock:
                            self._lock.wait(min(left, WAIT_SLICE))
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

    def _batch_ready(self) -> bool:
        return self._closed or self._room() >= self._batch

    def _take_acks(self) -> list[tuple[str, bytes]]:
        with self._lock:
            acks, self._acks = self._acks, []
        return acks

    def _put_back_acks(self, acks: list[tuple[str, bytes]]) -> None:
        """A flush failed: keep its acks queued (first, and due at once)."""
        if acks:
            with self._lock:
                self._acks[:0] = acks
                self._acks_since = time.monotonic() - ACK_DELAY

    def _exchange(self, plan: _Plan, room: int, wait_k: int) -> bool:
        """One round trip: flush the queued acks, then reserve up to ``room`` messages
        (none when 0). True if any were taken."""
        acks = self._take_acks()
        tail: list[bytes] = [bulk(room), bulk(wait_k)]
        others: list[list[bytes | str | int | float]] = []
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
            self._link.many(others)
            try:
                res = self._link.send(b"*%d\r\n" % count + bulk("EVALSHA") +
                                      bulk(cast("str", script.sha)) + rest)
            except redis.exceptions.NoScriptError:  # did not run: run it once, with EVAL
                res = self._link.send(b"*%d\r\n" % count + bulk("EVAL") +
                                      bulk(cast("str", script.script)) + rest)
        except BaseException:
            self._put_back_acks(acks)
            raise
        if not res:
            return False
        names = plan.names
        self._taken([(names[int(res[i]) - 1], bytes(res[i + 1]))
                     for i in range(0, len(res), 2)])
        return True

    def _blmove(self, name: str, wait: float) -> None:
        # BLMOVE's timeout is in seconds (a double since Redis 6); 0 would mean forever.
        wait = max(0.01, round(wait, 3))
        raw = self._link.call("BLMOVE", self.transport.key(name), self._inflight(name),
                              "RIGHT", "LEFT", wait)
        if raw is not None:
            self._taken([(name, bytes(raw))])

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
            self.transport.restore(self.id, only_if_dead=False)

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
            known = (Counter(self._cache) + Counter(self._unsettled.values()) +
                     Counter(self._acks))
        for name, items in zip(names, held, strict=True):
            for raw in items:
                if known[(name, raw)] > 0:
                    known[(name, raw)] -= 1
                    continue
                self._link.script(t._lua_requeue, [self._inflight(name), t.key(name)], [raw])
        self._resync_needed = False

    # -- settling -------------------------------------------------------------------------
    def _entry(self, delivery: Delivery) -> tuple[int, str, bytes] | None:
        tag = delivery.tag
        if not isinstance(tag, _Tag):
            raise UsageError(f"delivery {tag!r} was not reserved by a Redis consumer")
        with self._lock:
            entry = self._unsettled.get(tag.seq)
        if entry is None:  # settled already (or the consumer was closed): nothing to do
            return None
        return tag.seq, entry[0], entry[1]

    def _settled(self, seq: int) -> None:
        # Dropped from the books only once Redis has done it, so a failed call can be retried.
        with self._lock:
            self._exempt.discard(seq)
            if self._unsettled.pop(seq, None) is not None:
                self._lock.notify_all()

    def ack(self, delivery: Delivery) -> None:
        """Queue the ack: get() sends it with its next reserve (see the class doc)."""
        tag = delivery.tag
        if not isinstance(tag, _Tag):
            raise UsageError(f"delivery {tag!r} was not reserved by a Redis consumer")
        with self._lock:
            self._exempt.discard(tag.seq)
            entry = self._unsettled.pop(tag.seq, None)
            if entry is None:  # settled already (or the consumer was closed)
                return
            if not self._acks:
                self._acks_since = time.monotonic()
            self._acks.append(entry)
            self._lock.notify_all()
        if threading.get_ident() == self._get_thread:
            self._flush_now()

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

    def requeue(self, delivery: Delivery) -> None:
        entry = self._entry(delivery)
        if entry is None:
            return
        seq, name, raw = entry
        t = self.transport
        with t.guard("requeueing a message"):
            t._lua_requeue(keys=[self._inflight(name), t.key(name)], args=[raw])
        self._settled(seq)

    def reject(self, delivery: Delivery, reason: str) -> None:
        """Dead-letter and settle in one atomic step (the base class's two steps could
        leave a dead letter whose message also runs again after a crash)."""
        entry = self._entry(delivery)
        if entry is None:
            return
        seq, name, raw = entry
        t = self.transport
        dl_id, record, now = t.dlq_record(delivery.queue, raw, reason)
        with t.guard("dead-lettering a message"):
            t._lua_reject(keys=[self._inflight(name), t.key("qops.dlq"), t.key("qops.dlq.index")],
                          args=[raw, dl_id, record, now])
        self._settled(seq)

    def _flush_acks(self, pipe: Any) -> list[tuple[str, bytes]]:
        """Add the queued acks to ``pipe`` (a pipeline of the transport's client); the
        caller puts them back if it fails."""
        acks = self._take_acks()
        for name, raw in acks:
            # (redis-py sends bytes as they are; its annotation only says str)
            pipe.lrem(self._inflight(name), -1, cast("str", raw))
        return acks

    # -- liveness and queues ---------------------------------------------------------------
    def heartbeat(self) -> None:
        """Refresh the alive key and (re-)register: if a late heartbeat let recover()
        unregister this consumer, registering again keeps new reservations recoverable.
        Flushes the queued acks in the same round trip."""
        with self._lock:
            if self._closed:
                return
            queues = list(self._queues)
            used = sorted(self._used)
        t = self.transport
        ttl_ms = max(1, int(t.options.heartbeat_ttl * 1000))
        pipe = t._client.pipeline(transaction=True)
        pipe.set(t.key(f"qops.alive.{self.id}"), self._alive_value, px=ttl_ms)
        pipe.sadd(t.key("qops.consumers"), self.id)
        pipe.hset(t.key(f"qops.consumer.{self.id}"), mapping={
            "queues": json.dumps(queues), "pid": os.getpid(), "host": socket.gethostname()})
        pipe.sadd(t.key(f"qops.sources.{self.id}"), *used)
        acks = self._flush_acks(pipe)
        try:
            with t.guard("sending the consumer heartbeat"):
                pipe.execute()
        except BaseException:
            self._put_back_acks(acks)
            raise
        self._last_beat = time.monotonic()

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
            self._lock.notify_all()

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
            self._unsettled.clear()
            self._exempt.clear()
            self._lock.notify_all()
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
                t.restore(self.id, only_if_dead=False)
        finally:
            if got_lock:
                self._get_lock.release()
            self._link.close()
            self._pool.disconnect()


class RedisReplyConsumer(ReplyOnly, Consumer):
    """Pops replies off one list (see the module doc), up to the prefetch at a time.
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
                        return _make_delivery(self.name, raw, _Tag(self._seq, self.name))
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
        if not isinstance(tag, _Tag):
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


def _make_delivery(name: str, raw: bytes, tag: _Tag) -> Delivery:
    d = Delivery(queue=name.split(SEP, 1)[0], tag=tag, raw=raw)
    try:
        msg = decode_envelope(raw)
    except ValueError as exc:
        d.error = str(exc)
        return d
    except Exception as exc:  # e.g. RecursionError on absurdly nested JSON: never crash get()
        d.error = f"undecodable envelope: {one_line(exc)}"
        return d
    if "priority" in msg.properties:
        msg.properties["priority"] = qops_priority(msg.properties["priority"])
    d.message = msg
    return d


class RedisSubscription(Subscription):
    """Without a pattern, SUBSCRIBE to exactly ``/<db>.<channel>`` (kombu's fanout
    channel); with one, PSUBSCRIBE to ``/<db>.<channel>/<glob>`` (kombu's fanout_patterns
    layout, Celery's events) and keep the routing keys that match the topic ``pattern``.
    Has its own connection for as long as it lives."""

    def __init__(self, transport: RedisTransport, channel: str,
                 pattern: str | None = None) -> None:
        self.transport = transport
        self.channel = channel
        self.pattern = pattern
        self._base = transport.channel_name(channel)
        self._pubsub = transport._client.pubsub()
        try:
            self._confirm()
        except BaseException:
            self.close()  # give its connection back to the pool
            raise

    def _confirm(self) -> None:
        transport, channel = self.transport, self.channel
        with transport.guard(f"subscribing to {channel!r}"):
            if self.pattern is None:
                self._pubsub.subscribe(self._base)
                expect = "subscribe"
            else:
                self._pubsub.psubscribe(
                    glob_escape(self._base) + "/" + topic_glob(self.pattern))
                expect = "psubscribe"
            # Wait for the confirmation: broadcasts sent after subscribe() returns must
            # reach us, and Redis only routes them once it has processed the command.
            deadline = time.monotonic() + transport.options.connect_timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrokerUnreachable(
                        f"Redis broker {transport.safe_url()} did not confirm the "
                        f"subscription to {channel!r} within {transport.options.connect_timeout}s; "
                        "check the server's load and the network")
                m = self._pubsub.get_message(timeout=left)
                if m is not None and m["type"] == expect:
                    break

    def _wanted(self, m: dict[str, Any]) -> bool:
        if m["type"] == "message":
            return self.pattern is None
        if m["type"] != "pmessage" or self.pattern is None:
            return False
        name = m["channel"]
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        head = self._base + "/"
        return name.startswith(head) and topic_matches(self.pattern, name[len(head):])

    def get(self, timeout: float) -> Message | None:
        deadline = time.monotonic() + max(0.0, timeout)
        with self.transport.guard(f"listening on {self.channel!r}"):
            while True:
                left = deadline - time.monotonic()
                m = self._pubsub.get_message(ignore_subscribe_messages=True,
                                             timeout=max(0.0, left))
                if m is not None and self._wanted(m):
                    try:
                        return decode_envelope(m["data"])
                    except Exception as exc:  # a bad broadcast must not stop the listener
                        log.warning("dropping malformed broadcast on %r: %s", self.channel,
                                    one_line(exc))
                if left <= 0:
                    return None

    def close(self) -> None:
        try:
            self._pubsub.close()
        except redis.RedisError:  # closing a broken connection: nothing left to release
            pass
