"""The embedded transport: one SQLite file shared by every process on the machine.

WAL mode lets readers and one writer work at once; every reserve is one
``BEGIN IMMEDIATE`` transaction, so two workers never take the same message. A
reserved row keeps the id of the consumer that holds it; consumers prove they are alive
by moving their ``alive_until`` forward. ``recover()`` hands back the rows of consumers
that are dead: their time ran out, or (same host) their process is gone.

Reply queues are kept apart: a row in ``reply_queues`` (not in ``queues``, so they are
never listed as work queues) names the queue and its one consumer. ``send_reply`` inserts
a message only while that row exists; the consumer's ``close()`` deletes the row and
its messages, and ``recover()`` does the same for a reply consumer whose process died.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qops.errors import BrokerUnreachable, PublishError, PublishManyError
from qops.protocol import Message, decode_envelope, encode_envelope
from qops.transports.base import (
    Backoff,
    Consumer,
    DeadLetter,
    QueueStats,
    Subscription,
    Transport,
    TransportOptions,
    topic_matches,
)
from qops.transports.sqlite.url import (  # path_from_url: re-exported for the tests
    check_directory,
    describe_open_error,
    path_from_url,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    payload BLOB NOT NULL,
    consumer TEXT,
    redelivered INTEGER NOT NULL DEFAULT 0,
    started INTEGER NOT NULL DEFAULT 0,
    lost INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, consumer, priority DESC, id);
CREATE INDEX IF NOT EXISTS messages_consumer ON messages (consumer);
CREATE TABLE IF NOT EXISTS queues (name TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS consumers (
    id TEXT PRIMARY KEY, queues TEXT NOT NULL, host TEXT, pid INTEGER, alive_until REAL
);
CREATE TABLE IF NOT EXISTS broadcasts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT NOT NULL, payload BLOB NOT NULL,
    created REAL NOT NULL, routing_key TEXT
);
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY, info TEXT NOT NULL, alive_until REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id TEXT PRIMARY KEY, queue TEXT NOT NULL, reason TEXT NOT NULL, payload BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS reply_queues (
    name TEXT PRIMARY KEY, consumer TEXT NOT NULL, host TEXT, pid INTEGER, alive_until REAL
);
CREATE TABLE IF NOT EXISTS results (
    task_id TEXT PRIMARY KEY, status TEXT NOT NULL, data BLOB NOT NULL, expires REAL
);
CREATE TABLE IF NOT EXISTS locks (
    name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires REAL NOT NULL
);
"""

BROADCAST_KEEP = 60.0  # seconds a broadcast row is kept for slow pollers
HOST = socket.gethostname()


class SQLiteDB:
    """Thread-local connections to one SQLite file, created with the schema."""

    def __init__(self, url: str, timeout: float = 10.0, what: str = "SQLite broker") -> None:
        self.path = path_from_url(url)
        check_directory(self.path, what)
        self.timeout = timeout
        self._local = threading.local()
        self._all: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._lock = threading.Lock()
        # Several processes may create the file at once (multi start): switching to WAL
        # and creating the schema can then meet "database is locked" without waiting on
        # the busy handler, so try again for a while.
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._init_schema(self.conn())
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise BrokerUnreachable(f"cannot open {what} {self.path}: "
                                            f"{describe_open_error(self.path, exc)}") from None
                time.sleep(0.02)
            except (OSError, sqlite3.Error) as exc:
                raise BrokerUnreachable(f"cannot open {what} {self.path}: "
                                        f"{describe_open_error(self.path, exc)}") from None

    @staticmethod
    def _init_schema(conn: sqlite3.Connection) -> None:
        conn.executescript(SCHEMA)
        # files made by qops 0.1.0 before events had routing keys
        columns = {r[1] for r in conn.execute("PRAGMA table_info(broadcasts)")}
        if "routing_key" not in columns:
            conn.execute("ALTER TABLE broadcasts ADD COLUMN routing_key TEXT")
        # files made before worker-lost accounting (qops/worker/lost.py)
        columns = {r[1] for r in conn.execute("PRAGMA table_info(messages)")}
        for column in ("started", "lost"):
            if column not in columns:
                conn.execute(f"ALTER TABLE messages ADD COLUMN {column} "
                             "INTEGER NOT NULL DEFAULT 0")

    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            _create_private(self.path)
            conn = sqlite3.connect(str(self.path), timeout=self.timeout,
                                   isolation_level=None, check_same_thread=False)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
            except sqlite3.Error:
                conn.close()
                raise
            # WAL + NORMAL: a commit is durable against process crashes (what a queue
            # needs here); only a power loss may lose the last transactions.
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
            self._local.pid = os.getpid()
            with self._lock:
                self._all.append((threading.current_thread(), conn))
        return conn

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: the write lock is taken up front, so two
        reservers never read the same ready rows."""
        conn = self.conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise BrokerUnreachable(f"SQLite broker {self.path} is not writable: "
                                    f"{describe_open_error(self.path, exc)}") from None
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def close(self) -> None:
        """Close this thread's connection and those of threads that have ended. A
        connection another thread may be using right now is only let go: closing it
        under that thread can crash the process; it closes when its last user drops it."""
        me = threading.current_thread()
        with self._lock:
            for thread, conn in self._all:
                if thread is me or not thread.is_alive():
                    try:
                        conn.close()
                    except sqlite3.Error:
                        pass
            self._all.clear()
        self._local = threading.local()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SQLiteTransport(Transport):
    scheme = "sqlite"

    @classmethod
    def check_url(cls, url: str) -> None:
        path_from_url(url)

    def __init__(self, url: str, options: TransportOptions | None = None) -> None:
        super().__init__(url, options)
        self.db = SQLiteDB(url)

    @property
    def path(self) -> Path:
        return self.db.path

    # -- queues ---------------------------------------------------------------------
    def publish(self, queue: str, message: Message) -> None:
        raw = encode_envelope(queue, message)
        self.check_size(f"queue {queue!r}", raw)
        try:
            with self.db.write() as conn:
                conn.execute("INSERT OR IGNORE INTO queues (name) VALUES (?)", (queue,))
                conn.execute("INSERT INTO messages (queue, priority, payload) VALUES (?, ?, ?)",
                             (queue, message.priority, raw))
        except sqlite3.Error as exc:
            raise PublishError(f"could not publish to {queue!r}: {exc}") from None

    def publish_many(self, items: Sequence[tuple[str, Message]]) -> None:
        """One transaction: all of ``items`` are queued, or none (rolled back)."""
        n = len(items)
        rows = []
        for index, (queue, message) in enumerate(items):
            raw = encode_envelope(queue, message)
            try:
                self.check_size(f"queue {queue!r}", raw)
            except PublishError as exc:
                raise PublishManyError(f"{exc} (message {index} of {n}; none was sent)",
                                       list(range(n))) from None
            rows.append((queue, message.priority, raw))
        try:
            with self.db.write() as conn:
                conn.executemany("INSERT OR IGNORE INTO queues (name) VALUES (?)",
                                 [(q,) for q in dict.fromkeys(r[0] for r in rows)])
                conn.executemany("INSERT INTO messages (queue, priority, payload) "
                                 "VALUES (?, ?, ?)", rows)
        except (sqlite3.Error, BrokerUnreachable) as exc:
            raise PublishManyError(f"could not publish {n} messages to {self.path}: {exc}; "
                                   "none was sent (the transaction was rolled back)",
                                   list(range(n))) from None

    def consumer(self, queues: Sequence[str], prefetch: int,
                 consumer_id: str | None = None) -> Consumer:
        from qops.transports.sqlite.consumer import SQLiteConsumer

        return SQLiteConsumer(self, list(queues), prefetch, consumer_id or uuid.uuid4().hex)

    def reply_consumer(self, name: str, *, exchange: str | None = None,
                       routing_key: str | None = None) -> Consumer:
        # no Celery peers on SQLite: the kombu binding is not needed
        from qops.transports.sqlite.consumer import SQLiteReplyConsumer

        return SQLiteReplyConsumer(self, name, uuid.uuid4().hex)

    def send_reply(self, name: str, message: Message) -> None:
        raw = encode_envelope(name, message)
        self.check_size(f"reply queue {name!r}", raw)
        try:
            with self.db.write() as conn:
                # Only while the reply queue exists: a row for a queue whose consumer is
                # gone would never be read nor deleted.
                conn.execute("INSERT INTO messages (queue, priority, payload) SELECT ?, 0, ? "
                             "WHERE EXISTS (SELECT 1 FROM reply_queues WHERE name = ?)",
                             (name, raw, name))
        except sqlite3.Error as exc:
            raise PublishError(f"could not send a reply to {name!r}: {exc}") from None

    def purge(self, queue: str) -> int:
        with self.db.write() as conn:
            cur = conn.execute("DELETE FROM messages WHERE queue = ? AND consumer IS NULL",
                               (queue,))
            return cur.rowcount

    def queue_stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        conn = self.db.conn()
        names = list(queues) if queues is not None else [
            r[0] for r in conn.execute("SELECT name FROM queues ORDER BY name")]
        counts = {(q, held): n for q, held, n in conn.execute(
            "SELECT queue, consumer IS NOT NULL, COUNT(*) FROM messages GROUP BY 1, 2")}
        now = time.time()
        consumers: dict[str, int] = {}
        for (qs,) in conn.execute("SELECT queues FROM consumers WHERE alive_until >= ?", (now,)):
            for q in qs.split("\n"):
                consumers[q] = consumers.get(q, 0) + 1
        return [QueueStats(q, counts.get((q, 0), 0), counts.get((q, 1), 0), consumers.get(q, 0))
                for q in names]

    def queue_exists(self, queue: str) -> bool:
        row = self.db.conn().execute(
            "SELECT 1 FROM queues WHERE name = ? UNION ALL "
            "SELECT 1 FROM reply_queues WHERE name = ?", (queue, queue)).fetchone()
        return row is not None

    def recover(self) -> int:
        now = time.time()
        conn = self.db.conn()
        dead = []
        for cid, host, pid, until in conn.execute(
                "SELECT id, host, pid, alive_until FROM consumers"):
            if until < now or (host == HOST and pid and not _process_alive(pid)):
                dead.append(cid)
        # A reply consumer's rows are not orphans: it is not in ``consumers``.
        orphans = [r[0] for r in conn.execute(
            "SELECT DISTINCT consumer FROM messages WHERE consumer IS NOT NULL "
            "AND consumer NOT IN (SELECT id FROM consumers) "
            "AND consumer NOT IN (SELECT consumer FROM reply_queues)")]
        # A reply queue on this host lives as long as its process, however long that
        # process leaves it idle; from another host we can only go by its last sign
        # of life.
        dead_replies = [(name, cid, until) for name, cid, host, pid, until in conn.execute(
            "SELECT name, consumer, host, pid, alive_until FROM reply_queues")
            if (not _process_alive(pid) if host == HOST and pid else until < now)]
        if dead_replies:
            with self.db.write() as conn:
                for name, cid, until in dead_replies:
                    # only if it is still the row we judged (no heartbeat since)
                    if conn.execute("DELETE FROM reply_queues WHERE name = ? AND consumer = ? "
                                    "AND alive_until = ?", (name, cid, until)).rowcount:
                        conn.execute("DELETE FROM messages WHERE queue = ?", (name,))
        if not dead and not orphans:
            return 0
        moved = 0
        with self.db.write() as conn:
            for cid in dead + orphans:
                moved += conn.execute(
                    "UPDATE messages SET consumer = NULL, redelivered = 1 WHERE consumer = ?",
                    (cid,)).rowcount
                conn.execute("DELETE FROM consumers WHERE id = ?", (cid,))
        return moved

    # -- fanout -------------------------------------------------------------------------
    def broadcast(self, channel: str, message: Message, *,
                  routing_key: str | None = None) -> None:
        raw = encode_envelope(channel, message)
        now = time.time()
        with self.db.write() as conn:
            conn.execute("INSERT INTO broadcasts (channel, payload, created, routing_key) "
                         "VALUES (?, ?, ?, ?)", (channel, raw, now, routing_key))
            conn.execute("DELETE FROM broadcasts WHERE created < ?", (now - BROADCAST_KEEP,))

    def subscribe(self, channel: str, *, pattern: str | None = None,
                  lag: float = 0.0) -> Subscription:
        return SQLiteSubscription(self, channel, pattern, lag)

    # -- live nodes -------------------------------------------------------------------------
    def register_node(self, name: str, info: dict[str, Any], ttl: float) -> None:
        with self.db.write() as conn:
            conn.execute("INSERT OR REPLACE INTO nodes (name, info, alive_until) "
                         "VALUES (?, ?, ?)", (name, json.dumps(
                             {**info, "registry": self.options.registry}, default=str),
                             time.time() + ttl))

    def unregister_node(self, name: str) -> None:
        with self.db.write() as conn:
            conn.execute("DELETE FROM nodes WHERE name = ?", (name,))

    def live_nodes(self) -> list[str]:
        """The live nodes of this preset's registry (rows written before there was one
        per preset count as the qops preset's)."""
        rows = self.db.conn().execute(
            "SELECT name, info FROM nodes WHERE alive_until >= ? ORDER BY name",
            (time.time(),))
        return [name for name, info in rows if _registry(info) == self.options.registry]

    # -- dead letters ---------------------------------------------------------------------
    def dead_letter(self, queue: str, raw: bytes, reason: str) -> None:
        with self.db.write() as conn:
            conn.execute("INSERT INTO dead_letters (id, queue, reason, payload, created) "
                         "VALUES (?, ?, ?, ?, ?)",
                         (uuid.uuid4().hex, queue, reason, bytes(raw), time.time()))

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        rows = self.db.conn().execute(
            "SELECT id, queue, reason, payload, created FROM dead_letters "
            "ORDER BY created LIMIT ?", (limit,))
        return [DeadLetter(i, q, r, bytes(p), c) for i, q, r, p, c in rows]

    def dead_letter_count(self) -> int:
        return int(self.db.conn().execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0])

    def requeue_dead_letters(self, ids: Sequence[str] | None = None) -> int:
        with self.db.write() as conn:
            if ids is None:
                rows = conn.execute("SELECT id, queue, payload FROM dead_letters").fetchall()
            else:
                rows = [r for i in ids for r in conn.execute(
                    "SELECT id, queue, payload FROM dead_letters WHERE id = ?", (i,))]
            for dl_id, queue, payload in rows:
                conn.execute("INSERT OR IGNORE INTO queues (name) VALUES (?)", (queue,))
                conn.execute("INSERT INTO messages (queue, priority, payload) VALUES (?, 0, ?)",
                             (queue, payload))
                conn.execute("DELETE FROM dead_letters WHERE id = ?", (dl_id,))
            return len(rows)

    def purge_dead_letters(self) -> int:
        with self.db.write() as conn:
            return conn.execute("DELETE FROM dead_letters").rowcount

    # -- locks ------------------------------------------------------------------------
    def acquire_lock(self, name: str, owner: str, ttl: float) -> bool:
        """One IMMEDIATE transaction: read the row, take it if free, expired or ours."""
        now = time.time()
        try:
            with self.db.write() as conn:
                row = conn.execute("SELECT owner, expires FROM locks WHERE name = ?",
                                   (name,)).fetchone()
                if row is not None and row[0] != owner and row[1] > now:
                    return False
                conn.execute("INSERT OR REPLACE INTO locks (name, owner, expires) "
                             "VALUES (?, ?, ?)", (name, owner, now + ttl))
                return True
        except sqlite3.Error as exc:
            raise BrokerUnreachable(f"SQLite broker {self.path}: cannot take the lock "
                                    f"{name!r}: {exc}") from None

    def release_lock(self, name: str, owner: str) -> None:
        try:
            with self.db.write() as conn:
                conn.execute("DELETE FROM locks WHERE name = ? AND owner = ?", (name, owner))
        except sqlite3.Error as exc:
            raise BrokerUnreachable(f"SQLite broker {self.path}: cannot release the lock "
                                    f"{name!r}: {exc}") from None

    def ping(self) -> None:
        self.db.conn().execute("SELECT 1")

    def close(self) -> None:
        self.db.close()


_BATCH = 100  # broadcasts read per query


class SQLiteSubscription(Subscription):
    def __init__(self, transport: SQLiteTransport, channel: str,
                 pattern: str | None = None, lag: float = 0.0) -> None:
        self.db = transport.db
        self.channel = channel
        self.pattern = pattern
        row = self.db.conn().execute("SELECT MAX(id) FROM broadcasts").fetchone()
        self.last = row[0] or 0
        # a poll that finds nothing costs ~80 us here (a new read transaction after a
        # sleep): the interval only halves per arrival. 20 ms at most while idle: a
        # worker's control commands arrive this way. With a lag, every ``lag`` seconds.
        self._backoff = Backoff(max(0.001, lag), max(0.02, lag))
        self._closed = False
        self._rows: deque[tuple[int, bytes, str | None]] = deque()  # read, not yet returned
        self._caught_up = False  # the last query found fewer rows than it asked for

    def get(self, timeout: float) -> Message | None:
        deadline = time.monotonic() + timeout
        while not self._closed:
            if not self._rows:
                # caught up at the last query: wait before the next (a last look when
                # the time is up)
                expired = self._caught_up and not self._backoff.sleep(deadline)
                self._rows.extend(self.db.conn().execute(
                    "SELECT id, payload, routing_key FROM broadcasts WHERE channel = ? "
                    "AND id > ? ORDER BY id LIMIT ?", (self.channel, self.last, _BATCH)))
                self._caught_up = len(self._rows) < _BATCH
                if self._rows:
                    self._backoff.ease()
                elif expired:
                    return None
            while self._rows:
                self.last, payload, key = self._rows.popleft()
                if self.pattern is not None and not topic_matches(self.pattern, key):
                    continue
                try:
                    return decode_envelope(bytes(payload))
                except Exception:  # a bad broadcast must not stop the listener
                    continue
        return None

    def close(self) -> None:
        """A get() running in another thread returns within one poll interval."""
        self._closed = True


def _create_private(path: Path) -> None:
    """Create a new broker file 0600 before SQLite does (it would follow the umask):
    it holds every task's arguments and results. SQLite gives its -wal and -shm files
    the same mode. An existing file is left as it is."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except OSError:
        pass  # there already, or not creatable: sqlite3.connect says why


def _registry(info: str | None) -> str:
    """The registry a node row belongs to (``qops.nodes`` when it does not say)."""
    try:
        value = json.loads(info or "{}").get("registry")
    except (ValueError, AttributeError):
        value = None
    return str(value) if value else "qops.nodes"
