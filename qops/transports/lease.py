"""A consumer's lease on what it reserved, where reservations outlive connections (Redis,
SQLite): how a consumer that was taken for dead finds out, and drops its copies.

A consumer that does not beat for ``heartbeat_ttl`` -- SIGSTOP, a VM or GC pause, a
suspended laptop -- is dead to the other nodes: one of them gives its reserved messages
back to their queues (``Transport.recover``), as designed. The process may wake up
afterwards, still holding its copies; running them would run those tasks twice.

So every consumer with a ``Lease`` counts *epochs*: each delivery carries the epoch it
was handed out in (in its tag), and when the consumer learns that its deliveries were
taken back it forgets them all and starts a new epoch. A delivery of an older epoch is
stale (``Consumer.stale``): the worker does not run it, and settling it does nothing
(the broker has the message again; an ack must not remove the copy it requeued).

The consumer learns it from the broker, when it renews its registration ("checks in":
its heartbeat, a few round trips a TTL): the record of it is gone, because a
``recover()`` deleted it. It must check in before it trusts its deliveries, or sends
anything about them, whenever the last check-in is ``overdue``: half a TTL old, which a
healthy consumer's heartbeat never lets happen, but a wake-up from a pause does. So the
hot path costs a clock read, and the first thing after a pause is a check-in.

If the broker can't be asked and the lease has ``lapsed`` (a whole TTL without a
check-in), the consumer assumes the worst: it forgets its deliveries, and gives back
whatever the broker still has reserved for it at its next check-in (``giveback_due``).

A task already running when the pause began has no second chance to be stopped: it may
run twice (at least once, see docs/guarantees.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# Counts the time a suspended machine sleeps (time.monotonic does not, on Linux): a
# laptop that slept past the TTL must see its lease as overdue.
_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def clock() -> float:
    """Seconds on a clock that never goes back and keeps counting through a suspend."""
    return time.clock_gettime(_CLOCK)


class Lease:
    """One consumer's epoch and the time of its last check-in (see the module doc).

    ``epoch`` is changed under the consumer's own lock, together with forgetting its
    deliveries (the consumer's ``_taken_back``); reading it needs no lock."""

    __slots__ = ("ttl", "epoch", "giveback_due", "_renewed")

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.epoch = 0
        self.giveback_due = False
        self._renewed = clock()

    def renewed(self, since: float) -> None:
        """A check-in sent at ``since`` (``clock()``) got through."""
        if since > self._renewed:
            self._renewed = since

    def age(self) -> float:
        return clock() - self._renewed

    def overdue(self) -> bool:
        """Check in before trusting a delivery or sending anything about one."""
        return clock() - self._renewed >= self.ttl / 2

    def must_check_in(self) -> bool:
        """``overdue``, or a check-in owes the broker a give-back (``giveback_due``)."""
        return self.giveback_due or self.overdue()

    def lapsed(self) -> bool:
        """Long enough without a check-in that the broker may have taken everything back."""
        return clock() - self._renewed >= self.ttl


def is_stale(lease: Lease, epoch: int, check_in: Callable[[], None],
             taken_back: Callable[[], None], cid: str) -> bool:
    """``Consumer.stale`` for a delivery handed out in ``epoch``: checks in first when
    the lease is overdue. ``taken_back()`` forgets the consumer's deliveries and starts
    a new epoch (used when the broker can't be asked and the lease lapsed)."""
    if epoch == lease.epoch and lease.overdue():
        try:
            check_in()
        except Exception as exc:
            if lease.lapsed() and epoch == lease.epoch:
                log.warning("consumer %s could not check in with the broker for %.1fs (%s): "
                            "it drops its deliveries, which the broker may have given to "
                            "another node, and gives back the rest when it can", cid,
                            lease.age(), " ".join(str(exc).split()) or type(exc).__name__)
                taken_back()
                lease.giveback_due = True
    return epoch != lease.epoch


def warn_taken_back(cid: str, lease: Lease, given_back: int) -> None:
    extra = f"; {given_back} more it had reserved since went back too" if given_back else ""
    log.warning("consumer %s was taken for dead (no heartbeat for %.1fs): the messages it "
                "held went back to their queues, and it will not run its copies of them%s",
                cid, lease.age(), extra)
