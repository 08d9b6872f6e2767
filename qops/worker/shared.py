"""What a node's parent process and its consuming pool children share.

Two channels (see qops/worker/children.py for the design): a table of slots in
shared memory, one per child, where a child writes the task it runs and the parent
reads it (hard-limit watchdog, verdict on a dead child's task); and a pipe per child
carrying the messages below. The messages are small named types, so both ends say
what they send and read by name; they cross the pipe pickled, and none is sent per
task.
"""

from __future__ import annotations

import mmap
import struct
import time
from typing import Any, NamedTuple

from qops import errors
from qops.values import MAX_POOL_SIZE
from qops.worker.pool import describe_status

HARD_LIMIT_GRACE = 2.0  # seconds past a hard limit before the parent kills the child
MAX_CHILDREN = MAX_POOL_SIZE  # slots in the shared table
#: slot states
IDLE, RUNNING, LOST, TIMED_OUT = 0, 1, 2, 3


class Slot:
    """What one child is doing, in a table shared by the parent and every child (an
    anonymous shared mapping made before the first fork): state, task start
    (time.time()), kill deadline (time.monotonic(), 0 for none), tasks done, the wait
    status of a dead child, task id and name."""

    FORMAT = struct.Struct("=BddQiH100sH128s")
    HEAD = struct.Struct("=BddQ")

    def __init__(self, table: mmap.mmap, index: int) -> None:
        self.table = table
        self.offset = (index - 1) * self.FORMAT.size

    def begin(self, task_id: str, name: str, deadline: float, done: int) -> None:
        tid, tname = task_id.encode()[:100], name.encode()[:128]
        self.FORMAT.pack_into(self.table, self.offset, RUNNING, time.time(), deadline, done,
                              0, len(tid), tid, len(tname), tname)

    def end(self, done: int) -> None:
        self.HEAD.pack_into(self.table, self.offset, IDLE, 0.0, 0.0, done)

    def mark(self, state: int, status: int | None) -> None:
        """The parent's verdict on the task a dead child was running."""
        old = self.FORMAT.unpack_from(self.table, self.offset)
        self.FORMAT.pack_into(self.table, self.offset, state, 0.0, 0.0, old[3],
                              -1 if status is None else status, *old[5:])

    def read(self) -> SlotView:
        state, started, deadline, done, status, n, tid, m, name = \
            self.FORMAT.unpack_from(self.table, self.offset)
        return SlotView(state, started, deadline, done, None if status < 0 else status,
                        tid[:n].decode("utf-8", "replace"),
                        name[:m].decode("utf-8", "replace"))


class SlotView(NamedTuple):
    state: int
    started: float
    deadline: float
    done: int
    status: int | None  # wait status of a dead child
    task_id: str
    name: str


def new_table() -> mmap.mmap:
    """The shared slot table, made before the first fork."""
    return mmap.mmap(-1, MAX_CHILDREN * Slot.FORMAT.size)


def lost_error(state: int, status: int | None) -> Exception:
    """Why a task whose process died fails: LOST or TIMED_OUT, with the wait status."""
    if state == TIMED_OUT:
        return errors.TimeLimitExceeded("hard time limit exceeded: the task did not stop "
                                        "and its pool process was killed")
    return errors.WorkerLostError(f"pool process exited during the task "
                                  f"({describe_status(status)})")


# -- parent -> child -------------------------------------------------------------------------


class Control(NamedTuple):
    """Run a remote-control command about tasks and answer with a Reply."""

    seq: int
    method: str
    arguments: dict[str, Any]


class Stop(NamedTuple):
    """Warm stop: finish the task, give back what is held, say Bye and exit."""


class Lost(NamedTuple):
    """A task whose process died must not run again here: its verdict."""

    task_id: str
    verdict: int  # LOST or TIMED_OUT
    status: int | None  # wait status of the dead child


class Died(NamedTuple):
    """A task's process died and the broker delivers it again: how (for the reason
    of a dead letter, qops/worker/lost.py)."""

    task_id: str
    how: str


class Share(NamedTuple):
    """So many children consume now: each takes that share of every rate limit."""

    concurrency: int


# -- child -> parent -------------------------------------------------------------------------


class Ready(NamedTuple):
    """Connected and consuming."""


class Failed(NamedTuple):
    """Could not start (e.g. the broker is down): the error's class name and text."""

    error: str
    message: str


class Reply(NamedTuple):
    """The answer to the Control message ``seq``."""

    seq: int
    reply: Any


class Bye(NamedTuple):
    """Exiting after a warm stop: tasks done, by name (the node's counts now)."""

    processed: dict[str, int]


ToChild = Control | Stop | Lost | Died | Share
ToParent = Ready | Failed | Reply | Bye
