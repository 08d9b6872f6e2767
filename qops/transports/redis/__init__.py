"""Redis transport: kombu's list layout on the wire, qops's own in-flight tracking.

Wire layout (docs/protocol.md section 2), shared with Celery/kombu so that tasks flow both ways:

- a queue is a list ``<queue>``; priority steps 3, 6, 9 live in ``<queue>\\x06\\x16<step>``.
  Producers LPUSH the JSON envelope, consumers take from the right (FIFO) and read the
  steps in order 0, 3, 6, 9 (on the wire step 0 runs first). qops's priority scale (9
  runs first) maps to the wire step ``9 - p`` floored to 0/3/6/9; unset goes to step 0.
- ``_kombu.binding.<queue>`` holds ``"<queue>\\x06\\x16\\x06\\x16<queue>"`` (kombu's layout
  for a queue bound to the exchange of the same name), so kombu and ``purge``/
  ``queue_stats`` can discover the queue.
- broadcasts go to the pub/sub channel ``/<db>.<channel>`` (remote control: subscribers
  SUBSCRIBE to exactly that), events to ``/<db>.<channel>/<routing key>`` (kombu's
  fanout_patterns layout, as Celery's ``/0.celeryev/worker.heartbeat``: subscribers
  PSUBSCRIBE ``/<db>.<channel>/<glob>`` and filter the routing keys by topic).

qops's own keys (never kombu's ``unacked``/``unacked_index``/``unacked_mutex``):

- ``qops.consumers``: set of registered consumer ids.
- ``qops.alive.<cid>``: heartbeat, TTL = heartbeat_ttl; gone = the consumer is dead.
- ``qops.consumer.<cid>``: hash (queues as JSON, pid, host; ``unseen``: registration.py).
- ``qops.sources.<cid>``: set of the list names the consumer took messages from.
- ``qops.unacked.<cid>/<list name>``: the messages taken from that list and not yet
  settled. Keeping one in-flight list per source list means a message always goes back
  exactly where it came from, without trusting what the payload says.
- ``qops.dlq`` (hash id -> JSON record) and ``qops.dlq.index`` (zset id by time).
- ``qops.nodes`` (zset node name -> alive until, unix time by the server's clock) and
  ``qops.nodes.info`` (hash node name -> JSON): the live-node registry.

Reply queues are plain lists ``<name>`` (kombu's layout for a reply to the default
exchange): ``send_reply`` LPUSHes and sets an EXPIRE of ``REPLY_TTL`` in one MULTI, so
a reply nobody reads is gone after that long; the reply consumer refreshes the EXPIRE
while it lives and deletes the list on ``close()``. They have no kombu binding and no
in-flight lists, so they never show up in ``queue_stats(None)``; a reply consumer opened
with an exchange and routing key also writes kombu's binding (``_kombu.binding.reply.
<mailbox>``) so that Celery nodes can reply to it, and ``queue_stats(None)`` skips the
``_kombu.binding.reply.*`` sets. A reply taken and not
yet acked lives only in the consumer: if that process dies, so does the one reader the
reply was for (AMQP's exclusive reply queues go the same way).

The optional URL query ``global_keyprefix=`` is prepended to every key and channel.

Taking a message and recording it in flight is one atomic step: the Lua script
``lua/reserve.lua`` moves a batch, and when nothing is ready the consumer waits with
BLMOVE (also atomic) on one list at a time, for a short slice, then checks all lists
again. Acks are queued and ride with the next reserve (same script, same round trip);
see ``RedisConsumer``. Lua scripts live in ``lua/*.lua`` in this package.

Modules: ``url`` (the URL: checks, ``global_keyprefix``, an out-of-range db), ``names``
(list, key and channel names, priority steps), ``link`` (RESP packing,
the raw connection of a consumer's get loop, the Lua scripts, unreachable errors),
``transport`` (``RedisTransport``), ``consumer`` (``RedisConsumer``: reserving, prefetch
and settlement), ``reply`` (``RedisReplyConsumer``), ``delivery`` (delivery tags and
envelope decoding, shared by both consumers), ``subscription`` (``RedisSubscription``), ``recovery`` (giving back a closed or dead
consumer's messages), ``stats`` (``queue_stats``), ``presence`` (live nodes, locks),
``deadletters`` (``qops.dlq``).

The package re-exports what the rest of qops and the tests import from
``qops.transports.redis``; the TRANSPORTS registry names ``RedisTransport`` here.
"""

from qops.transports.redis.consumer import RedisConsumer
from qops.transports.redis.names import topic_glob
from qops.transports.redis.reply import RedisReplyConsumer
from qops.transports.redis.subscription import RedisSubscription
from qops.transports.redis.transport import RedisTransport
from qops.transports.redis.url import split_url

__all__ = [
    "RedisConsumer",
    "RedisReplyConsumer",
    "RedisSubscription",
    "RedisTransport",
    "split_url",
    "topic_glob",
]
