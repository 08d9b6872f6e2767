"""Locks on RabbitMQ (one beat per schedule): the lock ``name`` is the exclusive queue
``qops.lock.<name>`` on a connection of its own that the holder keeps open.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

import pika.exceptions as pex

from qops.errors import BrokerUnreachable
from qops.transports.amqp.link import (
    LINK_ERRORS,
    RESOURCE_LOCKED,
    _channel_error,
    _Link,
    lost_text,
)

if TYPE_CHECKING:
    from qops.transports.amqp.transport import AMQPTransport


class _Locks:
    """The locks this transport holds: name -> (owner, the connection holding the
    lock's exclusive queue). Used from any thread (``_mutex``)."""

    def __init__(self, transport: AMQPTransport) -> None:
        self.transport = transport
        self._mutex = threading.Lock()
        self._held: dict[str, tuple[str, _Link]] = {}  # name -> (owner, link)

    def acquire(self, name: str, owner: str) -> bool:
        """The lock is the exclusive queue ``qops.lock.<name>`` on a connection of its own
        that the holder keeps open: RabbitMQ answers RESOURCE_LOCKED to anyone else, and
        deletes the queue the moment the holder's connection dies (kill -9 included), so
        a standby takes over on its next try. Each renewal pumps the connection (AMQP
        heartbeats) and notices one the broker dropped."""
        queue = f"qops.lock.{name}"
        with self._mutex:
            held = self._held.get(name)
            if held is not None:
                held_owner, link = held
                alive = False
                if link.pid == os.getpid():
                    try:
                        link.conn.process_data_events(0)
                        alive = bool(link.conn.is_open)
                    except LINK_ERRORS:
                        alive = False
                if alive:
                    return bool(held_owner == owner)
                del self._held[name]  # the connection is gone, and the queue with it
                link.close()
            link = _Link(self.transport.connect("lock"))
            try:
                link.admin().queue_declare(queue, durable=False, exclusive=True,
                                           auto_delete=False)
            except pex.ChannelClosedByBroker as exc:
                link.close()
                if exc.reply_code == RESOURCE_LOCKED:
                    return False  # exclusive to another connection: someone holds it
                raise _channel_error(exc, f"taking the lock {name!r}",
                                     self.transport.safe_url()) from None
            except LINK_ERRORS as exc:
                link.close()
                raise BrokerUnreachable(lost_text(self.transport.safe_url(),
                                                  f"taking the lock {name!r}", exc)) from None
            self._held[name] = (owner, link)
            return True

    def release(self, name: str, owner: str) -> None:
        """Closing the connection deletes the exclusive queue."""
        with self._mutex:
            held = self._held.get(name)
            if held is None or held[0] != owner:
                return
            del self._held[name]
        held[1].close()

    def close(self) -> None:
        """Let every lock go: closing a connection deletes its exclusive queue."""
        with self._mutex:
            held, self._held = list(self._held.values()), {}
        for _owner, lock_link in held:
            lock_link.close()
