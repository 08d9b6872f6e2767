"""Beat's lock for Redis and RabbitMQ, to be pasted into the transports. NOT imported.

Each function below is a method body written against the transport's current
internals; paste it into the class named, renaming ``redis_acquire_lock`` ->
``acquire_lock`` and so on. The contract is in ``Transport.acquire_lock`` (base.py):
True when ``owner`` holds the lock now; the holder calls it again to renew.

Redis -> qops/transports/redis.py, class RedisTransport
    - module level: the two Lua scripts ``LOCK_RENEW_LUA`` and ``LOCK_RELEASE_LUA``
      (or put them in ``redis_lock_renew.lua`` / ``redis_lock_release.lua`` next to the
      others and load them with ``_load_script`` in ``__init__``:
      ``self._lua_lock_renew = self._client.register_script(...)``; the functions below
      register them lazily so they work either way);
    - methods: ``redis_acquire_lock`` -> ``acquire_lock``, ``redis_release_lock`` ->
      ``release_lock``.
    Key: ``<prefix>qops.lock.<name>`` holding the owner, with a PX expiry of ``ttl``.
    Take: ``SET key owner NX PX ttl``; renew (only by the owner): a script that checks
    the value and PEXPIREs; release: a script that checks the value and DELs.

RabbitMQ -> qops/transports/amqp.py, class AMQPTransport
    - in ``__init__``::

          self._held_locks: dict[str, tuple[str, _Link]] = {}  # name -> (owner, link)
          self._locks_mutex = threading.Lock()

    - in ``close()``, before ``self._presence.close()``::

          with self._locks_mutex:
              held, self._held_locks = list(self._held_locks.values()), {}
          for _owner, lock_link in held:
              lock_link.close()

    - methods: ``amqp_acquire_lock`` -> ``acquire_lock``, ``amqp_release_lock`` ->
      ``release_lock``.
    The lock is the exclusive queue ``qops.lock.<name>`` declared on a connection of its
    own that the holder keeps open: RabbitMQ answers RESOURCE_LOCKED (405) to anyone
    else declaring it, and deletes it the moment the holder's connection closes or dies
    (kill -9 included: the kernel closes the socket), so a standby takes over on its
    next try. ``ttl`` is not used; each renewal pumps the connection, which sends the
    AMQP heartbeats and notices a connection the broker dropped (then the lock is lost
    and False is returned unless it can be taken again at once).
"""

from __future__ import annotations

import os
from typing import Any

# ---------------------------------------------------------------------------------------
# Redis (paste into qops/transports/redis.py)
# ---------------------------------------------------------------------------------------

#: KEYS[1] lock key; ARGV[1] owner, ARGV[2] ttl in ms. 1 if the owner holds it (renewed).
LOCK_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

#: KEYS[1] lock key; ARGV[1] owner. Deletes the key only if the owner holds it.
LOCK_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def redis_acquire_lock(self: Any, name: str, owner: str, ttl: float) -> bool:
    """RedisTransport.acquire_lock: SET NX PX to take it, a script to renew it."""
    key = self.key(f"qops.lock.{name}")
    ms = max(1, int(ttl * 1000))
    with self.guard(f"taking the lock {name!r}"):
        if self._client.set(key, owner, nx=True, px=ms):
            return True
        renew = getattr(self, "_lua_lock_renew", None)
        if renew is None:
            renew = self._lua_lock_renew = self._client.register_script(LOCK_RENEW_LUA)
        return bool(renew(keys=[key], args=[owner, ms]))


def redis_release_lock(self: Any, name: str, owner: str) -> None:
    """RedisTransport.release_lock."""
    key = self.key(f"qops.lock.{name}")
    with self.guard(f"releasing the lock {name!r}"):
        release = getattr(self, "_lua_lock_release", None)
        if release is None:
            release = self._lua_lock_release = self._client.register_script(LOCK_RELEASE_LUA)
        release(keys=[key], args=[owner])


# ---------------------------------------------------------------------------------------
# RabbitMQ (paste into qops/transports/amqp.py; the names used below -- _Link,
# LINK_ERRORS, RESOURCE_LOCKED, pex, BrokerUnreachable, _channel_error, _reason -- are
# already defined or imported there)
# ---------------------------------------------------------------------------------------


def amqp_acquire_lock(self: Any, name: str, owner: str, ttl: float) -> bool:
    """AMQPTransport.acquire_lock: an exclusive queue on a connection of its own."""
    from qops.errors import BrokerUnreachable
    from qops.transports.amqp import (
        LINK_ERRORS,
        RESOURCE_LOCKED,
        _channel_error,
        _Link,
        _reason,
        pex,
    )

    queue = f"qops.lock.{name}"
    with self._locks_mutex:
        held = self._held_locks.get(name)
        if held is not None:
            held_owner, link = held
            alive = False
            if link.pid == os.getpid():
                try:
                    link.conn.process_data_events(0)  # heartbeats; notices a dead link
                    alive = bool(link.conn.is_open)
                except LINK_ERRORS:
                    alive = False
            if alive:
                return bool(held_owner == owner)
            # The connection is gone, and the queue with it: try to take it again.
            del self._held_locks[name]
            link.close()
        link = _Link(self.connect("lock"), confirm=False)
        try:
            link.admin().queue_declare(queue, durable=False, exclusive=True,
                                       auto_delete=False)
        except pex.ChannelClosedByBroker as exc:
            link.close()
            if exc.reply_code == RESOURCE_LOCKED:
                return False  # exclusive to another connection: someone holds it
            raise _channel_error(exc, f"taking the lock {name!r}", self.safe_url()) from None
        except LINK_ERRORS as exc:
            link.close()
            raise BrokerUnreachable(
                f"lost the connection to RabbitMQ at {self.safe_url()} while taking the "
                f"lock {name!r} ({_reason(exc)})") from None
        self._held_locks[name] = (owner, link)
        return True


def amqp_release_lock(self: Any, name: str, owner: str) -> None:
    """AMQPTransport.release_lock: closing the connection deletes the exclusive queue."""
    with self._locks_mutex:
        held = self._held_locks.get(name)
        if held is None or held[0] != owner:
            return
        del self._held_locks[name]
    held[1].close()
