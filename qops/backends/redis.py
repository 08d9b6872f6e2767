"""Results in Redis, in Celery's layout (docs/protocol.md §6.1): ``<prefix><task id>`` holds the
meta JSON; every write is published on the same name, so a waiting client wakes at once.
Chords join here with Celery's counter keys (``<group prefix><group id>.j/.t/.s/.d/.c``,
docs/canvas.md), so Celery and qops workers can finish each other's chords."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any

from qops.backends.base import ResultBackend
from qops.errors import BrokerUnreachable
from qops.transports.base import mask_password
from qops.transports.redis.url import parse_url, select_db


def _script(name: str) -> str:
    return resources.files("qops.backends").joinpath(name).read_text()


class RedisBackend(ResultBackend):
    @classmethod
    def check_url(cls, url: str) -> None:
        parse_url(url, "result backend URL")

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        import redis

        self._errors = (redis.ConnectionError, redis.TimeoutError, redis.AuthenticationError)
        self.client = redis.Redis.from_url(url, socket_connect_timeout=5,
                                           health_check_interval=30,
                                           redis_connect_func=select_db)
        self._store_script = self.client.register_script(_script("redis_store.lua"))
        self._part_script = self.client.register_script(_script("redis_chord_part.lua"))
        self._claim_script = self.client.register_script(_script("redis_chord_claim.lua"))

    def _key(self, task_id: str) -> str:
        return f"{self.prefix}{task_id}"

    def _call(self, fun: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fun(*args, **kwargs)
        except self._errors as exc:
            raise BrokerUnreachable(
                f"result backend {mask_password(self.url)} is unreachable: {exc}; "
                "check that Redis runs and the URL is right") from None

    def _get(self, task_id: str) -> bytes | None:
        data: bytes | None = self._call(self.client.get, self._key(task_id))
        return data

    def _store(self, task_id: str, data: bytes, state: str, *, reply_to: str | None) -> None:
        ttl = int(math.ceil(self.expires)) if self.expires else 0
        self._call(self._store_script, keys=[self._key(task_id)], args=[data, ttl])

    def _delete(self, task_id: str) -> None:
        self._call(self.client.delete, self._key(task_id))

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
    def _watch(self, task_id: str) -> Iterator[Callable[[float], None]]:
        # Subscribed before the first read: a result stored in between wakes us.
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            self._call(pubsub.subscribe, self._key(task_id))
            yield lambda seconds: self._call(pubsub.get_message, timeout=seconds)
        finally:
            pubsub.close()

    def close(self) -> None:
        self.client.close()
