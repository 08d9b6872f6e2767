"""Frame decoding for the connections qops opens: ``decode_frame`` (a faster
``pika.frame.decode_frame`` for the frames of a delivery) and ``_fast_frames``, which
plugs it into a connection. This is the per-message read path: keep it lean.

pika decodes every frame in pure Python, and its field-table decoder (an if/elif chain
over 17 type codes, a struct call per value) made up most of the CPU a worker spent on
a task message's headers: ~20 us per message, for Celery's ~20 headers. Connections
qops opens read content-header frames of class Basic (and basic.deliver method frames)
with the decoders below instead: the same objects with the same values as pika's
(down to its quirks: doubles and floats truncated to ints, undecodable strings kept as
bytes), in about a quarter of the time. Every other frame goes to pika's decode_frame.

``deliveries`` goes one step further for a consumer's own channel (rawio.py): it takes
whole deliveries (method, header and body frames) off the bytes read from the socket,
with none of pika's frame buffer, channel dispatch or events in between.
"""

from __future__ import annotations

from collections.abc import Container
from datetime import datetime, timezone
from decimal import Decimal
from struct import Struct
from typing import Any

import pika.exceptions as pex
import pika.frame
import pika.spec

_U8 = Struct(">B")
_I8 = Struct(">b")
_I16 = Struct(">h")
_U16 = Struct(">H")
_I32 = Struct(">i")
_U32 = Struct(">I")
_I64 = Struct(">q")
_U64 = Struct(">Q")
_F32 = Struct(">f")
_F64 = Struct(">d")
_FRAME_START = Struct(">BHL")  # type, channel, size
_METHOD_START = Struct(">BHLL")  # type, channel, size, class and method id
_HEADER_START = Struct(">HHQ")  # class id, weight, body size
_DELIVER_ID = 0x003C003C  # Basic.Deliver
_BASIC = 60
_FRAME_END = 0xCE

_P = pika.spec.BasicProperties
#: BasicProperties fields in wire order: (flag, attribute, short string?), after headers
_PROP_FIELDS = (
    (_P.FLAG_CORRELATION_ID, "correlation_id"), (_P.FLAG_REPLY_TO, "reply_to"),
    (_P.FLAG_EXPIRATION, "expiration"), (_P.FLAG_MESSAGE_ID, "message_id"),
)
_PROP_TAIL = (
    (_P.FLAG_TYPE, "type"), (_P.FLAG_USER_ID, "user_id"), (_P.FLAG_APP_ID, "app_id"),
    (_P.FLAG_CLUSTER_ID, "cluster_id"),
)


def _short_str(buf: bytes, offset: int) -> tuple[Any, int]:
    end = offset + 1 + buf[offset]
    raw = buf[offset + 1:end]
    try:
        return raw.decode("utf8"), end
    except UnicodeDecodeError:
        return raw, end


def _table(buf: bytes, offset: int) -> tuple[dict[Any, Any], int]:
    result: dict[Any, Any] = {}
    end = offset + 4 + _U32.unpack_from(buf, offset)[0]
    offset += 4
    while offset < end:
        key_end = offset + 1 + buf[offset]
        raw = buf[offset + 1:key_end]
        try:
            key: Any = raw.decode("utf8")
        except UnicodeDecodeError:
            key = raw
        kind = buf[key_end]
        # the kinds most headers have (Celery's: strings and nulls), inline
        if kind == 0x53:  # S
            offset = key_end + 5 + _U32.unpack_from(buf, key_end + 1)[0]
            raw = buf[key_end + 5:offset]
            try:
                result[key] = raw.decode("utf8")
            except UnicodeDecodeError:
                result[key] = raw
        elif kind == 0x56:  # V
            result[key] = None
            offset = key_end + 1
        else:
            result[key], offset = _value(buf, key_end)
    return result, offset


def _value(buf: bytes, offset: int) -> tuple[Any, int]:  # noqa: C901 - one branch a type
    """One field value, exactly as ``pika.data.decode_value`` returns it."""
    kind = buf[offset]
    offset += 1
    if kind == 0x53:  # S: long string
        end = offset + 4 + _U32.unpack_from(buf, offset)[0]
        raw = buf[offset + 4:end]
        try:
            return raw.decode("utf8"), end
        except UnicodeDecodeError:
            return raw, end
    if kind == 0x56:  # V: void
        return None, offset
    if kind == 0x74:  # t: boolean
        return bool(buf[offset]), offset + 1
    if kind == 0x46:  # F: table
        return _table(buf, offset)
    if kind == 0x41:  # A: array
        end = offset + 4 + _U32.unpack_from(buf, offset)[0]
        offset += 4
        items = []
        while offset < end:
            item, offset = _value(buf, offset)
            items.append(item)
        return items, offset
    if kind == 0x6C or kind == 0x4C:  # l, L: 64-bit signed
        return _I64.unpack_from(buf, offset)[0], offset + 8
    if kind == 0x49:  # I: 32-bit signed
        return _I32.unpack_from(buf, offset)[0], offset + 4
    if kind == 0x69:  # i: 32-bit unsigned
        return _U32.unpack_from(buf, offset)[0], offset + 4
    if kind == 0x62:  # b
        return _I8.unpack_from(buf, offset)[0], offset + 1
    if kind == 0x42:  # B
        return buf[offset], offset + 1
    if kind == 0x55 or kind == 0x73:  # U, s: 16-bit signed
        return _I16.unpack_from(buf, offset)[0], offset + 2
    if kind == 0x75:  # u
        return _U16.unpack_from(buf, offset)[0], offset + 2
    if kind == 0x66:  # f (pika truncates it to an int)
        return int(_F32.unpack_from(buf, offset)[0]), offset + 4
    if kind == 0x64:  # d (pika truncates it to an int)
        return int(_F64.unpack_from(buf, offset)[0]), offset + 8
    if kind == 0x44:  # D: decimal
        places = buf[offset]
        raw_int = _I32.unpack_from(buf, offset + 1)[0]
        return Decimal(raw_int) * (Decimal(10) ** -places), offset + 5
    if kind == 0x78:  # x: byte array
        end = offset + 4 + _U32.unpack_from(buf, offset)[0]
        return buf[offset + 4:end], end
    if kind == 0x54:  # T: timestamp
        return datetime.fromtimestamp(_U64.unpack_from(buf, offset)[0], timezone.utc), \
            offset + 8
    raise pex.InvalidFieldTypeException(bytes((kind,)))


def _properties(buf: bytes, offset: int) -> Any:
    """BasicProperties from a content header's property list, as pika decodes them."""
    flags = 0
    word = 0
    while True:
        partial = _U16.unpack_from(buf, offset)[0]
        offset += 2
        flags |= partial << (word * 16)
        if not partial & 1:
            break
        word += 1
    props = _P()
    if flags & _P.FLAG_CONTENT_TYPE:
        props.content_type, offset = _short_str(buf, offset)
    if flags & _P.FLAG_CONTENT_ENCODING:
        props.content_encoding, offset = _short_str(buf, offset)
    if flags & _P.FLAG_HEADERS:
        props.headers, offset = _table(buf, offset)
    if flags & _P.FLAG_DELIVERY_MODE:
        props.delivery_mode = buf[offset]
        offset += 1
    if flags & _P.FLAG_PRIORITY:
        props.priority = buf[offset]
        offset += 1
    for flag, name in _PROP_FIELDS:
        if flags & flag:
            value, offset = _short_str(buf, offset)
            setattr(props, name, value)
    if flags & _P.FLAG_TIMESTAMP:
        props.timestamp = _U64.unpack_from(buf, offset)[0]
        offset += 8
    for flag, name in _PROP_TAIL:
        if flags & flag:
            value, offset = _short_str(buf, offset)
            setattr(props, name, value)
    return props


def _deliver(data: bytes, start: int) -> tuple[Any, int, bool, Any, Any]:
    """A basic.deliver method frame's arguments, the frame at ``start`` (whole): consumer
    tag, delivery tag, redelivered, exchange, routing key."""
    consumer_tag, offset = _short_str(data, start + 11)
    delivery_tag = _U64.unpack_from(data, offset)[0]
    redelivered = bool(data[offset + 8] & 1)
    exchange, offset = _short_str(data, offset + 9)
    return consumer_tag, delivery_tag, redelivered, exchange, _short_str(data, offset)[0]


def decode_frame(data: bytes) -> tuple[int, Any]:
    """``pika.frame.decode_frame``, faster for the frames of a delivery (see above)."""
    if len(data) < 7:
        return 0, None
    kind, channel, size = _FRAME_START.unpack_from(data)
    end = size + 8
    if kind == pika.spec.FRAME_HEADER and end <= len(data) and data[end - 1] == _FRAME_END:
        class_id, _weight, body_size = _HEADER_START.unpack_from(data, 7)
        if class_id == _BASIC:
            return end, pika.frame.Header(channel, body_size, _properties(data, 19))
    elif kind == pika.spec.FRAME_METHOD and end <= len(data) and data[end - 1] == _FRAME_END \
            and size >= 4 and _U32.unpack_from(data, 7)[0] == _DELIVER_ID:
        return end, pika.frame.Method(channel, pika.spec.Basic.Deliver(*_deliver(data, 0)))
    return pika.frame.decode_frame(data)


#: (consumer tag, delivery tag, redelivered, routing key, BasicProperties, body)
Deliver = tuple[str, int, bool, str, Any, bytes]


def deliveries(data: bytes, channel: int, tags: Container[str]) -> tuple[list[Deliver], int,
                                                                         int]:
    """The whole deliveries (a basic.deliver frame for one of ``tags``, its content header
    and body frames) on ``channel`` at the start of ``data``, the bytes they take and
    their number of frames. Stops at the first frame that is anything else, or at a
    delivery not all in ``data``: what follows is pika's to read."""
    out: list[Deliver] = []
    start = frames = 0
    size = len(data)
    while size - start >= 12:
        kind, ch, length, method_id = _METHOD_START.unpack_from(data, start)
        end = start + length + 8
        if kind != 1 or ch != channel or method_id != _DELIVER_ID or end > size \
                or data[end - 1] != _FRAME_END:
            break
        consumer_tag, delivery_tag, redelivered, _exchange, routing_key = _deliver(data, start)
        if consumer_tag not in tags:
            break  # cancelled: pika knows what to do with it
        if size - end < 19:
            break
        kind, ch, length = _FRAME_START.unpack_from(data, end)
        head_end = end + length + 8
        if kind != 2 or ch != channel or head_end > size or data[head_end - 1] != _FRAME_END:
            break
        class_id, _weight, body_size = _HEADER_START.unpack_from(data, end + 7)
        if class_id != _BASIC:
            break
        parts = []
        got = 0
        pos = head_end
        while got < body_size and size - pos >= 8:
            kind, ch, length = _FRAME_START.unpack_from(data, pos)
            part_end = pos + length + 8
            if kind != 3 or ch != channel or part_end > size or data[part_end - 1] != _FRAME_END:
                break
            parts.append(data[pos + 7:part_end - 1])
            got += length
            pos = part_end
        if got != body_size:
            break
        out.append((consumer_tag, delivery_tag, redelivered, routing_key,
                    _properties(data, end + 19), b"".join(parts) if len(parts) != 1 else parts[0]))
        frames += 2 + len(parts)
        start = pos
    return out, start, frames


def _fast_frames(conn: Any) -> Any:
    """Make ``conn`` (a BlockingConnection) read frames with ``decode_frame``. Only if
    this pika has the hook we use (``Connection._read_frame``, pika 1.x): else as is."""
    impl = getattr(conn, "_impl", None)
    if impl is not None and callable(getattr(impl, "_read_frame", None)) and \
            hasattr(impl, "_frame_buffer"):
        impl._read_frame = _FrameReader(impl)
    return conn


class _FrameReader:
    """``Connection._read_frame`` for one connection (its frame buffer, our decoder)."""

    __slots__ = ("impl",)

    def __init__(self, impl: Any) -> None:
        self.impl = impl

    def __call__(self) -> tuple[int, Any]:
        return decode_frame(self.impl._frame_buffer)
