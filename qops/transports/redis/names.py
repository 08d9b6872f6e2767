"""Names on the wire: priority steps, list and key names, channel globs (the layout is in
the package doc and docs/protocol.md section 2; the URL and its ``global_keyprefix``:
``url``).

Plain functions and constants with no connection: the transport, its consumers and the
tests share them, and none of them talks to Redis."""

from __future__ import annotations

import json
from typing import Any

SEP = "\x06\x16"  # kombu's separator in priority list names and binding members
STEPS = (0, 3, 6, 9)  # kombu's priority steps; step 0 is served first
BINDING_PREFIX = "_kombu.binding."


def wire_step(priority: Any) -> int:
    """qops priority (0..9, 9 first, None = unset) -> kombu step (0/3/6/9, 0 first)."""
    if priority is None:
        return 0
    try:
        p = max(0, min(9, int(priority)))
    except (TypeError, ValueError):
        return 0
    wire = 9 - p
    return max(s for s in STEPS if s <= wire)


def qops_priority(wire: Any) -> int | None:
    """The wire priority of an envelope (Celery's meaning, 0 first) -> qops scale.

    Uses the envelope's value rather than the step list it was read from: Celery may write
    any 0..9 (e.g. 5, stored in step 3), and keeping it loses nothing when the message is
    forwarded; for what qops publishes the two are the same. Wire 0 is unset (None):
    kombu writes 0 for a message sent without a priority, and 0 is also where qops's
    unset and 7..9 go, so a task sent without one is not shown as priority 9."""
    if wire is None or isinstance(wire, bool):
        return None
    try:
        w = max(0, min(9, int(wire)))
    except (TypeError, ValueError):
        return None
    return None if w == 0 else 9 - w


def list_name(queue: str, step: int) -> str:
    """kombu's list for ``queue`` at priority ``step`` (without any key prefix)."""
    return queue if step == 0 else f"{queue}{SEP}{step}"


def binding_member(queue: str) -> str:
    return f"{queue}{SEP}{SEP}{queue}"


def glob_escape(text: str) -> str:
    """Escape Redis MATCH pattern characters in a literal key prefix."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def raw_step(raw: bytes) -> int:
    """The wire step an envelope asks for (its 'priority', Celery's meaning); 0 when the
    payload is not a readable envelope (it goes to the base list)."""
    try:
        wire = json.loads(raw)["properties"]["priority"]
        return max(s for s in STEPS if s <= max(0, min(9, int(wire))))
    except Exception:  # any malformed payload: base list
        return 0


def topic_glob(pattern: str) -> str:
    """A Redis glob matching at least the routing keys the topic ``pattern`` matches.

    ``*`` and ``#`` become ``*`` (kombu's fanout_patterns); a ``#`` also swallows the
    dot beside it, so that it can match zero words (``task.#`` -> ``task*`` matches
    ``task``). Redis's ``*`` matches more than a topic word does: the subscriber filters
    precisely with ``topic_matches``."""
    out = ""
    prev_hash = True  # no dot before the first word
    for word in pattern.split("."):
        if word == "#":
            out += "*"
            prev_hash = True
            continue
        if not prev_hash:
            out += "."
        out += "*" if word == "*" else glob_escape(word)
        prev_hash = False
    return out
