"""``RedisSubscription``: broadcasts over pub/sub, on kombu's fanout channel names (see the
package doc)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import redis

from qops.errors import BrokerUnreachable
from qops.protocol import Message, decode_envelope
from qops.transports.base import Subscription, one_line, topic_matches
from qops.transports.redis.names import glob_escape, topic_glob

if TYPE_CHECKING:
    from qops.transports.redis.transport import RedisTransport

log = logging.getLogger(__name__)


class RedisSubscription(Subscription):
    """Without a pattern, SUBSCRIBE to exactly ``/<db>.<channel>`` (kombu's fanout
    channel); with one, PSUBSCRIBE to ``/<db>.<channel>/<glob>`` (kombu's fanout_patterns
    layout, Celery's events) and keep the routing keys that match the topic ``pattern``.
    Has its own connection for as long as it lives."""

    def __init__(self, transport: RedisTransport, channel: str,
                 pattern: str | None = None) -> None:
        self.transport = transport
        self.channel = channel
        self.pattern = pattern
        self._base = transport.channel_name(channel)
        self._pubsub = transport._client.pubsub()
        try:
            self._confirm()
        except BaseException:
            self.close()  # give its connection back to the pool
            raise

    def _confirm(self) -> None:
        transport, channel = self.transport, self.channel
        with transport.guard(f"subscribing to {channel!r}"):
            if self.pattern is None:
                self._pubsub.subscribe(self._base)
                expect = "subscribe"
            else:
                self._pubsub.psubscribe(
                    glob_escape(self._base) + "/" + topic_glob(self.pattern))
                expect = "psubscribe"
            self._quiet_push_handler()
            # Wait for the confirmation: broadcasts sent after subscribe() returns must
            # reach us, and Redis only routes them once it has processed the command.
            deadline = time.monotonic() + transport.options.connect_timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrokerUnreachable(
                        f"Redis broker {transport.safe_url()} did not confirm the "
                        f"subscription to {channel!r} within {transport.options.connect_timeout}s; "
                        "check the server's load and the network")
                m = self._pubsub.get_message(timeout=left)
                if m is not None and m["type"] == expect:
                    break

    def _quiet_push_handler(self) -> None:
        """On RESP3, redis-py's default handler of pub/sub messages builds a debug log
        line from each whole message (``str(response)``) whether or not it is logged:
        that repr was most of the cost of following events. Take messages as they are
        (also on the connections redis-py makes when it reconnects)."""
        parser = getattr(self._pubsub.connection, "_parser", None)
        if parser is not None and hasattr(parser, "set_pubsub_push_handler"):
            self._pubsub.push_handler_func = _as_is
            parser.set_pubsub_push_handler(_as_is)

    def _wanted(self, m: dict[str, Any]) -> bool:
        if m["type"] == "message":
            return self.pattern is None
        if m["type"] != "pmessage" or self.pattern is None:
            return False
        name = m["channel"]
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        head = self._base + "/"
        return name.startswith(head) and topic_matches(self.pattern, name[len(head):])

    def get(self, timeout: float) -> Message | None:
        deadline = time.monotonic() + max(0.0, timeout)
        with self.transport.guard(f"listening on {self.channel!r}"):
            while True:
                left = deadline - time.monotonic()
                m = self._pubsub.get_message(ignore_subscribe_messages=True,
                                             timeout=max(0.0, left))
                if m is not None and self._wanted(m):
                    try:
                        return decode_envelope(m["data"])
                    except Exception as exc:  # a bad broadcast must not stop the listener
                        log.warning("dropping malformed broadcast on %r: %s", self.channel,
                                    one_line(exc))
                if left <= 0:
                    return None

    def close(self) -> None:
        try:
            self._pubsub.close()
        except redis.RedisError:  # closing a broken connection: nothing left to release
            pass


def _as_is(response: Any) -> Any:
    return response
