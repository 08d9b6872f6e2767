"""Redis transport (see ``transport.py`` for the wire layout).

The package re-exports what the rest of qops and the tests import from
``qops.transports.redis``; the TRANSPORTS registry names ``RedisTransport`` here."""

from qops.transports.redis.transport import (
    RedisConsumer,
    RedisReplyConsumer,
    RedisSubscription,
    RedisTransport,
    split_url,
    topic_glob,
)

__all__ = [
    "RedisConsumer",
    "RedisReplyConsumer",
    "RedisSubscription",
    "RedisTransport",
    "split_url",
    "topic_glob",
]
