"""Messages as AMQP carries them: ``Message`` <-> pika ``BasicProperties``, and the
header values AMQP field tables can hold (floats, big ints, tuples mapped both ways).

Used to publish (``_basic_properties``, ``_amqp_table``) and, per delivery, to read
(``_message``): keep the read side cheap.
"""

from __future__ import annotations

import math
from datetime import datetime
from decimal import Decimal
from typing import Any

import pika

from qops.errors import PublishError
from qops.protocol import JSON, Message

# -- header values --------------------------------------------------------------------
#
# pika's field-table encoder has no float (it raises), and its decoder turns AMQP doubles
# ('d', what py-amqp/Celery send for floats) into truncated ints. What we do:
#
# - a float with an integral value goes as an int (300.0 -> 300; what docs/protocol.md §4
#   asks for, e.g. the pidbox ``expires``);
# - any other float goes as an AMQP decimal ('D': 32-bit mantissa, with as many decimal
#   places as fit; a unix timestamp keeps whole seconds), and qops turns decimals back
#   into floats when it reads headers. A Celery worker reading such a header gets a
#   ``Decimal``: fine for Celery's headers in practice (time limits are ints or None);
# - tuples become lists, ints beyond 64 bits become strings; anything else AMQP can't
#   carry (sets, objects) raises PublishError *before* anything is sent: pika writes the
#   method frame before it encodes the headers, so a failing encode mid-publish would
#   leave a half-sent message and the broker would close the connection.

_INT32 = 2 ** 31
_INT64 = 2 ** 63


def _amqp_float(value: float) -> int | Decimal | str:
    if not math.isfinite(value):
        return repr(value)
    if value.is_integer():
        return int(value) if -_INT64 <= value < _INT64 else repr(value)
    places = max(0, -int(Decimal(repr(value)).as_tuple().exponent))
    while places > 0:
        raw = round(value * 10 ** places)
        if -_INT32 <= raw < _INT32:
            return Decimal(raw).scaleb(-places)
        places -= 1
    return int(round(value))


def _decimal_fits(value: Decimal) -> bool:
    sign, digits, exponent = value.normalize().as_tuple()
    if not isinstance(exponent, int):  # NaN / Infinity
        return False
    if exponent >= 0:
        return -_INT32 <= int(value) < _INT32
    return -exponent <= 255 and -_INT32 <= int(value.scaleb(-exponent)) < _INT32


def _amqp_value(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (str, bytes, bool, datetime)):
        return value
    if isinstance(value, int):
        return value if -_INT64 <= value < _INT64 else str(value)
    if isinstance(value, float):
        return _amqp_float(value)
    if isinstance(value, Decimal):
        return value if _decimal_fits(value) else _amqp_float(float(value))
    if isinstance(value, dict):
        return _amqp_table(value, where)
    if isinstance(value, (list, tuple)):
        return [_amqp_value(v, where) for v in value]
    raise PublishError(
        f"header {where!r} holds a {type(value).__name__}, which AMQP can't carry: "
        "use str, int, float, bool, None, list or dict")


def _amqp_table(table: dict[Any, Any], where: str = "") -> dict[str, Any]:
    out = {}
    for key, value in table.items():
        name = key if isinstance(key, str) else str(key)
        if len(name.encode("utf-8")) > 255:
            raise PublishError(f"header name {name[:40]!r}... is longer than AMQP's 255 bytes")
        out[name] = _amqp_value(value, f"{where}.{name}" if where else name)
    return out


def _from_amqp(value: Any) -> Any:
    """Undo the float -> decimal mapping above for values qops reads."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dict):
        return {k: _from_amqp(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_amqp(v) for v in value]
    return value


def _has_decimal(values: Any) -> bool:
    for v in values:
        t = type(v)
        if t is Decimal:
            return True
        if t is dict:
            if _has_decimal(v.values()):
                return True
        elif t is list and _has_decimal(v):
            return True
    return False


def _read_headers(headers: dict[str, Any] | None) -> dict[str, Any]:
    if not headers:
        return {}
    # Celery's headers hold lists and dicts (timelimit, stamps) but rarely a decimal:
    # rebuild them only when there is one to turn back into a float
    if _has_decimal(headers.values()):
        return {k: _from_amqp(v) for k, v in headers.items()}
    return headers


# -- message <-> AMQP properties -------------------------------------------------------

#: BasicProperties fields copied into Message.properties when set
_READ_PROPS = ("correlation_id", "reply_to", "priority", "delivery_mode", "expiration",
               "message_id", "type", "app_id", "timestamp")


def _expiration(value: Any) -> str | None:
    """AMQP per-message TTL: a string of whole milliseconds (kombu sends a string)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    return str(max(0, int(value)))


def _priority(value: Any) -> int | None:
    # qops's scale (0..9, 9 first) is AMQP's meaning: pass through, clamped to a byte
    return None if value is None else min(255, max(0, int(value)))


def _basic_properties(message: Message, delivery_mode: int) -> pika.BasicProperties:
    p = message.properties
    return pika.BasicProperties(
        content_type=message.content_type or None,
        content_encoding=message.content_encoding or None,
        headers=_amqp_table(message.headers) if message.headers else None,
        delivery_mode=int(p.get("delivery_mode") or delivery_mode),
        priority=_priority(p.get("priority")),
        correlation_id=p.get("correlation_id"),
        reply_to=p.get("reply_to"),
        expiration=_expiration(p.get("expiration")),
        message_id=p.get("message_id"),
        type=p.get("type"),
        app_id=p.get("app_id"),
        timestamp=int(p["timestamp"]) if p.get("timestamp") is not None else None,
    )


def _message(props: Any, body: bytes) -> Message:
    attrs = props.__dict__
    properties = {name: attrs[name] for name in _READ_PROPS if attrs.get(name) is not None}
    return Message(body=body, headers=_read_headers(props.headers), properties=properties,
                   content_type=props.content_type or JSON,
                   content_encoding=props.content_encoding or "utf-8")
