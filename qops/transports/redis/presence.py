"""Which nodes are alive (the ``qops.nodes`` registry, one per preset, that remote
control and ``inspect`` read) and the named locks that let one beat run per schedule."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from qops.transports.redis.transport import RedisTransport

NODE_SWEEP_EVERY = 60.0  # seconds between live_nodes() calls that forget expired nodes


def _keys(t: RedisTransport) -> list[str]:
    """The registry's two keys: ``<registry>`` (zset: name -> alive until) and
    ``<registry>.info`` (hash: name -> JSON info); ``qops.nodes`` under the qops preset."""
    registry = t.options.registry
    return [t.key(registry), t.key(f"{registry}.info")]


def register_node(t: RedisTransport, name: str, info: dict[str, Any], ttl: float) -> None:
    keys = _keys(t)
    with t.guard("registering the node"):
        t._lua_register_node(keys=keys, args=[name, repr(float(ttl)),
                                              json.dumps(info, default=str)])


def unregister_node(t: RedisTransport, name: str) -> None:
    nodes, info = _keys(t)
    pipe = t._client.pipeline(transaction=True)
    pipe.zrem(nodes, name)
    pipe.hdel(info, name)
    with t.guard("unregistering the node"):
        pipe.execute()


def live_nodes(t: RedisTransport) -> list[str]:
    now = time.monotonic()
    sweep = now - t._nodes_swept >= NODE_SWEEP_EVERY
    with t.guard("listing live nodes"):
        names = cast("list[bytes]", t._lua_live_nodes(
            keys=_keys(t), args=["1" if sweep else "0"]))
    if sweep:
        t._nodes_swept = now
    return sorted(n.decode("utf-8", "replace") for n in names)


def acquire_lock(t: RedisTransport, name: str, owner: str, ttl: float) -> bool:
    """``SET NX PX`` takes it; the owner renews it with a script that checks the
    value, so a lock that expired and was taken by another is never renewed."""
    key = t.key(f"qops.lock.{name}")
    ms = max(1, int(ttl * 1000))
    with t.guard(f"taking the lock {name!r}"):
        if t._client.set(key, owner, nx=True, px=ms):
            return True
        return bool(t._lua_lock_renew(keys=[key], args=[owner, ms]))


def release_lock(t: RedisTransport, name: str, owner: str) -> None:
    with t.guard(f"releasing the lock {name!r}"):
        t._lua_lock_release(keys=[t.key(f"qops.lock.{name}")], args=[owner])
