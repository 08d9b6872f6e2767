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
_ID, _ARGS, _KWARGS = "qops-template-id-2f1c", "qops-template-args-2f1c", \
    "qops-template-kwargs-2f1c"
_BODY = '{"body":"'
_TAG = ',"delivery_tag":"'


class Template:
    """The envelopes of one ``TaskMessages``'s messages for one list (see module doc)."""

    __slots__ = ("format", "order", "keys", "values", "size", "root_id", "timelimit",
                 "reply_to", "priority")

    def __init__(self, messages: TaskMessages, queue: str, exchange: str,
                 priority: int | None) -> None:
        self.format: str | None = None  # None: this TaskMessages can't have one
        probe = messages.build([], {}, task_id=_ID)
        probe.made = None  # encoded whole, by encode_envelope
        probe.headers["argsrepr"] = _ARGS
        probe.headers["kwargsrepr"] = _KWARGS
        probe.body = b""
        text = encode_envelope(queue, probe, exchange, priority).decode("ascii")
        tag = text.rfind(_TAG)
        ids = 2 + (messages.root_id is None)  # id, correlation_id, and root_id
        if not text.startswith(_BODY + '"') or tag < 0 or not text.endswith('"}}') or \
                text.count(_ID) != ids or text.count(f'"{_ARGS}"') != 1 or \
                text.count(f'"{_KWARGS}"') != 1:
            return  # a name or value of the probe's own looked like a stand-in
        # the values in the order they stand: 0 body, 1 id, 2 args, 3 kwargs, 4 tag
        marks = {_ID: 1, f'"{_ARGS}"': 2, f'"{_KWARGS}"': 3}
        parts = re.split("(" + "|".join(map(re.escape, marks)) + ")",
                         text[len(_BODY):tag + len(_TAG)].replace("%", "%%"))
        self.order = (0, *(marks[mark] for mark in parts[1::2]), 4)
        self.format = _BODY + "%s" + "%s".join(parts[0::2]) + '%s"}}'
        # what the checks compare: every header but the message's own, in order
        own = {"id", "root_id", "argsrepr", "kwargsrepr", "timelimit", "stamps"}
        self.keys = tuple(k for k in messages.headers if k not in own)
        self.values = tuple(messages.headers[k] for k in self.keys)
        self.size = len(messages.headers)
        self.root_id = messages.root_id
        self.timelimit = list(messages.time_limits)
        self.reply_to = messages.reply_to
        self.priority = messages.priority

    def fill(self, message: Message, tid: str) -> bytes | None:
        """``message``'s envelope, or None when it no longer holds what build() put in
        it (encode it whole then)."""
        h = message.headers
        p = message.properties
        if self.format is None or len(h) != self.size or len(p) != 3 + (
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
        values = (b64encode(message.body).decode("ascii"), _plain(tid), _escape(args),
                  _escape(kwargs), new_id())
        return (self.format % tuple(map(values.__getitem__, self.order))).encode("ascii")


def _plain(text: str) -> str:
    """``text`` as the encoder writes it inside quotes (a task id is plain ASCII)."""
    return text if text.isascii() and text.isprintable() and '"' not in text and \
        "\\" not in text else _escape(text)[1:-1]
