"""Results in Redis, in Celery's layout (docs/protocol.md §6.1): ``<prefix><task id>`` holds the
meta JSON; every write is published on the same name, so a waiting client wakes at once.

A waiting thread keeps one pub/sub connection for all its waits (a new connection per
``get()`` cost a TCP connect, HELLO and SELECT each time). It sends SUBSCRIBE on the task's
key and reads the key at once, without waiting for the subscription: where the result is
there already (a ``get()`` after a confirmed RabbitMQ publish, a finished task) that is one
round trip. Else it reads the subscription's confirmation, which came meanwhile, reads the
key again (a result stored before the subscription took effect is seen there), and waits
for a message on the channel. It unsubscribes without waiting for the reply; replies and
messages left unread are skipped by the next wait, which counts the confirmations of
each channel so that an old one is not taken for its own.

Chords join here with Celery's counter keys (``<group prefix><group id>.j/.t/.s/.d/.c``,
docs/canvas.md), so Celery and qops workers can finish each other's chords."""

from __future__ import annotations

import math
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any, NoReturn, cast

from qops.backends.base import ResultBackend
from qops.errors import BrokerUnreachable, ResultTimeout
from qops.transports.redis.link import reason
from qops.transports.redis.replicas import Replicas
from qops.transports.redis.url import connection_pool, parse_url, select_db
from qops.transports.urls import mask_password

#: seconds a Sentinel-backed backend keeps trying to reach a master (a failover)
FAILOVER_WAIT = 10.0
FAILOVER_RETRY = 0.2


#: SUBSCRIBEs left unconfirmed (by waits that found their result at once) before a wait
#: reads what came of them
UNREAD_MAX = 32


def _script(name: str) -> str:
    return resources.files("qops.backends").joinpath(name).read_text()


class RedisBackend(ResultBackend):
    stored_by_children = True  # (redis-py's pool makes new connections after a fork)

    @classmethod
    def check_url(cls, url: str) -> None:
        parse_url(url, "result backend URL")

    def __init__(self, url: str, *, options: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        import redis

        self._errors = (redis.ConnectionError, redis.TimeoutError, redis.AuthenticationError)
        parsed = parse_url(url, "result backend URL")
        options = options or {}
        if parsed.sentinel is None:
            self.client = redis.Redis.from_url(url, socket_connect_timeout=5,
                                               health_check_interval=30,
                                               redis_connect_func=select_db)
        else:
            # the master, found by asking the Sentinels (again after a failover)
            pool = connection_pool(parsed, options, url, "result backend URL",
                                   socket_connect_timeout=5, health_check_interval=30,
                                   redis_connect_func=select_db)
            self.client = redis.Redis(connection_pool=pool)
        self._sentinel = parsed.sentinel is not None
        self._replicas = Replicas.from_options(options, "result_backend_transport_options")
        self._store_script = self.client.register_script(_script("redis_store.lua"))
        self._local = threading.local()  # .pubsub, .pid: the thread's waiting connection
        self._pubsubs: list[Any] = []  # every thread's, for close()
        self._pubsubs_lock = threading.Lock()
        self._part_script = self.client.register_script(_script("redis_chord_part.lua"))
        self._claim_script = self.client.register_script(_script("redis_chord_claim.lua"))

    def _key(self, task_id: str) -> str:
        return f"{self.prefix}{task_id}"

    def _call(self, fun: Any, *args: Any, **kwargs: Any) -> Any:
        """``fun(...)``; under Sentinel a lost connection is tried again for up to
        ``FAILOVER_WAIT`` seconds (a failover: a replica is promoted within seconds;
        every call here is idempotent)."""
        import redis

        deadline = time.monotonic() + (FAILOVER_WAIT if self._sentinel else 0.0)
        while True:
            try:
                return fun(*args, **kwargs)
            except self._errors as exc:
                if (isinstance(exc, redis.AuthenticationError)
                        or time.monotonic() + FAILOVER_RETRY > deadline):
                    self._unreachable(exc)
            time.sleep(FAILOVER_RETRY)

    def _unreachable(self, exc: BaseException) -> NoReturn:
        raise BrokerUnreachable(
            f"result backend {mask_password(self.url)} is unreachable: {reason(exc)}; "
            "check that Redis runs and the URL is right") from None

    def _get(self, task_id: str) -> bytes | None:
        data: bytes | None = self._call(self.client.get, self._key(task_id))
        return data

    def _store(self, task_id: str, data: bytes, state: str, *, reply_to: str | None) -> None:
        ttl = int(math.ceil(self.expires)) if self.expires else 0
        if not self._replicas.count:
            self._call(self._store_script, keys=[self._key(task_id)], args=[data, ttl])
            return

        def store_and_wait() -> None:
            pipe = self.client.pipeline(transaction=False)
            self._store_script(keys=[self._key(task_id)], args=[data, ttl], client=pipe)
            self._replicas.wait(pipe, f"the result of {task_id}")

        self._call(store_and_wait)

    def _delete(self, task_id: str) -> None:
        self._call(self.client.delete, self._key(task_id))

    def _pubsub(self) -> Any:
        """This thread's pub/sub connection (a new one after a fork: the parent's socket
        is not ours)."""
        local = self._local
        pubsub = getattr(local, "pubsub", None)
        if pubsub is None or local.pid != os.getpid():
            pubsub = self.client.pubsub()
            local.pubsub, local.pid = pubsub, os.getpid()
            local.unconfirmed = Counter()  # channel -> SUBSCRIBEs sent, not yet confirmed
            with self._pubsubs_lock:
                self._pubsubs.append(pubsub)
        return pubsub

    def _drop_pubsub(self) -> None:
        pubsub = getattr(self._local, "pubsub", None)
        self._local.pubsub = None
        if pubsub is not None:
            with self._pubsubs_lock:
                if pubsub in self._pubsubs:
                    self._pubsubs.remove(pubsub)
            try:
                pubsub.close()
            except Exception:  # noqa: S110 - a broken connection is being dropped anyway
                pass

    def _next_on(self, pubsub: Any, channel: bytes, kind: str, seconds: float
                 ) -> dict[str, Any] | None:
        """Read until a ``kind`` message ("subscribe" or "message") on ``channel``, at
        most ``seconds``; the message, or None when none came. A "subscribe" counts
        only as the confirmation of the channel's last SUBSCRIBE."""
        deadline = time.monotonic() + seconds
        while True:
            msg = self._call(pubsub.get_message, timeout=max(0.0, deadline - time.monotonic()))
            if msg is not None:
                last = self._count_off(msg)
                if msg["channel"] == channel and (
                        last if kind == "subscribe" else msg["type"] == kind):
                    return cast("dict[str, Any]", msg)
            if time.monotonic() >= deadline:
                return None

    def _count_off(self, msg: dict[str, Any]) -> bool:
        """Count ``msg`` off if it confirms a SUBSCRIBE; True if it confirms its
        channel's last one."""
        unconfirmed, channel = self._local.unconfirmed, msg["channel"]
        if msg["type"] != "subscribe" or not unconfirmed[channel]:
            return False
        unconfirmed[channel] -= 1
        if unconfirmed[channel]:
            return False
        del unconfirmed[channel]
        return True

    def _read_unread(self, pubsub: Any) -> None:
        """Read, without waiting, the replies that waits which found their result at
        once left unread: else a client whose every get() finds its result (a web app
        reading finished tasks) would pile them up in its socket, and Redis would drop
        the connection at its pub/sub output limit."""
        while (msg := self._call(pubsub.get_message, timeout=0.0)) is not None:
            self._count_off(msg)

    # -- the chord counter join ---------------------------------------------------------
    native_join = True
    #: how long the 'done' mark of a joined chord stays (s): late copies of parts find it
    DONE_MARK = 300

    def _gkeys(self, group_id: str, *suffixes: str) -> list[str]:
        return [f"{self.group_prefix}{group_id}{s}" for s in suffixes]

    def _ttl(self) -> int:
        return int(math.ceil(self.expires)) if self.expires else 0

    def set_chord_size(self, group_id: str, size: int) -> None:
        claim, sized = self._gkeys(group_id, ".c", ".s")
        pipe = self.client.pipeline()
        pipe.delete(claim)  # a frozen chord applied again is a new run
        pipe.set(sized, size, ex=self._ttl() or None)
        self._call(pipe.execute)

    def join_part(self, group_id: str, task_id: str, index: int | None, entry: bytes,
                  claim: int) -> tuple[str, list[bytes]] | None:
        score = "+inf" if index is None else str(int(index))
        token = uuid.uuid4().hex
        keys = [*self._gkeys(group_id, ".j", ".t", ".s", ".d", "", ".c")]
        ready, total, claimed = self._call(
            self._part_script, keys=keys,
            args=[f"{task_id}:{score}", entry, score, self._ttl(), self._ttl(), claim, token])
        if not claimed or ready != total:
            return None
        entries: list[bytes] = self._call(self.client.zrange, keys[0], 0, -1)
        return token, entries

    def join_extend(self, group_id: str, token: str, seconds: int) -> bool:
        keys = self._gkeys(group_id, ".c", ".j", ".t", ".s", ".d")
        return bool(self._call(self._claim_script, keys=keys, args=["extend", token, seconds]))

    def join_done(self, group_id: str, token: str) -> bool:
        keys = self._gkeys(group_id, ".c", ".j", ".t", ".s", ".d")
        return bool(self._call(self._claim_script, keys=keys,
                               args=["done", token, self.DONE_MARK]))

    def join_abandon(self, group_id: str) -> None:
        self._call(self.client.delete, *self._gkeys(group_id, ".s"))

    @contextmanager
    def _watch(self, task_id: str) -> Iterator[Callable[[float], bytes | None]]:
        # The first read goes out with the SUBSCRIBE, unconfirmed; the first pause
        # confirms it and has the key read again (a result stored before the
        # subscription took effect is seen then), later ones wait for the message.
        pubsub = self._pubsub()
        if len(self._local.unconfirmed) >= UNREAD_MAX:
            self._read_unread(pubsub)
        channel = self._key(task_id).encode()
        ok = confirmed = False
        try:
            self._call(pubsub.subscribe, channel)
            self._local.unconfirmed[channel] += 1
            ok = True

            def pause(seconds: float) -> bytes | None:
                nonlocal confirmed
                if not confirmed:
                    if self._next_on(pubsub, channel, "subscribe", 10.0) is None:
                        raise BrokerUnreachable(f"result backend {mask_password(self.url)} "
                                                "did not confirm a subscription in 10 s")
                    confirmed = True
                    return None
                # the store script (and Celery's backend) publishes what it stored
                msg = self._next_on(pubsub, channel, "message", seconds)
                data = None if msg is None else msg["data"]
                return data if isinstance(data, bytes) else None

            yield pause
        except BaseException as exc:
            # a timeout leaves the connection in order; anything else may have left a
            # reply half read
            ok = ok and isinstance(exc, ResultTimeout)
            raise
        finally:
            if ok:
                try:
                    pubsub.unsubscribe(channel)
                except Exception:
                    self._drop_pubsub()
            else:
                self._drop_pubsub()

    def close(self) -> None:
        with self._pubsubs_lock:
            pubsubs, self._pubsubs = self._pubsubs, []
        for pubsub in pubsubs:
            try:
                pubsub.close()
            except Exception:  # noqa: S110 - closing: nothing left to do with it
                pass
        self.client.close()
