"""The RabbitMQ transport (AMQP 0-9-1 through ``pika``), a package: see ``transport``.

``qops.transports.amqp`` is what the TRANSPORTS registry names; it re-exports the
transport class and the names other modules and tests import from here.
"""

from qops.transports.amqp.transport import (
    AMQPParams,
    AMQPTransport,
    decode_frame,
    parse_url,
)
from qops.transports.amqp.transport import (
    _basic_properties as _basic_properties,  # for the tests
)

__all__ = ["AMQPParams", "AMQPTransport", "decode_frame", "parse_url"]
