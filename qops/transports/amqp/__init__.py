"""The RabbitMQ transport (AMQP 0-9-1 through ``pika``), a package: see ``transport``.

``qops.transports.amqp`` is what the TRANSPORTS registry names; it re-exports the
transport class and the names other modules and tests import from here.
"""

from qops.transports.amqp.frames import decode_frame
from qops.transports.amqp.transport import AMQPTransport
from qops.transports.amqp.url import DEAD_LETTER_QUEUE, AMQPParams, parse_url

__all__ = ["DEAD_LETTER_QUEUE", "AMQPParams", "AMQPTransport", "decode_frame", "parse_url"]
