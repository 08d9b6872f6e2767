"""Giving back what consumers hold in flight: ``restore`` moves one consumer's in-flight
lists back onto their queues and unregisters it (on close, or when it is dead);
``recover`` does it for every registered consumer whose heartbeat expired. The consumers
write their registration themselves (``RedisConsumer.heartbeat``)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, cast

from qops.transports.redis.lost import LOST_TTL

if TYPE_CHECKING:
    from qops.transports.redis.transport import RedisTransport

log = logging.getLogger(__name__)


def consumer_ids(t: RedisTransport) -> list[str]:
    members = cast("set[bytes]", t._client.smembers(t.key("qops.consumers")))
    return sorted(m.decode() for m in members)


def recover(t: RedisTransport) -> int:
    """Give back the messages of every registered consumer whose heartbeat expired.

    The liveness check is repeated inside the Lua script, so a consumer that beats
    between the check here and the move keeps its messages."""
    client = t._client
    with t.guard("recovering messages of dead consumers"):
        cids = consumer_ids(t)
        if not cids:
            return 0
        pipe = client.pipeline(transaction=False)
        for cid in cids:
            pipe.exists(t.key(f"qops.alive.{cid}"))
        alive = pipe.execute()
        total = 0
        for cid, is_alive in zip(cids, alive, strict=True):
            if is_alive:
                continue
            n = int(restore(t, cid, only_if_dead=True))
            if n > 0:
                log.warning("consumer %s stopped beating: %d message(s) put back on "
                            "their queues", cid, n)
            if n >= 0:
                total += n
        return total


def restore(t: RedisTransport, cid: str, only_if_dead: bool, client: Any = None) -> int:
    """Give back what consumer ``cid`` holds in flight and unregister it; -1 (nothing
    done) when ``only_if_dead`` and it is alive. A dead consumer's unwatched messages
    get a worker-lost record (``lua/restore.lua``; qops/transports/redis/lost.py). With
    ``client`` (a pipeline), the script is only queued there and its reply is the
    pipeline's."""
    keys = [t.key("qops.consumers"), t.key(f"qops.alive.{cid}"),
            t.key(f"qops.sources.{cid}"), t.key(f"qops.consumer.{cid}")]
    args = [cid, t.prefix, "1" if only_if_dead else "0", LOST_TTL]
    if client is not None:
        t._lua_restore(keys=keys, args=args, client=client)
        return 0
    return int(t._lua_restore(keys=keys, args=args))
