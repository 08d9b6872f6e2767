"""Worker-lost accounting on Redis: one small hash per message that a worker started
(``qops.lost.<sha1 of the payload>``, docs/protocol.md section 2).

``mark_started`` writes ``running`` = the consumer id when an acks_late task starts
(one round trip); ``lua/worker_lost.lua`` turns a start that was never settled (or a
death the worker saw) into ``count`` + 1; the consumer deletes the hash when it acks
or dead-letters the message (the delete rides with the ack's round trip). A message's
payload does not change when it is given back or recovered, so every node finds the
same hash. Each write sets an expiry of ``LOST_TTL``: the record of a message that is
gone (purged, or its hash left behind by a crash) does not stay."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qops.transports.redis.transport import RedisTransport

#: seconds a worker-lost record is kept after its last change
LOST_TTL = 7 * 86400


def lost_key(t: RedisTransport, raw: bytes) -> str:
    return t.key("qops.lost." + hashlib.sha1(raw).hexdigest())


def mark_started(t: RedisTransport, cid: str, raw: bytes) -> None:
    key = lost_key(t, raw)
    pipe = t._client.pipeline(transaction=True)
    pipe.hset(key, "running", cid)
    pipe.expire(key, LOST_TTL)
    with t.guard("recording a task start"):
        pipe.execute()


def count(t: RedisTransport, raw: bytes, died: bool) -> tuple[int, bool]:
    with t.guard("counting a lost worker"):
        n, new = t._lua_worker_lost(keys=[lost_key(t, raw)],
                                    args=["1" if died else "0", LOST_TTL])
    return int(n), bool(new)
