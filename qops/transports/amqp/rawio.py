"""The socket of a pika connection, read and written by qops on its two hot paths.

pika's BlockingConnection takes some 60 function calls for each frame it reads or
writes (its I/O loop, its frame buffer, its channel dispatch, its events). A publisher
waiting for its confirm (confirms.py) and a consumer taking deliveries and sending its
acks (``DeliveryReader``, used by consumer.py) do that work here instead, as long as
it is simple: plain TCP, nothing waiting in pika's write buffer, nothing left in its
read buffer. Whatever qops does not take itself (every other frame, from the first one
that isn't its own, in order) goes to pika's frame reader, and what qops reads or
writes is counted as pika counts it (its heartbeat checker watches ``bytes_received``).
pika's timers and its thread-safe callbacks still get their turn while qops waits.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable, Container
from typing import Any

from qops.transports.amqp.frames import Deliver, deliveries

#: bytes read from the socket at a time, and seconds to wait for them before pika's
#: timers (heartbeats) get a turn
RECV_SIZE = 256 * 1024
TIMER_SLICE = 0.25


def plain_socket(impl: Any) -> Any:
    """The socket of ``impl`` (a pika Connection) when bytes may be read from and written
    to it here: open, plain TCP, nothing waiting in pika's write buffer. Else None
    (TLS, a closed connection, a write pending): pika's own loop does the work."""
    transport = impl._transport
    if transport is None or impl._get_write_buffer_size() or \
            type(transport).__name__ != "_AsyncPlaintextTransport":
        return None
    return transport._sock


def write(impl: Any, data: bytes, frames: int) -> bool:
    """Write ``data`` (``frames`` whole frames) to the socket now if pika has nothing
    queued before it; else, or for what the socket did not take, queue it in pika's
    write buffer: then True (pika's loop must run to send it)."""
    impl.bytes_sent += len(data)
    impl.frames_sent += frames
    sock = plain_socket(impl)
    if sock is not None:
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = 0  # pika meets the error again on its write, and reports it
        if sent == len(data):
            return False
        data = data[sent:]
    impl._adapter_emit_data(data)
    return True


def readable(sock: Any, seconds: float) -> bool:
    """Whether ``sock`` has something to read within ``seconds``. poll(), not select():
    a process with more than 1024 files open (a busy web server) has sockets that
    select() refuses."""
    poll = select.poll()
    poll.register(sock.fileno(), select.POLLIN)
    return bool(poll.poll(seconds * 1000))


def _noop() -> None:
    """A callback that only wakes pika's loop (``DeliveryReader.wake``)."""


class DeliveryReader:
    """Takes the deliveries for one channel of ``conn`` (a BlockingConnection) from its
    socket and gives each to ``take``; pika reads the rest (see the module doc).
    ``tags`` holds the consumer tags whose deliveries are read here (others, say of a
    consumer just cancelled, are pika's). Used by one thread at a time."""

    def __init__(self, conn: Any, channel: int, tags: Container[str],
                 take: Callable[[Deliver], None]) -> None:
        self.conn = conn
        self.impl = conn._impl
        self.channel = channel
        self.tags = tags
        self.take = take
        self._poller: Any = getattr(self.impl.ioloop, "_poller", None)
        #: pika's wake-up socket (``wake`` writes to it), polled with ours; None (pika
        #: reads everything) if this pika has not the parts used here
        self._waker: Any = getattr(self._poller, "_r_interrupt", None)
        if not all(hasattr(o, a) for o, a in (
                (conn, "_channels_pending_dispatch"), (conn, "_ready_events"),
                (self.impl, "_frame_buffer"), (self.impl, "_transport"))):
            self._waker = None
        self._poll: Any = None
        self._fd = -1
        self._timers_at = 0.0

    def waits_itself(self) -> bool:
        """Whether ``pump`` reads and waits here, where a byte down pika's wake-up socket
        wakes it; else pika's loop does, which only a callback ends early: pika has part
        of a frame, or holds what it read and has not dispatched yet (the deliveries that
        came with a consume-ok, say), or a write waiting, or TLS."""
        conn = self.conn
        return not (self._waker is None or self.impl._frame_buffer
                    or conn._channels_pending_dispatch or conn._ready_events
                    or plain_socket(self.impl) is None)

    def wake(self, itself: bool) -> None:
        """Wake ``pump`` from another thread: ``itself`` (``waits_itself()`` when it
        began) with a byte down pika's wake-up socket, else with a callback through
        pika's loop, which ends its wait."""
        if itself:
            self._poller.wake_threadsafe()
        else:
            self.conn.add_callback_threadsafe(_noop)

    def pump(self, seconds: float) -> None:
        """Read what the broker sent, waiting up to ``seconds`` for something (or for a
        wake-up, or a turn of pika's timers: the caller calls again)."""
        impl = self.impl
        conn = self.conn
        if not self.waits_itself():
            conn.process_data_events(time_limit=seconds)  # pika's way
            return
        sock = impl._transport._sock
        now = time.monotonic()
        if now >= self._timers_at:
            self._timers_at = now + TIMER_SLICE
            impl.ioloop.process_timeouts()  # heartbeats, and callbacks from other threads
        try:
            data = sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            if seconds <= 0 or not self._wait(sock, min(seconds, TIMER_SLICE)):
                return
            try:
                data = sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
        except OSError:
            data = b""
        if not data:
            # at its end or failing: pika reads that again, and reports it
            conn.process_data_events(0)
            return
        taken, used, frames = deliveries(data, self.channel, self.tags)
        if used:
            impl.bytes_received += used
            impl.frames_received += frames
            for item in taken:
                self.take(item)
        if used < len(data):
            impl._on_data_available(data[used:])
            conn.process_data_events(0)  # dispatch what pika read

    def _wait(self, sock: Any, seconds: float) -> bool:
        """Wait up to ``seconds`` for the socket to be readable: True. False after a
        timeout or a wake-up, once pika's timers and callbacks have run."""
        if self._fd != sock.fileno():
            self._fd = sock.fileno()
            self._poll = select.poll()
            self._poll.register(self._fd, select.POLLIN)
            self._poll.register(self._waker.fileno(), select.POLLIN)
        fds = [fd for fd, _event in self._poll.poll(seconds * 1000)]
        if self._fd in fds and len(fds) == 1:
            return True
        if fds:  # a wake-up: the caller has something to do
            try:
                self._waker.recv(512)
            except OSError:
                pass
        else:
            self._timers_at = time.monotonic() + TIMER_SLICE
            self.impl.ioloop.process_timeouts()
        return False
