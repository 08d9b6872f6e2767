"""A timer: calls functions at given times (ETA tasks, rate-limit waits).

Either its own thread makes the calls (``start()``), or the owner's loop does, between
other work (``run_due()``, waiting at most ``next_in()``), as a pool child does.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("qops.worker")


class Timer:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None], Any]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="timer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def call_at(self, when: float, fun: Callable[[], None], item: Any = None) -> None:
        """Call ``fun`` at ``when`` (time.time()). ``item`` is handed back by drain()."""
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._seq), fun, item))
            self._cond.notify()

    def call_later(self, delay: float, fun: Callable[[], None], item: Any = None) -> None:
        self.call_at(time.time() + delay, fun, item)

    def scheduled(self) -> list[tuple[float, Any]]:
        with self._cond:
            return sorted((when, item) for when, _, _, item in self._heap)

    def join(self, timeout: float) -> None:
        """Wait for a call being made now (after drain())."""
        if self._thread.is_alive():
            self._thread.join(timeout)

    def drain(self) -> list[Any]:
        """Stop and return the items of every call not yet made."""
        with self._cond:
            self._stopped = True
            items = [item for _, _, _, item in sorted(self._heap)]
            self._heap.clear()
            self._cond.notify()
        return items

    def next_in(self, longest: float) -> float:
        """Seconds until the next call is due, at most ``longest``."""
        if not self._heap:  # read without the lock: a call added now is seen next time
            return longest
        with self._cond:
            if not self._heap:
                return longest
            return max(0.0, min(longest, self._heap[0][0] - time.time()))

    def run_due(self) -> None:
        """Make the calls that are due, on this thread."""
        while self._heap:
            with self._cond:
                if self._stopped or not self._heap or self._heap[0][0] > time.time():
                    return
                _, _, fun, _ = heapq.heappop(self._heap)
            _call(fun)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (
                        not self._heap or self._heap[0][0] > time.time()):
                    # (at most an hour at a time: a wait past threading.TIMEOUT_MAX, for
                    # an ETA in the year 9999, would raise and end this thread)
                    wait = None if not self._heap else \
                        min(self._heap[0][0] - time.time(), 3600.0)
                    self._cond.wait(wait)
                if self._stopped:
                    return
                _, _, fun, _ = heapq.heappop(self._heap)
            _call(fun)


def _call(fun: Callable[[], None]) -> None:
    try:
        fun()
    except Exception:
        log.exception("timer callback failed")
