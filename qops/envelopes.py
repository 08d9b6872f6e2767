"""The kombu JSON envelope (Redis, SQLite) of task messages built alike, from a template.

A bulk send builds thousands of messages with one ``TaskMessages``: the same headers
but for the task id, root id and the arguments' reprs, the same properties but for the
id. Encoding each envelope whole with ``encode_envelope`` was about half of what a bulk
send on Redis cost (bench/README.md, "Where bulk-send time went"). A ``Template`` is
``encode_envelope``'s own output for a probe message of that ``TaskMessages``, made
once per list (queue, exchange, priority), with the places of each message's values
turned into a format string; a message is then its envelope in one ``%``. So the bytes
are encode_envelope's by construction (tests/unit/test_envelopes.py compares them over
many kinds of message).

A message gets its template only while it holds exactly what ``TaskMessages.build``
put in it: ``fill`` checks every header, the properties and the content type and
returns None on any difference (a signature or compression added, a
``before_task_publish`` handler's change), and the message is encoded whole.
"""

from __future__ import annotations

import json
import re
from base64 import b64encode
from operator import is_
from typing import TYPE_CHECKING

from qops.protocol import JSON, Message, encode_envelope, new_id

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

    __slots__ = ("parts", "keys", "values", "size", "root_id", "root", "timelimit",
                 "reply_to", "priority")

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
        # what the checks compare: every header but the message's own, in order
        own = {"id", "root_id", "argsrepr", "kwargsrepr", "timelimit", "stamps"}
        self.keys = tuple(k for k in messages.headers if k not in own)
        self.values = tuple(messages.headers[k] for k in self.keys)
        self.size = len(messages.headers)
        self.root_id = messages.root_id
        self.root = None if self.root_id is None else _plain(self.root_id).encode()
        self.timelimit = list(messages.time_limits)
        self.reply_to = messages.reply_to
        self.priority = messages.priority

    def fill(self, message: Message, tid: str) -> bytes | None:
        """``message``'s envelope, or None when it no longer holds what build() put in
        it (encode it whole then)."""
        h = message.headers
        p = message.properties
        if self.parts is None or len(h) != self.size or len(p) != 3 + (
                self.priority is not None) or message.content_type != JSON or \
                message.content_encoding != "utf-8":
            return None
        try:
            # the very objects build() put there (equal is not enough: 0 == False, and
            # JSON writes them differently)
            same = (all(map(is_, map(h.__getitem__, self.keys), self.values))
                    and h["id"] is tid and h["root_id"] is (self.root_id or tid)
                    and len(h["timelimit"]) == 2
                    and all(map(is_, h["timelimit"], self.timelimit))
                    and type(h["stamps"]) is dict and not h["stamps"]
                    and p["correlation_id"] is tid and p["reply_to"] is self.reply_to
                    and type(p["delivery_mode"]) is int and p["delivery_mode"] == 2
                    and p.get("priority", self.priority) is self.priority)
            args, kwargs = h["argsrepr"], h["kwargsrepr"]
        except (KeyError, TypeError):
            return None
        if not same or type(args) is not str or type(kwargs) is not str:
            return None
        head, to_id, to_root, to_args, to_kwargs, to_id2, to_tag = self.parts
        own = _plain(tid).encode("ascii")
        return b"".join((head, b64encode(message.body), to_id, own, to_root,
                         self.root or own, to_args, _escape(args).encode("ascii"),
                         to_kwargs, _escape(kwargs).encode("ascii"), to_id2, own, to_tag,
                         new_id().encode("ascii"), _END))


def _plain(text: str) -> str:
    """``text`` as the encoder writes it inside quotes (a task id is plain ASCII)."""
    return text if text.isascii() and text.isprintable() and '"' not in text and \
        "\\" not in text else _escape(text)[1:-1]
