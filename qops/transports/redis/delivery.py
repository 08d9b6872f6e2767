"""What both Redis consumers hand out: the delivery tag, and ``decode``, Redis's decoder
for ``base.make_delivery`` (on the per-message path of ``get``)."""

from __future__ import annotations

from typing import NamedTuple

from qops.errors import UsageError
from qops.protocol import Message, decode_envelope
from qops.transports.base import Delivery
from qops.transports.redis.names import qops_priority


class Tag(NamedTuple):
    """Delivery.tag: which hand-out of this consumer, the list it was taken from, and the
    consumer's epoch then (see qops/transports/lease.py). A tuple: made for every
    message, and a frozen dataclass's ``__init__`` costs three ``object.__setattr__``."""

    seq: int
    name: str
    epoch: int = 0


def tag_of(delivery: Delivery) -> Tag:
    """``delivery``'s tag; UsageError when no Redis consumer handed it out."""
    tag = delivery.tag
    if not isinstance(tag, Tag):
        raise UsageError(f"delivery {tag!r} was not reserved by a Redis consumer")
    return tag


def decode(raw: bytes) -> Message:
    """The kombu envelope, its priority (the wire step) turned into qops's scale."""
    msg = decode_envelope(raw)
    if "priority" in msg.properties:
        msg.properties["priority"] = qops_priority(msg.properties["priority"])
    return msg
