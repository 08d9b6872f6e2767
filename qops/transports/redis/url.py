"""The Redis URL (broker and result backend): ``redis://[:password@]host:6379/<db>``,
``rediss://`` (TLS), ``unix:///path/to/redis.sock?db=<db>``, ``sentinel://`` (a list of
Sentinels: sentinel.py), with the optional query
``global_keyprefix=`` that qops takes out before redis-py sees the rest.

``parse_url`` checks the URL before anything connects: redis-py reads a db it cannot
parse (``/db0``, ``/0/x``) as db 0, so a typo would silently talk to -- and ``purge``
-- db 0. ``select_db`` is the connect hook that turns the server's "DB index is out of
range" into a one-line error naming the number of databases the server has.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode

from qops.errors import UsageError
from qops.transports.redis import sentinel
from qops.transports.urls import mask_password, split_network_url, url_error

if TYPE_CHECKING:
    import redis

_DB = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class RedisURL:
    url: str  # what redis-py is given (without global_keyprefix)
    prefix: str  # global_keyprefix
    db: int
    sentinel: sentinel.SentinelURL | None = None  # for sentinel:// URLs


def split_url(url: str) -> tuple[str, str]:
    """Take ``global_keyprefix`` out of the URL (redis-py would reject it as an unknown
    connection argument); return (url for redis-py, prefix)."""
    base, _, query = url.partition("?")
    if not query:
        return url, ""
    prefix = ""
    kept = []
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == "global_keyprefix":
            prefix = value
        else:
            kept.append((key, value))
    # rebuilt by hand: urlunsplit would turn unix:///path into unix:/path
    return base + ("?" + urlencode(kept) if kept else ""), prefix


def parse_url(url: str, what: str = "broker URL") -> RedisURL:
    """Check a ``redis://``, ``rediss://``, ``unix://`` or ``sentinel://`` URL; a
    one-line UsageError saying what is wrong and the expected form when it is
    malformed."""
    if sentinel.is_sentinel(url):
        redis_url, prefix = split_url(url)
        spec = sentinel.parse(url, what, _db_of)
        return RedisURL(url=redis_url, prefix=prefix, db=spec.db, sentinel=spec)
    parts, scheme, port = split_network_url(url, ("redis", "rediss", "unix"), what, "redis")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    db_text = query.get("db")
    if scheme == "unix":
        if parts.netloc.rpartition("@")[2]:
            raise url_error(url, what, "a socket path starts with '/' after 'unix://' "
                            "(three slashes)", scheme)
        if parts.path in ("", "/"):
            raise url_error(url, what, "no socket path", scheme)
    else:
        db = _db_of(parts, url, scheme, what)
        if db is not None:
            if db_text is not None and db_text != str(db):
                raise url_error(url, what, f"two dbs: /{db} and ?db={db_text}", scheme)
            db_text = str(db)
    if db_text is not None and not _DB.fullmatch(db_text):
        raise url_error(url, what, f"the db {db_text!r} is not a number", scheme)
    redis_url, prefix = split_url(url)
    _check_options(redis_url, url, what, scheme)
    return RedisURL(url=redis_url, prefix=prefix, db=int(db_text or 0))


def _db_of(parts: SplitResult, url: str, scheme: str, what: str) -> int | None:
    """The db a network URL names as its path (None without one)."""
    path = unquote(parts.path)
    if path in ("", "/"):
        return None
    if not _DB.fullmatch(path[1:]):
        hint = (" (no trailing '/')" if _DB.fullmatch(path[1:].rstrip("/"))
                else f" (e.g. /{path[1:].lstrip('db')})"
                if _DB.fullmatch(path[1:].lstrip("db")) else "")
        raise url_error(url, what, f"the db {path[1:]!r} is not a number{hint}", scheme)
    return int(path[1:])


def connection_pool(parsed: RedisURL, options: dict[str, Any], url: str, what: str,
                    **kwargs: Any) -> redis.ConnectionPool:
    """The redis-py pool for ``parsed``: a plain one, or for ``sentinel://`` one whose
    connections ask the Sentinels for the master (``options``: the transport options,
    ``master_name``, ``sentinel_kwargs``, ...). ``kwargs``: connection arguments."""
    import redis

    if parsed.sentinel is not None:
        pool: redis.ConnectionPool = sentinel.make_pool(parsed.sentinel, options, url, what,
                                                        **kwargs)
        return pool
    try:
        return redis.ConnectionPool.from_url(parsed.url, **kwargs)
    except ValueError as exc:
        raise url_error(url, what, str(exc), "redis") from None


def _check_options(redis_url: str, url: str, what: str, scheme: str) -> None:
    """redis-py's own reading of the query options (types of socket_timeout, ...)."""
    from redis.connection import parse_url as redis_parse_url

    try:
        redis_parse_url(redis_url)
    except ValueError as exc:
        raise url_error(url, what, str(exc).rstrip("."), scheme) from None


def select_db(conn: Any) -> None:
    """redis-py ``redis_connect_func``: the usual handshake (AUTH, SELECT, ...), with the
    server's "DB index is out of range" turned into a UsageError that says how many
    databases the server has."""
    import redis

    try:
        conn.on_connect()
    except redis.ResponseError as exc:
        if "out of range" not in str(exc):
            raise
        count = _databases(conn)
        conn.disconnect()
        have = (f"the server has {count} databases (0-{int(count) - 1})" if count
                else "the server has fewer databases (see 'databases' in redis.conf)")
        raise UsageError(f"bad Redis URL {mask_password(_url_of(conn))!r}: db {conn.db} is "
                         f"out of range: {have}") from None


def _databases(conn: Any) -> str | None:
    """The server's ``databases`` setting, None when CONFIG is not allowed."""
    import redis

    try:
        conn.send_command("CONFIG", "GET", "databases")
        reply = conn.read_response()
    except redis.RedisError:
        return None
    if isinstance(reply, list) and len(reply) == 2:
        value = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
        return value if value.isdigit() else None
    if isinstance(reply, dict):  # RESP3
        for value in reply.values():
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def _url_of(conn: Any) -> str:
    path = getattr(conn, "path", None)
    if path:
        return f"unix://{path}?db={conn.db}"
    scheme = "rediss" if "SSL" in type(conn).__name__ else "redis"
    return f"{scheme}://{conn.host}:{conn.port}/{conn.db}"
