"""A task message's AMQP property list from its TaskMessages's template
(qops/transports/amqp/template.py) is, byte for byte, what wire.encode_properties
writes for the message whole; a message changed after it was built is encoded whole."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from qops.compression import compress
from qops.errors import PublishError
from qops.protocol import Message, TaskMessages
from qops.transports.amqp import template
from qops.transports.amqp.frames import _properties as decode_properties
from qops.transports.amqp.wire import encode_properties
from tests.unit.test_envelopes import ARGS, CHANGES, NOTED_CHANGES, OPTIONS


def _whole(message: Message, mode: int = 2) -> bytes:
    return encode_properties(replace(message, made=None), mode)


def _templates(messages: TaskMessages) -> list[Any]:
    return [t for t in messages.templates.values() if isinstance(t, template.Template)]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("mode", [1, 2])
def test_a_template_writes_what_encode_properties_writes(options: dict[str, Any],
                                                         mode: int) -> None:
    messages = TaskMessages('t.n\u00e9 "%s"', **options)
    for args, kwargs in ARGS:
        message = messages.build(list(args), dict(kwargs))
        assert template.properties(message, mode) == _whole(message, mode)
    [made] = _templates(messages)
    assert made.parts is not None  # (the messages above used it)


def test_what_the_template_writes_decodes_to_the_message() -> None:
    """(the frame reader's own decoder reads it back: lengths and all)"""
    messages = TaskMessages("t.add", reply_to="replies", root_id="r-1")
    messages.build([0], {})
    message = messages.build(["\u00e9\U0001f600"], {"k": "v" * 300})
    raw = template.properties(message, 2)
    assert _templates(messages)
    props = decode_properties(b"\x00" * 19 + raw, 19)
    assert props.headers == {k: v for k, v in message.headers.items()}
    assert props.correlation_id == message.headers["id"] and props.reply_to == "replies"
    assert props.headers["root_id"] == "r-1"


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_message_changed_after_build_is_encoded_whole(change: str) -> None:
    messages = TaskMessages("t.add", time_limit=5.0)
    template.properties(messages.build([1], {}), 2)
    template.properties(messages.build([0], {}), 2)  # the template exists
    message = messages.build([2], {"k": "v"})
    CHANGES[change](message)
    assert template.properties(message, 2) == _whole(message)


@pytest.mark.parametrize("change", list(NOTED_CHANGES))
def test_every_way_of_changing_headers_or_properties_is_seen(change: str) -> None:
    messages = TaskMessages("t.add")
    template.properties(messages.build([0], {}), 2)
    template.properties(messages.build([1], {}), 2)
    message = messages.build([2], {})
    NOTED_CHANGES[change](message.headers)
    assert template.properties(message, 2) == _whole(message)
    props = messages.build([3], {})
    NOTED_CHANGES[change](props.properties) if change not in ("del", "pop") else \
        props.properties.pop("reply_to")
    assert template.properties(props, 2) == _whole(props)


def test_compressed_and_replaced_properties_are_encoded_whole() -> None:
    messages = TaskMessages("t.add")
    template.properties(messages.build([0], {}), 2)
    message = messages.build([1], {})
    compress(message, "gzip")
    assert template.properties(message, 2) == _whole(message)
    moved = replace(messages.build([2], {}), properties={"priority": 7})
    assert template.properties(moved, 2) == _whole(moved)


def test_an_id_too_long_for_a_correlation_id_is_refused_as_before() -> None:
    messages = TaskMessages("t.add")
    template.properties(messages.build([0], {}), 2)
    message = messages.build([1], {}, task_id="x" * 300)
    with pytest.raises(PublishError, match="255"):
        template.properties(message, 2)


@pytest.mark.parametrize("where", ["name", "reply_to", "group"])
def test_a_message_holding_a_stand_in_gets_no_template(where: str) -> None:
    text = "x" + template._ID.decode() + template._KWARGS.decode()
    messages = TaskMessages(text if where == "name" else "t.add",
                            **({} if where == "name" else {where: text}))
    first = messages.build([1], {})
    second = messages.build([2], {})
    assert template.properties(second, 2) == _whole(second)
    [made] = _templates(messages)
    assert made.parts is None
    assert template.properties(first, 2) == _whole(first)


def test_a_single_message_makes_no_template() -> None:
    messages = TaskMessages("t.add")
    template.properties(messages.build([1], {}), 2)
    assert not messages.templates
