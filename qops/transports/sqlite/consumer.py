"""The SQLite consumers: ``SQLiteConsumer`` reserves rows of the ``messages`` table by
writing its id into them, and holds a lease on them (qops/transports/lease.py);
``SQLiteReplyConsumer`` reads one reply queue. The schema and the transport are in
qops/transports/sqlite.py."""

from __future__ import annotations

import math
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, NamedTuple

from qops.protocol import decode_envelope
from qops.transports.base import (
    REPLY_PREFETCH,
    REPLY_TTL,
    Backoff,
    Consumer,
    Delivery,
    ReplyOnly,
    make_delivery,
)
from qops.transports.lease import Lease, clock, is_stale, warn_taken_back
from qops.transports.prefetch import Prefetch
from qops.transports.sqlite.transport import HOST

if TYPE_CHECKING:
    from qops.transports.sqlite import SQLiteTransport


class RowTag(NamedTuple):
    """``Delivery.tag`` of a SQLite consumer: the row, and the consumer's epoch when it
    was handed out (see qops/transports/lease.py)."""

    row: int
    epoch: int


class SQLiteConsumer(Consumer):
    """Reserves rows by writing its id into them. Every write of its own goes through
    ``_write``, which checks in first when the lease asks for it: a consumer that was
    taken for dead finds out in the same transaction, before it reserves or settles
    anything (an ack of a stale row could delete the copy it reserved again)."""

    def __init__(self, transport: SQLiteTransport, queues: list[str], prefetch: int,
                 cid: str) -> None:
        self.transport = transport
        self.db = transport.db
        self.id = cid
        self._books: Prefetch[str] = Prefetch(prefetch)  # RowTag -> queue, for the rows held
        self._lease = Lease(self._ttl())
        self.prefetch = self._books.limit
        self._queues = list(queues)
        self._backoff = Backoff(0.001, 0.05)
        with self.db.write() as conn:
            self._register(conn)

    def _register(self, conn: sqlite3.Connection) -> None:
        for q in self._queues:
            conn.execute("INSERT OR IGNORE INTO queues (name) VALUES (?)", (q,))
        conn.execute(
            "INSERT OR REPLACE INTO consumers (id, queues, host, pid, alive_until) "
            "VALUES (?, ?, ?, ?, ?)",
            (self.id, "\n".join(self._queues), HOST, os.getpid(),
             time.time() + self.transport.options.heartbeat_ttl))

    @property
    def queues(self) -> list[str]:
        return list(self._queues)

    def _ttl(self) -> float:
        return self.transport.options.heartbeat_ttl

    @contextmanager
    def _write(self, check_in: bool = False) -> Iterator[sqlite3.Connection]:
        """A write transaction, which checks in first when the lease asks for it (always
        with ``check_in``): renews ``alive_until``; if recover() deleted this consumer's
        row (taken for dead), or it assumed so itself (``giveback_due``), gives back
        the rows it still holds, registers again and forgets every delivery (a new
        epoch) -- in the transaction, so that the next one sees it done."""
        sent = clock()
        renew = check_in or self._lease.must_check_in()
        gave_back = False
        with self.db.write() as conn:
            if renew and (not conn.execute(
                    "UPDATE consumers SET alive_until = ? WHERE id = ?",
                    (time.time() + self._ttl(), self.id)).rowcount
                          or self._lease.giveback_due):
                moved = conn.execute("UPDATE messages SET consumer = NULL, redelivered = 1 "
                                     "WHERE consumer = ?", (self.id,)).rowcount
                self._register(conn)
                self._taken_back()
                warn_taken_back(self.id, self._lease, moved)
                gave_back = True
            yield conn
        if gave_back:
            self._lease.giveback_due = False
        if renew:
            self._lease.renewed(sent)

    def _taken_back(self) -> None:
        with self._books.cond:
            self._lease.epoch += 1
            self._books.clear_locked()

    def stale(self, delivery: Delivery) -> bool:
        """True when the row was taken back (see qops/transports/lease.py)."""
        return is_stale(self._lease, delivery.tag.epoch, self.heartbeat, self._taken_back,
                        self.id)

    def _reserve(self, room: int) -> list[Delivery]:
        if not self._queues or room <= 0:
            return []
        marks = ",".join("?" * len(self._queues))
        with self._write() as conn:
            rows = conn.execute(
                f"SELECT id, queue, payload, redelivered FROM messages WHERE consumer IS NULL "
                f"AND queue IN ({marks}) ORDER BY priority DESC, id LIMIT ?",
                (*self._queues, room)).fetchall()
            if rows:
                conn.executemany("UPDATE messages SET consumer = ? WHERE id = ?",
                                 [(self.id, r[0]) for r in rows])
            # held in the transaction: a check-in can't forget them before they are
            got = [make_delivery(queue, RowTag(row_id, self._lease.epoch), bytes(payload),
                                 decode_envelope, redelivered=bool(redelivered),
                                 limit=self.transport.options.max_message_size)
                   for row_id, queue, payload, redelivered in rows]
            for d in got:
                self._books.hold(d.tag, d.queue)
        return got

    def get(self, timeout: float) -> Delivery | None:
        # Reserve one row a call: the rows this consumer holds are all in the database
        # (never only in memory), so a crash can't lose them.
        deadline = time.monotonic() + timeout
        while True:
            if not self._books.room():
                # full: a settlement (any thread) ends the wait
                if not self._books.wait_for_room(deadline - time.monotonic()):
                    return None
                continue
            got = self._reserve(1)
            if got:
                self._backoff.reset()
                return got[0]
            if not self._backoff.sleep(deadline):
                return None

    def _settle(self, delivery: Delivery, sql: str) -> None:
        tag: RowTag = delivery.tag
        with self._write() as conn:
            if tag.epoch == self._lease.epoch:  # else taken back: the broker has it again
                conn.execute(sql, (tag.row, self.id))
        self._books.settle(tag)
        self._backoff.reset()

    def exempt(self, delivery: Delivery) -> None:
        self._books.exempt(delivery.tag)

    def ack(self, delivery: Delivery) -> None:
        self._settle(delivery, "DELETE FROM messages WHERE id = ? AND consumer = ?")

    def requeue(self, delivery: Delivery) -> None:
        # The row keeps its id, so it is back at the head of its queue.
        self._settle(delivery, "UPDATE messages SET consumer = NULL, redelivered = 1 "
                               "WHERE id = ? AND consumer = ?")

    def reject(self, delivery: Delivery, reason: str) -> None:
        tag: RowTag = delivery.tag
        with self._write() as conn:
            if tag.epoch == self._lease.epoch:  # else it runs elsewhere: no dead letter
                conn.execute("INSERT INTO dead_letters (id, queue, reason, payload, created) "
                             "VALUES (?, ?, ?, ?, ?)", (uuid.uuid4().hex, delivery.queue,
                                                        reason, delivery.raw, time.time()))
                conn.execute("DELETE FROM messages WHERE id = ? AND consumer = ?",
                             (tag.row, self.id))
        self._books.settle(tag)

    # -- worker-lost accounting (qops/worker/lost.py) -------------------------------------
    def mark_started(self, delivery: Delivery) -> None:
        # the row's ``started`` survives its consumer: recover() and close() keep it
        tag: RowTag = delivery.tag
        with self._write() as conn:
            conn.execute("UPDATE messages SET started = 1 WHERE id = ? AND consumer = ?",
                         (tag.row, self.id))

    def worker_lost(self, delivery: Delivery, died: bool = False) -> tuple[int, bool]:
        tag: RowTag = delivery.tag
        with self._write() as conn:
            row = conn.execute("SELECT started, lost FROM messages WHERE id = ? AND "
                               "consumer = ?", (tag.row, self.id)).fetchone()
            if row is None:
                return 0, False
            new = bool(row[0]) or died
            if new:
                conn.execute("UPDATE messages SET started = 0, lost = lost + 1 WHERE id = ?",
                             (tag.row,))
        return int(row[1]) + new, new

    def heartbeat(self) -> None:
        with self._write(check_in=True):
            pass

    def _save_queues(self) -> None:
        with self.db.write() as conn:
            for q in self._queues:
                conn.execute("INSERT OR IGNORE INTO queues (name) VALUES (?)", (q,))
            conn.execute("UPDATE consumers SET queues = ? WHERE id = ?",
                         ("\n".join(self._queues), self.id))

    def add_queue(self, queue: str) -> None:
        if queue not in self._queues:
            self._queues = [*self._queues, queue]
            self._save_queues()

    def cancel_queue(self, queue: str) -> None:
        if queue in self._queues:
            self._queues = [q for q in self._queues if q != queue]
            self._save_queues()

    def close(self) -> None:
        with self.db.write() as conn:
            conn.execute("UPDATE messages SET consumer = NULL, redelivered = 1 "
                         "WHERE consumer = ?", (self.id,))
            conn.execute("DELETE FROM consumers WHERE id = ?", (self.id,))
        self._books.clear()


class SQLiteReplyConsumer(ReplyOnly, SQLiteConsumer):
    """A consumer on one reply queue (see the module doc). It is not in ``consumers``:
    its rows must never be handed back to a queue nobody else reads, and an idle client
    must not be taken for dead by the heartbeat rule of workers."""

    def __init__(self, transport: SQLiteTransport, name: str, cid: str) -> None:
        self.reply = name
        self._last_beat = time.monotonic()
        super().__init__(transport, [name], REPLY_PREFETCH, cid)

    def _ttl(self) -> float:
        return math.inf  # its rows are never taken back: its lease never runs out

    def _register(self, conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO reply_queues (name, consumer, host, pid, alive_until) "
            "VALUES (?, ?, ?, ?, ?)",
            (self.reply, self.id, HOST, os.getpid(), time.time() + REPLY_TTL))

    def get(self, timeout: float) -> Delivery | None:
        if time.monotonic() - self._last_beat >= self.transport.options.heartbeat_interval:
            self.heartbeat()
        return super().get(timeout)

    def heartbeat(self) -> None:
        # Matters only to a recover() on another host (same host goes by the pid).
        with self.db.write() as conn:
            conn.execute("UPDATE reply_queues SET alive_until = ? WHERE name = ? "
                         "AND consumer = ?", (time.time() + REPLY_TTL, self.reply, self.id))
        self._last_beat = time.monotonic()

    def close(self) -> None:
        """The reply queue ends with its consumer: its unread replies go with it."""
        with self.db.write() as conn:
            deleted = conn.execute("DELETE FROM reply_queues WHERE name = ? AND consumer = ?",
                                   (self.reply, self.id)).rowcount
            if deleted:  # (not if recover() took it already and someone reopened it)
                conn.execute("DELETE FROM messages WHERE queue = ?", (self.reply,))
        self._books.clear()
