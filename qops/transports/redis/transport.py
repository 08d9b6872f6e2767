"""``RedisTransport``: the ``Transport`` interface on Redis (the wire layout is in the
package doc). Consumers, subscriptions and the concerns below the interface live in the
other modules of this package."""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from qops.errors import BrokerUnreachable, PublishError, UsageError
from qops.protocol import Message, encode_envelope
from qops.transports.base import (
    REPLY_TTL,
    Consumer,
    DeadLetter,
    QueueStats,
    Subscription,
    Transport,
    TransportOptions,
)
from qops.transports.redis.consumer import RedisConsumer
from qops.transports.redis.link import UNREACHABLE, load_script, one_line
from qops.transports.redis.names import (
    BINDING_PREFIX,
    NODES,
    NODES_INFO,
    SEP,
    STEPS,
    binding_member,
    glob_escape,
    list_name,
    raw_step,
    split_url,
    wire_step,
)
from qops.transports.redis.reply import RedisReplyConsumer
from qops.transports.redis.subscription import RedisSubscription

log = logging.getLogger(__name__)

NODE_SWEEP_EVERY = 60.0  # seconds between live_nodes() calls that forget expired nodes

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
