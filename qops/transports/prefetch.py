"""The prefetch books of a consumer: what it handed out and not settled, and its room.

Every consumer keeps the same books (see ``Consumer`` in qops/transports/base.py):
deliveries handed out and not yet acked/requeued/rejected are *held*; held deliveries
the worker keeps for an ETA are *exempt* (``Consumer.exempt``) and don't count against
the prefetch; ``get()`` hands out a new delivery only while there is *room*::

    room = limit - (held - exempt) - pending

``pending`` is what the consumer took from its broker and has not handed out yet, when
that counts too (Redis's reserve batch); it is the caller's, passed in.

``Prefetch`` keeps these books for every transport. It is cheap on the hot path: one
lock a call, or none where the consumer keeps other books under the same lock (pass
that ``threading.Condition`` as ``cond``, hold it, and call the ``*_locked`` methods,
so that a hand-out or a settlement takes one lock in all). Settlements and exemptions
notify waiters only when someone waits, and only through ``wait_locked`` or
``wait_for_room``: wait there, not on ``cond`` directly, or a settlement may not wake
you. A waiter says how many free slots it waits for (``want``), and a settlement wakes
it only once there are that many: a consumer that waits for half its prefetch to
come free before it reserves again is woken once, not at every ack (a thread switch
each). ``woke_locked`` tells the settler that its settlement woke a waiter, which it
may want to let run at once (the Redis consumer's ack yields the GIL to it).

Tags are the transport's (row ids, channel tags, ...); ``take_locked`` makes them for
transports that have none of their own (a sequence number within the consumer). Each
held tag keeps a value of the transport's choice (where the message came from, what
reject() needs), handed back when it is settled; values must not be None.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")
_NOBODY = 1 << 62  # _wake_at while nobody waits


class Prefetch(Generic[V]):
    """Held and exempt deliveries of one consumer, and its room (see the module doc).

    ``held`` (tag -> value, in hand-out order) and ``exempted`` may be read under
    ``cond``; change them only through the methods."""

    __slots__ = ("limit", "cond", "held", "exempted", "_seq", "_waiting", "_wake_at",
                 "_woke")

    def __init__(self, limit: int, cond: threading.Condition | None = None) -> None:
        self.limit = max(1, limit)
        self.cond = cond if cond is not None else threading.Condition(threading.Lock())
        self.held: dict[Hashable, V] = {}
        self.exempted: set[Hashable] = set()
        self._seq = 0
        self._waiting = 0  # threads in wait_locked()
        self._wake_at = _NOBODY  # the fewest free slots (pending aside) a waiter wants
        self._woke = False  # a settlement woke a waiter since woke_locked() last asked

    # -- with ``cond`` held ---------------------------------------------------------------
    def room_locked(self, pending: int = 0) -> int:
        """Free prefetch slots (never below 0)."""
        return max(0, self.limit - len(self.held) + len(self.exempted) - pending)

    def hold_if_room_locked(self, tag: Hashable, value: V) -> bool:
        """Hold ``tag`` if there is room (``room_locked() > 0``, nothing pending); False,
        and nothing changed, if not. A consumer's hand-out in one call: the room test is
        ``room_locked``'s, written out because this runs for every delivery."""
        if len(self.held) - len(self.exempted) >= self.limit:
            return False
        self.held[tag] = value
        return True

    def take_locked(self, value: V) -> int:
        """Hold ``value`` under a new tag: the next sequence number of this consumer."""
        self._seq += 1
        self.held[self._seq] = value
        return self._seq

    def settle_locked(self, tag: Hashable) -> V | None:
        """``tag`` is settled: forget it. Its value, or None if it was not held (settled
        already, or forgotten by ``clear_locked``): then there is nothing to do."""
        value = self.held.pop(tag, None)
        if value is not None:
            if self.exempted:
                self.exempted.discard(tag)
            if self._waiting:
                self._wake_if_room()
        return value

    def woke_locked(self) -> bool:
        """Whether a settlement woke a waiter since the last call."""
        woke, self._woke = self._woke, False
        return woke

    def _wake_if_room(self) -> None:
        # Free slots not counting pending: at least as many as the waiter's own count,
        # so nobody sleeps past their room (an early wake only checks again).
        if self.limit - len(self.held) + len(self.exempted) >= self._wake_at:
            self.cond.notify_all()
            self._woke = True

    def exempt_locked(self, tag: Hashable) -> bool:
        """Stop counting held ``tag`` against the prefetch. False if it is not held or
        exempt already (nothing changed)."""
        if tag not in self.held or tag in self.exempted:
            return False
        self.exempted.add(tag)
        if self._waiting:
            self._wake_if_room()
        return True

    def clear_locked(self) -> dict[Hashable, V]:
        """Forget every held delivery (the consumer closed, or its connection went and the
        broker took them back); returns what was held, in hand-out order. Waiters wake."""
        held, self.held = self.held, {}
        self.exempted.clear()
        self.cond.notify_all()
        return held

    def wait_locked(self, timeout: float | None, want: int = 1) -> None:
        """``cond.wait(timeout)``, woken by settlements and exemptions too once at least
        ``want`` slots are free (pending aside), and by ``clear_locked``."""
        self._waiting += 1
        if want < self._wake_at:
            self._wake_at = want
        try:
            self.cond.wait(timeout)
        finally:
            self._waiting -= 1
            if not self._waiting:
                self._wake_at = _NOBODY

    def wait_for_room_locked(self, timeout: float, pending: Callable[[], int] | None = None,
                             want: int = 1) -> bool:
        """Wait up to ``timeout`` seconds until there are at least ``want`` free slots
        (1: any room); True when there are. ``pending`` (called under ``cond``) counts
        what is taken and not handed out yet."""
        deadline = time.monotonic() + timeout
        while self.room_locked(pending() if pending is not None else 0) < want:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.wait_locked(left, want)
        return True

    # -- taking ``cond`` -------------------------------------------------------------------
    def room(self, pending: int = 0) -> int:
        with self.cond:
            return self.room_locked(pending)

    def hold(self, tag: Hashable, value: V) -> None:
        with self.cond:
            self.held[tag] = value

    def settle(self, tag: Hashable) -> V | None:
        with self.cond:
            return self.settle_locked(tag)

    def peek(self, tag: Hashable) -> V | None:
        """The value held for ``tag`` (still held), or None."""
        with self.cond:
            return self.held.get(tag)

    def exempt(self, tag: Hashable) -> bool:
        with self.cond:
            return self.exempt_locked(tag)

    def clear(self) -> dict[Hashable, V]:
        with self.cond:
            return self.clear_locked()

    def wait_for_room(self, timeout: float, pending: Callable[[], int] | None = None,
                      want: int = 1) -> bool:
        with self.cond:
            return self.wait_for_room_locked(timeout, pending, want)
