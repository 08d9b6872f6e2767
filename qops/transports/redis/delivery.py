"""What both Redis consumers hand out: the delivery tag, and the decoding of a raw
envelope into a ``Delivery`` (on the per-message path of ``get``)."""

from __future__ import annotations

from dataclasses import dataclass

from qops.protocol import decode_envelope
from qops.transports.base import Delivery
from qops.transports.redis.link import one_line
from qops.transports.redis.names import SEP, qops_priority


@dataclass(frozen=True)
class Tag:
    """Delivery.tag: which hand-out of this consumer, and the list it was taken from."""

    seq: int
    name: str


def make_delivery(name: str, raw: bytes, tag: Tag) -> Delivery:
    d = Delivery(queue=name.split(SEP, 1)[0], tag=tag, raw=raw)
    try:
        msg = decode_envelope(raw)
    except ValueError as exc:
        d.error = str(exc)
        return d
    except Exception as exc:  # e.g. RecursionError on absurdly nested JSON: never crash get()
        d.error = f"undecodable envelope: {one_line(exc)}"
        return d
    if "priority" in msg.properties:
        msg.properties["priority"] = qops_priority(msg.properties["priority"])
    d.message = msg
    return d
