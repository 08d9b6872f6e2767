"""A task message's kombu envelope from its TaskMessages's template (qops/envelopes.py)
is, byte for byte, what encode_envelope writes for the message whole; a message changed
after it was built is encoded whole."""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import replace
from typing import Any

import pytest

from qops.compression import compress
from qops.envelopes import Template
from qops.protocol import Message, TaskMessages, encode_envelope

_TAG = re.compile(rb',"delivery_tag":"[^"]*"}}$')
NOW = dt.datetime(2026, 11, 30, 8, 0, tzinfo=dt.timezone.utc)

OPTIONS: list[dict[str, Any]] = [
    {},
    {"priority": 0}, {"priority": 9}, {"reply_to": "r.%s\"q"},
    {"root_id": "root-1", "parent_id": "parent-1", "group": "g", "group_index": 3},
    {"eta": NOW, "expires": NOW + dt.timedelta(hours=1), "retries": 2},
    {"time_limit": 30.0, "soft_time_limit": 20.5, "shadow": "n\u00e9e", "ignore_result": True},
    {"task_id": "fixed-id"}, {"task_id": 'odd "id" \\ \u00e9 %s'},
    {"callbacks": [{"task": "t.cb", "args": [1], "kwargs": {}, "options": {}}],
     "errbacks": [{"task": "t.eb"}], "chain": [{"task": "t.next"}],
     "chord": {"task": "t.body", "options": {"group_id": "g2"}}},
]
ARGS: list[tuple[list[Any], dict[str, Any]]] = [
    ([], {}), ([1, 2], {}), (["\u00e9\u4e2d\U0001f600", 'q"uote', "back\\slash", "%d %%"], {}),
    ([], {"x": 1, "y": "%(name)s"}), (["x" * 5000], {"big": "y" * 3000}), ([None, 1.5, True], {}),
]
LISTS = [("celery", "", None), ("q%s.\u00e9", "", 3), ('q"x', "ex", 0), ("high", "", 9)]


def _whole(queue: str, message: Message, exchange: str, priority: int | None) -> bytes:
    return encode_envelope(queue, replace(message, made=None), exchange, priority)


def _same(a: bytes, b: bytes) -> None:
    """Equal but for the delivery tag, a new id each time (and both well-formed)."""
    assert _TAG.search(a) and _TAG.search(b)
    assert _TAG.sub(b"", a) == _TAG.sub(b"", b)
    json.loads(a)


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize(("queue", "exchange", "priority"), LISTS)
def test_a_template_writes_what_encode_envelope_writes(options: dict[str, Any], queue: str,
                                                       exchange: str,
                                                       priority: int | None) -> None:
    messages = TaskMessages('t.n\u00e9 "%s"', **options)
    for args, kwargs in ARGS:
        message = messages.build(list(args), dict(kwargs))
        assert message.made is not None
        _same(encode_envelope(queue, message, exchange, priority),
              _whole(queue, message, exchange, priority))
    template = messages.templates[(Template, queue, exchange, priority)]
    assert template.parts is not None  # (the messages above used it)


CHANGES = {
    "a header added (signing)": lambda m: m.headers.__setitem__("x-signature", "s"),
    "a header changed": lambda m: m.headers.__setitem__("retries", 5),
    "a header made an equal value of another type": lambda m: m.headers.__setitem__(
        "retries", False),
    "the time limits, equal but of another type": lambda m: m.headers.__setitem__(
        "timelimit", [5, None]),
    "the delivery mode as a float": lambda m: m.properties.__setitem__("delivery_mode", 2.0),
    "the stamps a subclass": lambda m: m.headers.__setitem__("stamps", type("D", (dict,), {})()),
    "a header's value changed in place": lambda m: m.headers["timelimit"].__setitem__(0, 9),
    "the stamps": lambda m: m.headers["stamps"].__setitem__("k", ["v"]),
    "the id": lambda m: m.headers.__setitem__("id", "other"),
    "the root id": lambda m: m.headers.__setitem__("root_id", "other"),
    "argsrepr not a string": lambda m: m.headers.__setitem__("argsrepr", 5),
    "a header removed": lambda m: m.headers.pop("origin"),
    "a property added": lambda m: m.properties.__setitem__("priority", 4),
    "a property changed": lambda m: m.properties.__setitem__("reply_to", "elsewhere"),
    "the content type": lambda m: setattr(m, "content_type", "application/x-other"),
    "compressed": lambda m: compress(m, "gzip"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_message_changed_after_build_is_encoded_whole(change: str) -> None:
    messages = TaskMessages("t.add", time_limit=5.0)
    first = messages.build([1], {})
    encode_envelope("celery", first)  # the template exists
    message = messages.build([2], {"k": "v"})
    CHANGES[change](message)
    _same(encode_envelope("celery", message), _whole("celery", message, "", None))


def test_properties_replaced_by_a_transport_are_seen() -> None:
    messages = TaskMessages("t.add")
    encode_envelope("q", messages.build([0], {}))
    message = messages.build([1], {})
    encode_envelope("q", messages.build([2], {}))  # the template exists
    props = dict(message.properties, priority=7)
    moved = replace(message, properties=props)  # what a delayed requeue does (made kept)
    assert moved.made is not None
    _same(encode_envelope("q", moved), _whole("q", moved, "", None))
    assert json.loads(encode_envelope("q", moved))["properties"]["priority"] == 7
    assert messages.templates  # (the template was there, and passed over)


def test_a_single_message_makes_no_template() -> None:
    """Making a template costs more than one envelope: a lone delay() does without."""
    messages = TaskMessages("t.add")
    encode_envelope("q", messages.build([1], {}))
    assert not messages.templates
    encode_envelope("q", messages.build([2], {}))
    assert list(messages.templates) == [(Template, "q", "", None)]


@pytest.mark.parametrize("where", ["name", "reply_to", "root_id", "group"])
def test_a_message_holding_a_stand_in_gets_no_template(where: str) -> None:
    """The template finds each message's values by the stand-ins of its probe: a value
    of the TaskMessages's own that looks like one makes no template (encoded whole)."""
    from qops import envelopes

    text = f"x{envelopes._ID}{envelopes._ARGS}"
    messages = TaskMessages(text if where == "name" else "t.add",
                            **({} if where == "name" else {where: text}))
    first = messages.build([1], {})
    second = messages.build([2], {})
    _same(encode_envelope("q", second), _whole("q", second, "", None))
    # (a root id is filled in like the id: it never stands in the probe)
    assert (messages.templates[(Template, "q", "", None)].parts is None) == (where != "root_id")
    _same(encode_envelope("q", first), _whole("q", first, "", None))


NOTED_CHANGES = {
    "set": lambda d: d.__setitem__("x-new", 1),
    "del": lambda d: d.__delitem__("origin"),
    "pop": lambda d: d.pop("origin"),
    "popitem": lambda d: d.popitem(),
    "clear": lambda d: d.clear(),
    "update": lambda d: d.update({"retries": 3}),
    "update kwargs": lambda d: d.update(retries=3),
    "setdefault": lambda d: d.setdefault("x-new", 2),
    "|=": lambda d: d.__ior__({"retries": 4}),
}


@pytest.mark.parametrize("change", list(NOTED_CHANGES))
def test_every_way_of_changing_the_headers_is_noted(change: str) -> None:
    """A built message's headers note every change made through them (qops.protocol.
    Noted): that, not a comparison of every header, is what keeps the template off a
    changed message. Making one, and copying it, are no change."""
    from qops.noted import Noted

    messages = TaskMessages("t.add")
    encode_envelope("q", messages.build([0], {}))
    message = messages.build([1], {})
    assert type(message.headers) is Noted and not message.headers.changed
    assert type(message.headers.copy()) is dict and not message.headers.changed
    NOTED_CHANGES[change](message.headers)
    assert message.headers.changed
    _same(encode_envelope("q", message), _whole("q", message, "", None))
    props = messages.build([2], {})
    NOTED_CHANGES[change](props.properties) if change not in ("del", "pop") else \
        props.properties.pop("reply_to")
    assert props.properties.changed
    _same(encode_envelope("q", props), _whole("q", props, "", None))
