"""RabbitMQ transport (AMQP 0-9-1 through ``pika``): ``amqp://user:pass@host:5672/vhost``.

Wire layout (docs/protocol.md §1, §3): tasks go through the default exchange ``""``
with routing key = queue name, ``delivery_mode`` 2, to durable queues declared as the
app's ``Declarations`` say (``qops.transports.declare``): under the celery preset as
Celery declares them, under the qops preset alone (no exchange), ``x-max-priority`` only
when ``task_queue_max_priority`` is set (qops's priority 9 = AMQP's highest with 9,
passed through as is).
Broadcasts go to a fanout exchange named after the channel (not durable, not
auto-deleted, like Celery's pidbox exchange); events (a broadcast with a routing key,
docs/protocol.md §5) to a topic exchange (durable, like Celery's ``celeryev``),
published without waiting for a publisher confirm. Exchanges someone declared otherwise
are used as they are. Dead letters live in a durable queue, ``qops.dlq`` unless
``?dead_letter_queue=NAME`` is in the URL.

Threads. A pika connection must only ever be used by one thread at a time; its one
thread-safe method is ``add_callback_threadsafe``. So:

- publishing (and the admin calls: purge, stats, dead letters) uses one connection per
  thread, kept in a ``threading.local`` and replaced on the next call after it is lost;
- each ``Consumer`` and ``Subscription`` owns its own connection, driven only by the
  thread calling ``get()``. ``ack``/``requeue``/``reject``/``add_queue``/``cancel_queue``
  from other threads only queue an operation (waking that thread if it is blocked),
  which it runs before it hands out the next message, settlements in one batch and one
  flush (and ``close()`` runs them before closing).

Reply queues (``reply_consumer``) are declared by their consumer on its own connection:
not durable, exclusive, auto-delete, with docs/protocol.md §4's ``x-expires`` 10000 and
``x-message-ttl`` 300000, so RabbitMQ deletes them when that connection closes or dies.
``send_reply`` publishes to the default exchange, not mandatory: a reply to a queue that
is gone is dropped by the broker (and still confirmed), which is right for replies.
With an exchange (``reply.<mailbox>``) the queue is also bound to it, as kombu binds
its pidbox reply queues, so Celery workers' replies reach it.

Live nodes: one consumer per node on the presence queue ``qops.nodes`` (the celery
preset's: ``qops.nodes.celery``; see ``presence``).

Liveness: RabbitMQ redelivers a consumer's unacknowledged messages as soon as its
connection drops (the process died, or it missed AMQP heartbeats), so
``Consumer.heartbeat()`` and ``Transport.recover()`` have nothing to do here.

URL query options: see ``url``.

Modules, one concept each:

- ``transport``: ``AMQPTransport``, the Transport interface; publishing and the admin
  calls on one connection per thread; delegates the concerns below;
- ``url``: the broker URL (``parse_url``, ``AMQPParams``) and its options;
- ``link``: opening a connection, ``_Link`` (a connection, its channels, declarations),
  the reply codes and errors acted on;
- ``frames``: the fast decoder for the frames of a delivery;
- ``props``: ``Message`` <-> AMQP properties and header values;
- ``consumer``: ``_AMQPConsumer`` (work and reply queues; prefetch and settlements);
- ``subscription``: ``_AMQPSubscription`` (broadcasts, events);
- ``deadletters``: the dead-letter queue and its ``x-qops-*`` headers;
- ``presence``: the live-node registry (the presence queue);
- ``locks``: locks as exclusive queues.

``qops.transports.amqp`` is what the TRANSPORTS registry names: it re-exports
``AMQPTransport`` and the names tests import.
"""

from qops.transports.amqp.frames import decode_frame
from qops.transports.amqp.transport import AMQPTransport
from qops.transports.amqp.url import DEAD_LETTER_QUEUE, AMQPParams, parse_url

__all__ = ["DEAD_LETTER_QUEUE", "AMQPParams", "AMQPTransport", "decode_frame", "parse_url"]
