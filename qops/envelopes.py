"""The kombu JSON envelope (Redis, SQLite) of task messages built alike, from a template.

A bulk send builds thousands of messages with one ``TaskMessages``: the same headers
but for the task id, root id and the arguments' reprs, the same properties but for the
id. Encoding each envelope whole with ``encode_envelope`` was about half of what a bulk
send on Redis cost (bench/README.md, "Where bulk-send time went"). A ``Template`` is
``encode_envelope``'s own output for a probe message of that ``TaskMessages``, made
once per list (queue, exchange, priority), cut at the places of each message's values;
a message is then its envelope in one join of those pieces and its values. So the bytes
are encode_envelope's by construction (tests/unit/test_envelopes.py compares them over
many kinds of message).

A message gets its template only while it holds what ``TaskMessages.build`` put in it
(``protocol.as_built``); anything else is encoded whole. The AMQP transport does the
same with a message's properties (qops/transports/amqp/template.py).
"""

from __future__ import annotations

import json
import re
from base64 import b64encode
from typing import TYPE_CHECKING

from qops.ids import new_id
from qops.protocol import Message, encode_envelope

if TYPE_CHECKING:
    from qops.protocol import TaskMessages

_escape = json.encoder.encode_basestring_ascii  # what the envelope's encoder writes
# stand-ins in the probe message, found again in its envelope (plain ASCII: the
# encoder writes them as they are)
_ID, _ROOT = "qops-template-id-2f1c", "qops-template-root-2f1c"
_ARGS, _KWARGS = '"qops-template-args-2f1c"', '"qops-template-kwargs-2f1c"'
#: where each message's own values stand in the envelope, in order: the headers id,
#: root_id, argsrepr, kwargsrepr, then the properties' correlation_id (the id again)
_ORDER = (_ID, _ROOT, _ARGS, _KWARGS, _ID)
_SPLIT = re.compile("(" + "|".join(map(re.escape, _ORDER[:4])) + ")")
_BODY = '{"body":"'
_TAG = ',"delivery_tag":"'
_END = b'"}}'


class Template:
    """The envelopes of one ``TaskMessages``'s messages for one list (see module doc)."""

    __slots__ = ("parts", "root")

    def __init__(self, messages: TaskMessages, queue: str, exchange: str,
                 priority: int | None) -> None:
        #: the envelope's text between the values (bytes), None: this TaskMessages
        #: can't have a template
        self.parts: tuple[bytes, ...] | None = None
        probe = messages.build([], {}, task_id=_ID)
        probe.made = None  # encoded whole, by encode_envelope
        probe.headers["root_id"] = _ROOT
        probe.headers["argsrepr"] = _ARGS[1:-1]
        probe.headers["kwargsrepr"] = _KWARGS[1:-1]
        probe.body = b""
        text = encode_envelope(queue, probe, exchange, priority).decode("ascii")
        tag = text.rfind(_TAG)
        if not text.startswith(_BODY + '"') or tag < 0 or not text.endswith('"}}'):
            return
        pieces = _SPLIT.split(text[len(_BODY):tag + len(_TAG)])
        if tuple(pieces[1::2]) != _ORDER:
            return  # a name or value of the probe's own looked like a stand-in
        self.parts = (_BODY.encode(), *(piece.encode() for piece in pieces[0::2]))
        self.root = None if messages.root_id is None else _plain(messages.root_id).encode()

    def fill(self, message: Message, tid: str) -> bytes | None:
        """The envelope of ``message``, one ``protocol.as_built`` passed; None when
        there is no template (encode it whole then)."""
        if self.parts is None:
            return None
        h = message.headers
        head, to_id, to_root, to_args, to_kwargs, to_id2, to_tag = self.parts
        own = _plain(tid).encode("ascii")
        return b"".join((head, b64encode(message.body), to_id, own, to_root,
                         self.root or own, to_args, _escape(h["argsrepr"]).encode("ascii"),
                         to_kwargs, _escape(h["kwargsrepr"]).encode("ascii"), to_id2, own,
                         to_tag, new_id().encode("ascii"), _END))


def _plain(text: str) -> str:
    """``text`` as the encoder writes it inside quotes (a task id is plain ASCII)."""
    return text if text.isascii() and text.isprintable() and '"' not in text and \
        "\\" not in text else _escape(text)[1:-1]
