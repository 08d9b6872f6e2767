"""``Confirms``: the confirm-mode channel a publisher link sends on, driven by qops.

pika's BlockingChannel waits for each confirm before the next publish, and gets there
through two turns of its I/O loop (one to write the three frames as three ``send``
calls, one to read the ack). Here a message is one ``bytes`` (``wire``) written to the
socket at once (rawio.write), and the ack is read from the socket here, without pika's
I/O loop (its timers still get their turn while we wait): a Basic.Ack for this channel
is settled here, anything else handed to pika's frame reader, in order. A batch is
written whole (in large writes), and its confirms are collected as they come --
RabbitMQ acks several at once (``multiple``) -- so N messages cost about one round
trip, not N.

The channel is pika's own (an ``impl`` channel of the link's BlockingConnection, so
pika still handles everything else on the connection: heartbeats, Channel.Close,
Basic.Return, a lost socket); the delivery tags are counted here, which is why
nothing else may publish on it. Used by one thread at a time, like its link.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pika.exceptions as pex
from pika.spec import Basic

from qops.transports.amqp.rawio import RECV_SIZE, TIMER_SLICE, plain_socket, readable, write
from qops.transports.amqp.wire import SETTLE, content_frames, method_frame, short_string

#: a batch is written in pieces of about this many bytes
WRITE_CHUNK = 256 * 1024
#: at most this many messages of a batch unconfirmed at once: past it, the writer waits
#: for confirms before writing more (bounded memory; the broker's flow control keeps
#: working)
WINDOW = 20000
#: a Basic.Ack frame (a confirm): wire's SETTLE, method 80
_ACK = SETTLE
_ACK_SIZE = _ACK.size  # 21


@dataclass
class Outcome:
    """What became of a batch: the indexes (into the batch) the broker nacked, the ones
    it returned as unroutable, and the ones never confirmed because the channel or the
    connection went away (``error``: why)."""

    nacked: list[int] = field(default_factory=list)
    returned: list[int] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return not (self.nacked or self.returned or self.lost)


#: (exchange, routing key, body, encoded properties, mandatory, correlation id)
Item = tuple[str, str, bytes, bytes, bool, "str | None"]


class Confirms:
    """One confirm-mode channel on ``conn`` (a pika BlockingConnection)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self._impl = conn._impl
        self._pending: dict[int, int] = {}  # delivery tag -> index in the batch
        self._nacked: list[int] = []
        self._returned: list[Any] = []  # correlation ids of returned messages
        self._closed: BaseException | None = None
        self._tag = 0  # the last delivery tag given out
        opened: list[Any] = []
        ch = self._impl.channel(on_open_callback=opened.append)
        ch.add_on_close_callback(self._on_close)
        self._wait(lambda: bool(opened))
        selected: list[Any] = []
        ch.confirm_delivery(ack_nack_callback=self._on_confirm, callback=selected.append)
        self._wait(lambda: bool(selected))
        ch.add_on_return_callback(self._on_return)
        self.ch = ch
        # BlockingConnection.close() closes each channel through its "cookie" (the
        # BlockingChannel wrapping it, for the channels pika made): this is ours
        ch._set_cookie(self)
        self._number = ch.channel_number
        #: (exchange, routing key, mandatory) -> its Basic.Publish method frame
        self._methods: dict[tuple[str, str, bool], bytes] = {}

    @property
    def is_open(self) -> bool:
        return self._closed is None and bool(self.ch.is_open)

    def close(self, reply_code: int = 0, reply_text: str = "Normal shutdown") -> None:
        """Close the channel (without waiting for the broker's Close-Ok)."""
        if self.ch.is_open:
            self.ch.close(reply_code, reply_text)

    # -- pika's callbacks ----------------------------------------------------------------
    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        self._confirmed(method.delivery_tag, method.multiple, isinstance(method, Basic.Nack))

    def _confirmed(self, tag: int, multiple: bool, nack: bool) -> None:
        pending = self._pending
        if multiple:
            done = []
            for t in pending:  # in tag order
                if t > tag:
                    break
                done.append(t)
        else:
            done = [tag] if tag in pending else []
        for t in done:
            index = pending.pop(t)
            if nack:
                self._nacked.append(index)

    def _on_return(self, _ch: Any, _method: Any, props: Any, _body: bytes) -> None:
        self._returned.append(props.correlation_id)

    def _on_close(self, _ch: Any, reason: BaseException) -> None:
        self._closed = reason

    # -- sending -------------------------------------------------------------------------
    def _wait(self, done: Callable[[], bool]) -> None:
        """Run the connection until ``done()`` or the channel closed (raised: the
        broker's ChannelClosedByBroker); a lost connection raises pika's error."""
        if not self._read(done):
            self.conn._flush_output(lambda: done() or self._closed is not None)
        if self._closed is not None:
            raise self._closed

    def _read(self, done: Callable[[], bool]) -> bool:
        """Read the socket here and hand what comes to pika's frame reader (which calls
        ``_on_confirm``), until ``done()``: True. False, to let pika's own loop take
        over, when that is not simple: TLS, data waiting to be written, the socket
        at its end or failing, the connection closing (pika then reports it)."""
        impl = self._impl
        sock = plain_socket(impl)
        if sock is None:
            return False
        while not done():
            if self._closed is not None:
                return True
            try:
                data = sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                if not readable(sock, TIMER_SLICE):
                    impl.ioloop.process_timeouts()  # pika's timers: heartbeats
                continue
            except OSError:
                return False
            if not data or not impl.is_open:
                return False
            if not impl._frame_buffer:
                data = self._acks(data)
                if not data:
                    continue
            impl._on_data_available(data)
            if not impl.is_open:
                return False
        return True

    def _acks(self, data: bytes) -> bytes:
        """Settle the Basic.Ack frames for this channel at the start of ``data`` (the
        reply to almost every publish: pika takes some 60 function calls over each);
        return the rest, for pika. Counted as pika counts what it reads (its heartbeat
        checker watches ``bytes_received``)."""
        number = self._number
        start = 0
        while len(data) - start >= _ACK_SIZE:
            kind, channel, size, cls, method, tag, flags, end = _ACK.unpack_from(data, start)
            if kind != 1 or channel != number or size != 13 or cls != 60 or method != 80 \
                    or end != 0xCE:
                break
            self._confirmed(tag, bool(flags & 1), False)
            start += _ACK_SIZE
        if start:
            self._impl.bytes_received += start
            self._impl.frames_received += start // _ACK_SIZE
            data = data[start:]
        return data

    def _frames(self, item: Item) -> bytes:
        exchange, routing_key, body, props, mandatory, _cid = item
        key = (exchange, routing_key, mandatory)
        method = self._methods.get(key)
        if method is None:
            method = method_frame(self._number, short_string(exchange, "exchange name"),
                                  short_string(routing_key, "routing key"), mandatory)
            if len(self._methods) < 1000:
                self._methods[key] = method
        return method + content_frames(self._number, body, props, self._impl._body_max_length)

    def _start(self) -> None:
        if self._closed is not None or not self.ch.is_open:
            raise self._closed or pex.ChannelWrongStateError("channel is closed")
        if self._impl.is_closed:
            raise pex.ConnectionWrongStateError("connection is closed")
        self._pending.clear()
        self._nacked.clear()
        self._returned.clear()

    def publish(self, item: Item) -> None:
        """Publish one message and wait for its confirm. Raises pika's NackError,
        UnroutableError (returned: mandatory and no queue), ChannelClosedByBroker, or
        the connection's error -- as BlockingChannel.basic_publish does."""
        self._start()
        data = self._frames(item)
        self._tag += 1
        self._pending[self._tag] = 0
        write(self._impl, data, 3 if item[2] else 2)
        self._wait(lambda: not self._pending)
        if self._nacked:
            raise pex.NackError([])
        if self._returned:
            raise pex.UnroutableError([])

    def publish_many(self, items: Sequence[Item]) -> Outcome:
        """Publish ``items`` in order, then wait until all are confirmed. Never raises
        for a message: the Outcome says which were nacked, returned or lost."""
        out = Outcome()
        datas = [self._frames(item) for item in items]  # PublishError before any write
        try:
            self._start()
        except (pex.AMQPError, OSError) as exc:
            out.lost = list(range(len(items)))
            out.error = exc
            return out
        pending = self._pending
        ids: dict[Any, int] = {}
        buf: list[bytes] = []
        size = frames = 0
        written = 0  # items handed to the socket (or pika's buffer)
        try:
            for index, item in enumerate(items):
                data = datas[index]
                self._tag += 1
                pending[self._tag] = index
                if item[5] is not None:
                    ids[item[5]] = index
                buf.append(data)
                size += len(data)
                frames += 3 if item[2] else 2
                if size >= WRITE_CHUNK or index == len(items) - 1:
                    write(self._impl, b"".join(buf), frames)
                    written = index + 1
                    buf.clear()
                    size = frames = 0
                    if len(pending) > WINDOW:
                        self._wait(lambda: len(pending) <= WINDOW // 2)
            self._wait(lambda: not pending)
        except (pex.AMQPError, OSError) as exc:
            out.error = exc
            out.lost = sorted(set(pending.values()) | set(range(written, len(items))))
            pending.clear()
        out.nacked = sorted(self._nacked)
        returned = {ids[c] for c in self._returned if c in ids}
        if len(returned) < len(self._returned):
            # a returned message we can't tell (no correlation id): count the batch's
            # messages without one as returned, rather than call them delivered
            returned |= {i for i, item in enumerate(items) if item[5] is None}
        out.returned = sorted(returned - set(out.nacked))
        out.lost = sorted(set(out.lost) - set(out.nacked) - returned)
        return out

