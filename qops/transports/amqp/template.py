"""The AMQP property lists of task messages built alike, from a template.

``wire.encode_properties`` walks a task message's ~20 headers for every message; in a
bulk send that was the largest part of the client's work before the first byte went
out (every message is built and encoded before any is written: a bad call sends
nothing). The messages of one ``TaskMessages`` differ only in the task id (header
``id``, property ``correlation_id``), the root id and the arguments' reprs, so a
``Template`` is ``encode_properties``'s own output for a probe message of that
``TaskMessages``, cut at the places of those values: a message's property list is then
one join of those pieces, its values and the header table's length. The bytes are
encode_properties's by construction (tests/unit/test_amqp_template.py compares them).
The same idea as the kombu envelope's template (qops/envelopes.py), for the same
messages: those ``protocol.as_built`` passes; any other is encoded whole.
"""

from __future__ import annotations

from struct import Struct
from typing import TYPE_CHECKING

from qops.protocol import Message, as_built
from qops.transports.amqp.wire import encode_properties, encode_table

if TYPE_CHECKING:
    from qops.protocol import TaskMessages

# stand-ins in the probe message, found again in its encoding
_ID, _ROOT = b"qops-template-id-7e3a", b"qops-template-root-7e3a"
_ARGS, _KWARGS = b"qops-template-args-7e3a", b"qops-template-kwargs-7e3a"
_U32 = Struct(">I").pack


def _long(raw: bytes) -> bytes:
    """A header value of type long string, as the header table holds it."""
    return b"S" + _U32(len(raw)) + raw


class Template:
    """The property lists of one ``TaskMessages``'s messages (see module doc)."""

    __slots__ = ("parts", "root")

    def __init__(self, messages: TaskMessages, delivery_mode: int) -> None:
        #: the pieces between the values: before the table's length, the table's
        #: four pieces between id, root id, argsrepr and kwargsrepr (and its end),
        #: and the properties between the table and the correlation id, and after it.
        #: None: this TaskMessages can't have a template
        self.parts: tuple[bytes, ...] | None = None
        self.root = None if messages.root_id is None else messages.root_id.encode()
        probe = messages.build([], {}, task_id=_ID.decode())
        probe.headers["root_id"] = _ROOT.decode()
        probe.headers["argsrepr"] = _ARGS.decode()
        probe.headers["kwargsrepr"] = _KWARGS.decode()
        raw = encode_properties(probe, delivery_mode)
        table = encode_table(probe.headers)
        start = raw.find(table)
        if start < 0 or raw.find(table, start + 1) >= 0:
            return
        content = table[4:]
        pieces = []
        at = 0
        for standin in (_ID, _ROOT, _ARGS, _KWARGS):
            found = content.find(_long(standin), at)
            if found < 0:
                return
            pieces.append(content[at:found])
            at = found + len(_long(standin))
        pieces.append(content[at:])
        if any(s in piece for piece in pieces for s in (_ID, _ROOT, _ARGS, _KWARGS)):
            return  # a name or value of the probe's own looked like a stand-in
        after = raw[start + len(table):]
        correlation = bytes((len(_ID),)) + _ID
        cut = after.find(correlation)
        if cut < 0 or after.find(_ID, cut + len(correlation)) >= 0:
            return
        self.parts = (raw[:start], *pieces, after[:cut], after[cut + len(correlation):])

    def fill(self, message: Message, tid: str) -> bytes | None:
        """The property list of ``message``, one ``protocol.as_built`` passed; None
        when there is no template, or the id is too long for a correlation id (encode
        it whole then: that raises the error)."""
        if self.parts is None:
            return None
        own = tid.encode("utf-8")
        if len(own) > 255:
            return None
        h = message.headers
        head, t0, t1, t2, t3, t4, middle, tail = self.parts
        content = b"".join((t0, _long(own), t1, _long(self.root or own), t2,
                            _long(h["argsrepr"].encode("utf-8")), t3,
                            _long(h["kwargsrepr"].encode("utf-8")), t4))
        return b"".join((head, _U32(len(content)), content, middle, bytes((len(own),)), own,
                         tail))


def properties(message: Message, delivery_mode: int) -> bytes:
    """``wire.encode_properties(message, delivery_mode)``, from the template of the
    message's ``TaskMessages`` where it has one."""
    made = as_built(message)
    if made is not None:
        raw = made[0].template((Template, delivery_mode)).fill(message, made[1])
        if raw is not None:
            return raw
    return encode_properties(message, delivery_mode)
