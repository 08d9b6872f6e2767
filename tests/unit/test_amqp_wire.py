"""qops's own publish frames (qops/transports/amqp/wire.py) are exactly pika's."""

from __future__ import annotations

import datetime as dt
import decimal

import pika.frame
import pika.spec
import pytest

from qops import protocol
from qops.errors import PublishError
from qops.protocol import Message
from qops.transports.amqp.props import _basic_properties
from qops.transports.amqp.wire import encode_properties, publish_frames, short_string


def messages() -> list[Message]:
    full = protocol.build_task_message("proj.add", [1, 2], {"k": "é"}, priority=5,
                                       eta=dt.datetime(2030, 1, 2, 3, 4, 5),
                                       time_limit=30.0, soft_time_limit=2.5, reply_to="r")
    full.headers.update({
        "float": 1.5, "integral": 3.0, "huge": 2 ** 70, "long": 2 ** 40, "neg": -7,
        "nested": {"list": [1, (2, 3.25), None, True, "x"], "dec": decimal.Decimal("1.25")},
        "when": dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc), "raw": b"\x00\x01",
        "inf": float("inf"), "empty": {}, "false": False})
    full.properties.update({"expiration": 1500, "timestamp": 1700000000.0, "app_id": "a",
                            "message_id": "m", "type": "t"})
    bare = Message(body=b"", headers={}, properties={}, content_type="", content_encoding="")
    return [full, protocol.build_task_message("x"), bare]


@pytest.mark.parametrize("index", range(3))
def test_properties_are_pikas_bytes(index: int) -> None:
    m = messages()[index]
    for mode in (1, 2):
        assert encode_properties(m, mode) == b"".join(_basic_properties(m, mode).encode())


@pytest.mark.parametrize("body", [b"", b"x" * 10, b"y" * 2500])
def test_publish_frames_are_pikas_frames(body: bytes) -> None:
    m = messages()[0]
    props = _basic_properties(m, 2)
    max_body = 1000
    want = [pika.frame.Method(7, pika.spec.Basic.Publish(exchange="ex", routing_key="rk",
                                                         mandatory=True)).marshal(),
            pika.frame.Header(7, len(body), props).marshal()]
    want += [pika.frame.Body(7, body[i:i + max_body]).marshal()
             for i in range(0, len(body), max_body)]
    got = publish_frames(7, short_string("ex", "e"), short_string("rk", "r"), body,
                         encode_properties(m, 2), True, max_body)
    assert got == b"".join(want)


def test_what_amqp_cannot_carry_is_refused_before_sending() -> None:
    m = protocol.build_task_message("x")
    m.headers["stamps"] = {"deep": [{"bad": {1, 2}}]}
    with pytest.raises(PublishError, match=r"'stamps.deep.bad' holds a set"):
        encode_properties(m, 2)
    m = protocol.build_task_message("x")
    m.headers["k" * 300] = 1
    with pytest.raises(PublishError, match="255 bytes"):
        encode_properties(m, 2)
    with pytest.raises(PublishError, match="255 bytes"):
        short_string("q" * 256, "routing key")

