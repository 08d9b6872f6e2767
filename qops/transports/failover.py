"""A broker URL list (``amqp://h1;amqp://h2``, or a list in YAML: the nodes of one
cluster) and the order its nodes are tried in, Celery's ``broker_failover_strategy``:

- ``round-robin`` (the default): every new connection goes to the node the last one
  reached, and moves on to the next node of the list (wrapping around) when that one
  does not answer. The whole fleet follows the first node until it fails.
- ``shuffle``: every new connection tries the nodes in a random order, which spreads
  the connections of a fleet over the cluster.

Either way a connection tries every node once before it gives up.
"""

from __future__ import annotations

import random
import threading

from qops.errors import UsageError

STRATEGIES = ("round-robin", "shuffle")


def strategy(value: object) -> str:
    """The ``broker_failover_strategy`` setting's value, checked."""
    text = str(value).strip().lower()
    if text not in STRATEGIES:
        raise UsageError(f"it must be 'round-robin' or 'shuffle', not {value!r}")
    return text


class NodeOrder:
    """Which node of ``count`` to try first, then next (thread-safe)."""

    def __init__(self, count: int, how: str = "round-robin") -> None:
        self.count = count
        self.how = strategy(how)
        self._current = 0
        self._lock = threading.Lock()

    def order(self) -> list[int]:
        """Indexes of the nodes, in the order a new connection tries them."""
        if self.how == "shuffle":
            out = list(range(self.count))
            random.shuffle(out)
            return out
        with self._lock:
            first = self._current
        return [(first + k) % self.count for k in range(self.count)]

    def reached(self, index: int) -> None:
        """A connection to node ``index`` succeeded: round-robin stays there."""
        with self._lock:
            self._current = index
