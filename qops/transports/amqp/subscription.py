"""``_AMQPSubscription``: the AMQP transport's Subscription (broadcasts and events),
a queue of its own bound to the channel's fanout or topic exchange.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from qops.protocol import Message
from qops.transports.amqp.link import (
    LINK_ERRORS,
    PUMP_SLICE,
    _Link,
    _reason,
    link_error,
)
from qops.transports.amqp.props import _message
from qops.transports.base import Subscription

if TYPE_CHECKING:
    from qops.transports.amqp.transport import AMQPTransport

log = logging.getLogger(__name__)

#: queue arguments of a subscription's queue: like the pidbox worker queue
#: (docs/protocol.md §4), a broadcast nobody read within 5 minutes is stale
SUBSCRIPTION_ARGS = {"x-message-ttl": 300000}


class _AMQPSubscription(Subscription):
    """A server-named, exclusive, auto-delete queue bound to the channel's exchange, on
    a connection of its own: the fanout exchange without a pattern, else the topic
    exchange with the pattern as binding key. It is bound when the constructor
    returns, so nothing broadcast after subscribe() is missed. If the connection drops,
    get() makes a new queue (what was broadcast in between is lost: broadcasts are not
    stored)."""

    transport: AMQPTransport

    def __init__(self, transport: AMQPTransport, channel: str,
                 pattern: str | None = None) -> None:
        self.transport = transport
        self.channel = channel
        self.pattern = pattern
        self._buffer: deque[Message] = deque()
        self._io = threading.Lock()  # get() pumps in slices under it; close() takes it
        self._closed = False
        self._link: _Link | None = None
        self._connect()

    def _connect(self) -> None:
        link = _Link(self.transport.connect("subscriber"))
        try:
            link.declare_exchange(self.channel, "fanout" if self.pattern is None else "topic")
            ch = link.main()
            ok = ch.queue_declare("", exclusive=True, auto_delete=True,
                                  arguments=SUBSCRIPTION_ARGS)
            queue = ok.method.queue
            ch.queue_bind(queue, self.channel, self.pattern or "")
            # auto_ack: a broadcast lost with a dying subscriber is not worth redelivering
            ch.basic_consume(queue, self._on_message, auto_ack=True)
        except LINK_ERRORS as exc:
            link.close()
            raise link_error(exc, f"subscribing to {self.channel!r}",
                             self.transport.safe_url()) from None
        self._link = link

    def _on_message(self, _ch: Any, _method: Any, props: Any, body: bytes) -> None:
        self._buffer.append(_message(props, body))

    def get(self, timeout: float) -> Message | None:
        deadline = time.monotonic() + timeout
        while True:
            with self._io:
                if self._closed:
                    return None
                if self._buffer:
                    return self._buffer.popleft()
                left = deadline - time.monotonic()
                try:
                    if self._link is not None and not self._link.conn.is_open:
                        raise ConnectionError("connection closed")
                    if self._link is None:
                        self._connect()
                        continue
                    if left <= 0:
                        return None
                    self._link.conn.process_data_events(time_limit=min(left, PUMP_SLICE))
                except LINK_ERRORS as exc:
                    log.warning("subscription to %s lost its RabbitMQ connection (%s); "
                                "resubscribing", self.channel, _reason(exc))
                    link, self._link = self._link, None
                    if link is not None:
                        link.close()
                    if left <= 0:
                        return None

    def close(self) -> None:
        with self._io:
            self._closed = True
            link, self._link = self._link, None
            if link is not None:
                link.close()
            self._buffer.clear()
