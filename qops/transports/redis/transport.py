"""``RedisTransport``: the ``Transport`` interface on Redis (the wire layout is in the
package doc). Consumers, subscriptions and the concerns below the interface live in the
other modules of this package."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from qops.errors import BrokerUnreachable, PublishError, PublishManyError
from qops.protocol import Message, encode_envelope
from qops.transports.base import (
    REPLY_TTL,
    Consumer,
    DeadLetter,
    QueueStats,
    Subscription,
    Transport,
    TransportOptions,
    one_line,
)
from qops.transports.redis import deadletters, presence, recovery, stats
from qops.transports.redis.consumer import RedisConsumer
from qops.transports.redis.link import (
    UNREACHABLE,
    load_script,
    pack,
    pack_push,
    reason,
    transaction,
)
from qops.transports.redis.names import (
    BINDING_PREFIX,
    SEP,
    STEPS,
    binding_member,
    list_name,
    wire_step,
)
from qops.transports.redis.replicas import Replicas
from qops.transports.redis.reply import RedisReplyConsumer
from qops.transports.redis.subscription import RedisSubscription
from qops.transports.redis.url import connection_pool, parse_url, select_db

#: messages per MULTI/EXEC of a bulk send (``publish_many``)
BATCH = 2000


class RedisTransport(Transport):
    scheme = "redis"

    @classmethod
    def check_url(cls, url: str) -> None:
        parse_url(url)

    def __init__(self, url: str, options: TransportOptions | None = None) -> None:
        super().__init__(url, options)
        self._parsed = parsed = parse_url(url)
        self._redis_url, self.prefix = parsed.url, parsed.prefix
        # Stale pooled connections (e.g. after a Redis restart) fail once and are retried
        # once at once; an unreachable server still fails fast (no backoff loop). A
        # command that timed out is not sent again: it may have run (a publish would be
        # made twice), and a server that does not answer would cost the timeout twice.
        self._pool = self._make_pool(
            Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
            socket_timeout=max(30.0, self.options.connect_timeout))
        self._client = redis.Redis(connection_pool=self._pool)
        self.db = int(self._pool.connection_kwargs.get("db") or 0)
        self._lua_reserve = self._client.register_script(load_script("reserve.lua"))
        self._lua_requeue = self._client.register_script(load_script("requeue.lua"))
        self._lua_reject = self._client.register_script(load_script("reject.lua"))
        self._lua_restore = self._client.register_script(load_script("restore.lua"))
        self._lua_dlq_requeue = self._client.register_script(load_script("dlq_requeue.lua"))
        self._lua_worker_lost = self._client.register_script(load_script("worker_lost.lua"))
        self._lua_register_node = self._client.register_script(
            load_script("register_node.lua"))
        self._lua_live_nodes = self._client.register_script(load_script("live_nodes.lua"))
        self._lua_lock_renew = self._client.register_script(load_script("lock_renew.lua"))
        self._lua_lock_release = self._client.register_script(
            load_script("lock_release.lua"))
        self._nodes_swept = 0.0  # when live_nodes() last forgot expired nodes
        # wait_replicas: publishes (and acks, by the consumers) wait for replicas
        self.replicas = Replicas.from_options(self.options.extra, "broker_transport_options")
        # Queues whose kombu binding this transport has already written (kombu caches
        # declarations the same way): publishing then costs one LPUSH.
        self._bound: set[str] = set()

    def _make_pool(self, retry: Retry, socket_timeout: float) -> redis.ConnectionPool:
        return connection_pool(
            self._parsed, self.options.extra, self.url, "broker URL", retry=retry,
            socket_timeout=socket_timeout, socket_connect_timeout=self.options.connect_timeout,
            client_name="qops", redis_connect_func=select_db)

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
        elif self._parsed.sentinel is not None:
            hint = ("check that the Sentinels are running, that they know the master "
                    "name, and that one of them sees a master (during a failover: "
                    "until a replica is promoted)")
        else:
            hint = ("check that redis-server is running and that the URL's host, port, "
                    "db and TLS scheme (rediss://) are right")
        return BrokerUnreachable(f"Redis broker {self.safe_url()} unreachable while {doing}: "
                                 f"{reason(exc)}; {hint}")

    @contextmanager
    def guard(self, doing: str) -> Iterator[None]:
        try:
            yield
        except UNREACHABLE as exc:
            raise self.unreachable(exc, doing) from exc

    @contextmanager
    def sending(self, doing: str, what: str, target: str) -> Iterator[None]:
        """``guard`` for sending a message (``doing``/``what`` + ``target``, formatted
        only on failure): any other error reply means Redis did not take it (e.g. OOM
        with maxmemory reached, READONLY on a replica), a PublishError."""
        try:
            yield
        except UNREACHABLE as exc:
            raise self.unreachable(exc, f"{doing} {target!r}") from exc
        except redis.RedisError as exc:
            raise PublishError(f"Redis {self.safe_url()} refused {what} {target!r}: "
                               f"{one_line(exc)}") from None

    # -- queues -------------------------------------------------------------------------
    def encode(self, queue: str, message: Message) -> tuple[str, bytes]:
        """(list name, envelope) for ``message`` on ``queue``; the envelope's priority is
        the wire step (Celery's meaning), as kombu would have written it."""
        step = wire_step(message.properties.get("priority"))
        return list_name(queue, step), encode_envelope(queue, message, priority=step)

    def publish(self, queue: str, message: Message) -> None:
        name, raw = self.encode(queue, message)
        self.check_size(f"queue {queue!r}", raw)
        with self.sending("publishing to", "the message for", queue):
            if queue in self._bound and not self.replicas.count:
                self._client.lpush(self.key(name), raw)
                return
            pipe = self._client.pipeline(transaction=False)
            if queue not in self._bound:
                pipe.sadd(self.key(BINDING_PREFIX + queue), binding_member(queue))
            pipe.lpush(self.key(name), raw)
            if self.replicas.count:
                self.replicas.wait(pipe, f"the message for {queue!r}")
            else:
                pipe.execute()
            self._bound.add(queue)

    def publish_many(self, items: Sequence[tuple[str, Message]]) -> None:
        """Pipelined: each chunk of ``BATCH`` messages is one MULTI/EXEC (one LPUSH
        per run of messages for the same list, packed here: ``link.pack_push``), sent
        in one round trip, followed by WAIT with ``wait_replicas``. Redis runs every
        command of a transaction even when one fails (e.g. WRONGTYPE), so the messages
        of a failed LPUSH are the unconfirmed ones of a chunk; a chunk whose EXEC (or
        WAIT) did not answer, or refused, is unconfirmed whole, and those after it are
        not sent."""
        n = len(items)
        encoded = []
        for index, (queue, message) in enumerate(items):
            name, raw = self.encode(queue, message)
            try:
                self.check_size(f"queue {queue!r}", raw)
            except PublishError as exc:
                raise PublishManyError(f"{exc} (message {index} of {n}; none was sent)",
                                       list(range(n))) from None
            encoded.append((queue, self.key(name), raw))
        wait = pack(self.replicas.command) if self.replicas.count else None
        failed: list[int] = []
        reasons: dict[str, None] = {}
        for start in range(0, n, BATCH):
            end = min(n, start + BATCH)
            unbound = sorted({encoded[i][0] for i in range(start, end)} - self._bound)
            commands = [pack(["SADD", self.key(BINDING_PREFIX + q), binding_member(q)])
                        for q in unbound]
            runs: list[range] = []  # the indexes each LPUSH carries
            first = start
            for i in range(start + 1, end + 1):
                if i == end or encoded[i][1] != encoded[first][1]:
                    commands.append(pack_push(encoded[first][1],
                                              [encoded[j][2] for j in range(first, i)]))
                    runs.append(range(first, i))
                    first = i
            try:
                with self.sending("publishing to", "the messages for", encoded[start][0]):
                    replies, acked = transaction(self._pool, commands, wait)
                    if wait is not None:
                        self.replicas.check(acked, f"messages {start} to {end - 1} of {n}")
            except (PublishError, BrokerUnreachable) as exc:
                raise PublishManyError(
                    f"{exc}: messages {start} to {n - 1} of {n} were not confirmed"
                    + (f" (nor {len(failed)} before them)" if failed else "")
                    + f" (the other {start - len(failed)} were)",
                    failed + list(range(start, n))) from None
            for run, reply in zip(runs, replies[len(unbound):], strict=True):
                if isinstance(reply, Exception):
                    failed.extend(run)
                    reasons[one_line(reply)] = None
            if not any(isinstance(r, Exception) for r in replies[:len(unbound)]):
                self._bound.update(unbound)
        if failed:
            raise PublishManyError(
                f"Redis {self.safe_url()} refused {len(failed)} of {n} messages "
                f"({'; '.join(reasons)}); the other {n - len(failed)} were queued",
                failed)

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
        with self.sending("sending a reply to", "the reply for", name):
            pipe.execute()

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

    def queue_stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        return stats.queue_stats(self, queues)

    def queue_exists(self, queue: str) -> bool:
        with self.guard(f"looking up {queue!r}"):
            n = self._client.exists(self.key(BINDING_PREFIX + queue), *self.queue_keys(queue))
        return int(n) > 0

    def recover(self) -> int:
        return recovery.recover(self)

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
        with self.sending("broadcasting on", "the broadcast on", channel):
            self._client.publish(name, raw)

    def subscribe(self, channel: str, *, pattern: str | None = None,
                  lag: float = 0.0) -> Subscription:
        return RedisSubscription(self, channel, pattern)

    # -- the live-node registry and locks (presence.py) ------------------------------------
    def register_node(self, name: str, info: dict[str, Any], ttl: float) -> None:
        presence.register_node(self, name, info, ttl)

    def unregister_node(self, name: str) -> None:
        presence.unregister_node(self, name)

    def live_nodes(self) -> list[str]:
        return presence.live_nodes(self)

    def acquire_lock(self, name: str, owner: str, ttl: float) -> bool:
        return presence.acquire_lock(self, name, owner, ttl)

    def release_lock(self, name: str, owner: str) -> None:
        presence.release_lock(self, name, owner)

    # -- dead letters (deadletters.py) ---------------------------------------------------
    def dead_letter(self, queue: str, raw: bytes, reason: str) -> None:
        deadletters.dead_letter(self, queue, raw, reason)

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return deadletters.dead_letters(self, limit)

    def dead_letter_count(self) -> int:
        return deadletters.dead_letter_count(self)

    def requeue_dead_letters(self, ids: Sequence[str] | None = None) -> int:
        return deadletters.requeue_dead_letters(self, ids)

    def purge_dead_letters(self) -> int:
        return deadletters.purge_dead_letters(self)

    # -- lifecycle ----------------------------------------------------------------------
    def ping(self) -> None:
        with self.guard("connecting"):
            self._client.ping()

    def close(self) -> None:
        self._pool.disconnect()
