"""A consumer's registration on Redis, which ``recover()`` and ``lua/restore.lua`` read
(qops/transports/redis/recovery.py):

- ``qops.alive.<cid>``: its heartbeat, ``<pid>@<host>`` with the heartbeat TTL;
- its id in the set ``qops.consumers``;
- the hash ``qops.consumer.<cid>``: ``queues`` (JSON), ``pid``, ``host``, and ``unseen``
  = 1 once a task ran in this process (solo, threads pools): when it is found dead,
  the restore gives its unwatched messages a worker-lost record (lost.py);
- ``qops.sources.<cid>``: every list it may hold messages from.

The consumer writes it at every check-in (``queue``, in the check-in's transaction)."""

from __future__ import annotations

import json
import os
import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qops.transports.redis.transport import RedisTransport


class Registration:
    """One consumer's registration (see the module doc)."""

    __slots__ = ("t", "cid", "alive_value", "unseen")

    def __init__(self, t: RedisTransport, cid: str) -> None:
        self.t = t
        self.cid = cid
        self.alive_value = f"{os.getpid()}@{socket.gethostname()}"
        self.unseen = False  # registered as unseen (mark_unseen went through)

    def queue(self, pipe: Any, queues: list[str], used: list[str]) -> None:
        """Queue the registration on ``pipe``: the alive key, the consumer set, the hash
        (its HSET's reply, the fourth, counts the fields it added: none unless a
        restore deleted the hash) and the sources. If a late heartbeat let recover()
        unregister this consumer, registering again keeps new reservations
        recoverable."""
        t, cid = self.t, self.cid
        ttl_ms = max(1, int(t.options.heartbeat_ttl * 1000))
        pipe.set(t.key(f"qops.alive.{cid}"), self.alive_value, px=ttl_ms)
        pipe.sadd(t.key("qops.consumers"), cid)
        info: dict[str, str | int] = {"queues": json.dumps(queues), "pid": os.getpid(),
                                      "host": socket.gethostname()}
        if self.unseen:
            info["unseen"] = 1
        pipe.hset(t.key(f"qops.consumer.{cid}"), mapping=info)
        pipe.sadd(t.key(f"qops.sources.{cid}"), *used)

    def mark_unseen(self) -> None:
        """Register as ``unseen`` now (one round trip): a task is about to run in this
        process. ``unseen`` is set only once Redis has it, so that the next check-in's
        HSET adds no field (which would read as a restore)."""
        t = self.t
        with t.guard("registering the consumer"):
            t._client.hset(t.key(f"qops.consumer.{self.cid}"), "unseen", 1)
        self.unseen = True
