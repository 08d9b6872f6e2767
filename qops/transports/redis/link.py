"""Talking to Redis below redis-py's client: RESP packing, the raw ``Link`` a consumer's
get loop owns, the Lua scripts (in ``lua/``), and which errors mean the broker is gone.

The consumer's reserve path sends pre-packed commands over a ``Link`` (no pool checkout,
pid check or retry wrapper per command); everything else goes through redis-py."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, cast

import redis

from qops.transports.base import one_line

# Errors that mean "the broker is not there or refused us" (AuthenticationError and
# BusyLoadingError are ConnectionError subclasses in redis-py).
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.NoPermissionError)
#: a redis-py client's repr, as a MasterNotFoundError lists the Sentinels it asked
_CLIENT = re.compile(r"<redis\.client\.Redis\(<.*?\bhost=([^,]+),port=(\d+),.*?\)>\)>\)>")


def reason(exc: BaseException) -> str:
    """A redis-py error on one line for an operator, without a trailing full stop (a
    hint follows), and the Sentinels a MasterNotFoundError lists as host:port rather than
    the 1 kB repr of each one's connection pool."""
    return _CLIENT.sub(r"\1:\2", one_line(exc)).rstrip(".")


def load_script(name: str) -> str:
    return resources.files(__package__).joinpath("lua").joinpath(name).read_text("utf-8")


def bulk(arg: bytes | str | int | float) -> bytes:
    """One RESP bulk string."""
    if isinstance(arg, bytes):
        b = arg
    elif isinstance(arg, str):
        b = arg.encode("utf-8")
    elif isinstance(arg, int):
        b = b"%d" % arg
    else:
        b = repr(arg).encode("ascii")
    return b"$%d\r\n%s\r\n" % (len(b), b)


def pack(args: Sequence[bytes | str | int | float]) -> bytes:
    """A command in RESP, as redis-py's packer would write it."""
    return b"*%d\r\n" % len(args) + b"".join(bulk(a) for a in args)


def pack_push(key: str, payloads: Sequence[bytes]) -> bytes:
    """``LPUSH key payload...`` in RESP: what ``pack`` writes, made in one join (a bulk
    send pushes thousands of envelopes; redis-py's packer takes a dozen Python steps
    an argument)."""
    name = key.encode("utf-8")
    parts: list[bytes | None] = [None] * (2 * len(payloads))
    parts[0::2] = [b"\r\n$%d\r\n" % len(p) for p in payloads]
    parts[1::2] = payloads
    return b"".join((b"*%d\r\n$5\r\nLPUSH\r\n$%d\r\n%s" % (len(payloads) + 2, len(name), name),
                     *cast("list[bytes]", parts), b"\r\n"))


_MULTI, _EXEC = pack(["MULTI"]), pack(["EXEC"])


def transaction(pool: redis.ConnectionPool, commands: Sequence[bytes],
                then: bytes | None = None) -> tuple[list[Any], Any]:
    """MULTI, the pre-packed ``commands``, EXEC, then the pre-packed ``then`` (a WAIT,
    say) if any, in one round trip on a connection of ``pool``: (EXEC's replies, an
    error reply as its exception object; ``then``'s reply). A command Redis refused
    as it queued it (out of memory, say) aborts the transaction: that refusal is
    raised (nothing of it was done). Not retried: an EXEC whose reply was lost may
    have run. A failure other than an error reply drops the connection."""
    conn = cast("redis.Connection", pool.get_connection())
    try:
        conn.send_packed_command([b"".join((_MULTI, *commands, _EXEC, then or b""))],
                                 check_health=False)
        refused: list[redis.ResponseError] = []
        for _ in range(len(commands) + 1):  # MULTI's +OK, then a +QUEUED each
            try:
                conn.read_response()
            except redis.ResponseError as exc:
                refused.append(exc)
        try:
            replies = conn.read_response()
        except redis.ResponseError as exc:  # EXECABORT
            refused.append(exc)
        after = None
        if then is not None:
            try:
                after = conn.read_response()
            except redis.ResponseError as exc:
                after = exc
    except BaseException:
        conn.disconnect()  # replies may be left unread: never reuse the stream
        raise
    finally:
        pool.release(conn)
    if refused:
        raise refused[0]
    if not isinstance(replies, list) or len(replies) != len(commands):
        raise redis.ResponseError(f"EXEC answered {replies!r:.100} to {len(commands)} "
                                  "commands")
    return replies, after


def read_flat(recv: Callable[[int], bytes]) -> list[int | bytes] | str:
    """Read one RESP reply that is an array of integers and bulk strings (or a null
    array: empty) with ``recv`` (a socket's); an error reply is returned as its text.
    Anything else raises ``redis.ConnectionError`` (the stream is out of step)."""
    buf = b""
    pos = 0
    out: list[int | bytes] = []
    n = -1  # elements still to read; -1 before the header
    while n:
        end = buf.find(b"\r\n", pos)
        if end < 0:
            chunk = recv(65536)
            if not chunk:
                raise redis.ConnectionError("Connection closed by server.")
            buf = buf[pos:] + chunk
            pos = 0
            continue
        kind = buf[pos:pos + 1]
        if n < 0:
            if kind == b"-":
                return buf[pos + 1:end].decode("utf-8", "replace")
            if kind == b"_" or buf[pos:end] == b"*-1":  # (RESP3 / RESP2 null)
                return out
            if kind != b"*":
                raise redis.ConnectionError(f"unexpected reply {buf[pos:end][:100]!r}")
            n = int(buf[pos + 1:end])
            pos = end + 2
        elif kind == b":":
            out.append(int(buf[pos + 1:end]))
            pos = end + 2
            n -= 1
        elif kind == b"$":
            size = int(buf[pos + 1:end])
            if size < 0:
                raise redis.ConnectionError("unexpected null in an array reply")
            start = end + 2
            stop = start + size
            while len(buf) < stop + 2:
                chunk = recv(max(65536, stop + 2 - len(buf)))
                if not chunk:
                    raise redis.ConnectionError("Connection closed by server.")
                buf += chunk
            out.append(buf[start:stop])
            pos = stop + 2
            n -= 1
        else:
            raise redis.ConnectionError(f"unexpected reply element {buf[pos:end][:100]!r}")
    if pos != len(buf):
        raise redis.ConnectionError("more bytes than one reply")
    return out


def _drop(conn: redis.Connection, exc: BaseException) -> None:
    """A raw read or write failed: drop the connection (the next command connects
    again) and raise a socket failure as the redis-py error it would have been."""
    conn.disconnect()
    if isinstance(exc, TimeoutError):  # (socket.timeout)
        raise redis.TimeoutError(f"Timeout reading from {conn.host}") from exc
    if isinstance(exc, OSError):
        raise redis.ConnectionError(f"Error while reading from {conn.host}: {exc}") from exc


class Link:
    """One connection owned by one thread (a consumer's get loop), used without redis-py's
    client and pool layers: no pool checkout, pid check or retry wrapper per command.
    Commands are never retried (see RedisConsumer); any failure other than an error reply
    drops the connection, and the next command connects again."""

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self._conn = cast("redis.Connection", pool.make_connection())

    def _connected(self) -> redis.Connection:
        """The connection, connected through its own ``connect()``: redis-py's
        ``send_packed_command`` would otherwise connect to the last address it had,
        which under Sentinel is not where the master is (``connect()`` asks the
        Sentinels first)."""
        conn = self._conn
        if not conn.is_connected:
            conn.connect()
        return conn

    def send(self, packed: bytes) -> Any:
        conn = self._connected()
        try:
            conn.send_packed_command([packed], check_health=False)
            return conn.read_response()
        except redis.ResponseError:
            raise  # an error reply: the connection is in step and stays usable
        except BaseException:
            conn.disconnect()
            raise

    def send_expecting(self, packed: bytes, reply: bytes) -> None:
        """``send(packed)`` for a command whose one good reply is ``reply`` (its RESP
        bytes, e.g. ``b":1\\r\\n"``), read straight off the socket: redis-py's parser
        costs a dozen Python calls per reply, which shows on a per-task path. Safe
        because a Link reads every reply of what it sent before it sends again, so
        the parser never holds bytes of its own here. An error reply raises what
        send() would (the connection stays in step); anything else drops it."""
        conn = self._connected()
        sock = conn._sock
        try:
            assert sock is not None
            sock.sendall(packed)
            data = sock.recv(4096)
            while not data.endswith(b"\r\n"):  # (a reply split across reads)
                more = sock.recv(4096)
                if not more:
                    raise redis.ConnectionError("Connection closed by server.")
                data += more
        except BaseException as exc:
            _drop(conn, exc)
            raise
        if data == reply:
            return
        if data[:1] == b"-" and data.count(b"\r\n") == 1:
            raise conn._parser.parse_error(data[1:-2].decode("utf-8", "replace"))
        conn.disconnect()
        raise redis.ResponseError(f"unexpected reply {data[:200]!r}")

    def send_flat(self, packed: bytes) -> list[int | bytes]:
        """``send(packed)`` for a command whose reply is an array of integers and bulk
        strings (the reserve script's), parsed here straight off the socket: redis-py's
        parser makes about ten Python calls per element. Same rules as send_expecting:
        an error reply raises (in step), anything unexpected drops the connection."""
        conn = self._connected()
        sock = conn._sock
        try:
            assert sock is not None
            sock.sendall(packed)
            out = read_flat(sock.recv)
        except redis.ResponseError:
            raise  # an error reply, read whole: in step
        except BaseException as exc:
            _drop(conn, exc)
            raise
        if isinstance(out, str):
            raise conn._parser.parse_error(out)
        return out

    def call(self, *args: bytes | str | int | float) -> Any:
        return self.send(pack(args))

    def many(self, commands: list[list[bytes | str | int | float]]) -> list[Any]:
        """Several commands in one round trip (a pipeline, not a transaction)."""
        if not commands:
            return []
        conn = self._connected()
        try:
            conn.send_packed_command([b"".join(pack(c) for c in commands)],
                                      check_health=False)
            return [conn.read_response() for _ in commands]
        except BaseException:
            conn.disconnect()  # replies may be left unread: never reuse the stream
            raise

    def many_then(self, commands: list[list[bytes | str | int | float]],
                  packed: bytes) -> Any:
        """``commands``, then the pre-packed command ``packed``, in one round trip;
        ``packed``'s reply (the others' are read and dropped: error replies included)."""
        if not commands:
            return self.send(packed)
        conn = self._connected()
        try:
            conn.send_packed_command([b"".join(pack(c) for c in commands) + packed],
                                      check_health=False)
            for _ in commands:
                try:
                    conn.read_response()
                except redis.ResponseError:
                    pass
        except BaseException:
            conn.disconnect()
            raise
        return self.send_read()

    def send_read(self) -> Any:
        """The reply of a command already sent."""
        conn = self._conn
        try:
            return conn.read_response()
        except redis.ResponseError:
            raise
        except BaseException:
            conn.disconnect()
            raise

    def script(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """EVALSHA, falling back to EVAL when the server does not know the script (it
        did not run then, so running it once now is safe)."""
        try:
            return self.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return self.call("EVAL", script.script, len(keys), *keys, *args)

    def close(self) -> None:
        self._conn.disconnect()
