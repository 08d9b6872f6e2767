"""Task ids: random (version 4) UUIDs as ``str(uuid.uuid4())`` writes them, made a pool
at a time (``new_id``)."""

from __future__ import annotations

import os

#: a version-4 UUID's fixed bits, set with ``bytes.translate`` on a whole pool at once
_VERSION = bytes(x & 0x0F | 0x40 for x in range(256))
_VARIANT = bytes(x & 0x3F | 0x80 for x in range(256))
#: ids made ahead (``new_id``): one ``os.urandom`` call a pool, not one an id
_ID_POOL = 256
_ids: list[str] = []
if hasattr(os, "register_at_fork"):  # a forked child must never hand out its parent's
    os.register_at_fork(after_in_child=_ids.clear)


# hex digit j (0..31) of an id goes to character _AT[j] of its 36 (8-4-4-4-12)
_AT = tuple(j + (j >= 8) + (j >= 12) + (j >= 16) + (j >= 20) for j in range(32))
_SEPARATORS = (b"-", 8), (b"-", 13), (b"-", 18), (b"-", 23), (b" ", 36)


def _more_ids() -> list[str]:
    """A pool of ids, laid out with strided slice copies (C loops over the whole pool,
    not a format call an id): each id's 32 hex digits and its dashes go to their places
    in one ASCII text of 37-character rows (a space ends each), split once."""
    raw = bytearray(os.urandom(16 * _ID_POOL))
    raw[6::16] = raw[6::16].translate(_VERSION)
    raw[8::16] = raw[8::16].translate(_VARIANT)
    digits = raw.hex().encode("ascii")
    text = bytearray(37 * _ID_POOL)
    for j, at in enumerate(_AT):
        text[at::37] = digits[j::32]
    for char, at in _SEPARATORS:
        text[at::37] = char * _ID_POOL
    return text.decode("ascii").split()


def new_id() -> str:
    """A random (version 4) UUID as ``str(uuid.uuid4())`` writes it. Made a pool at a
    time (one ``os.urandom`` call, no ``uuid.UUID`` objects: a message needs two, and
    they were a sixth of the cost of building one); ``list.pop`` hands each out once
    across threads, and a forked child starts with an empty pool."""
    try:
        return _ids.pop()
    except IndexError:
        _ids.extend(_more_ids())
        return _ids.pop()
