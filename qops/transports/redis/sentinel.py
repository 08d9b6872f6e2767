"""Redis under Sentinel: the ``sentinel://`` URL and the connection pool that asks the
Sentinels where the master is.

The URL names the Sentinels, not the master, as kombu and Celery spell it::

    sentinel://[[user]:password@]host[:26379][/db];sentinel://host2[:26379][/db]...[?master_name=NAME]

- ``master_name`` (the name in ``sentinel monitor NAME ...``): the URL query, or the
  transport option of the same name (``broker_transport_options`` for the broker,
  ``result_backend_transport_options`` for results, as Celery reads them).
- The URL's user and password are the *master's* (Celery and kombu take them from the
  first URL of the list). Sentinels that want a password of their own get it from the
  transport option ``sentinel_kwargs: {password: ...}`` (any ``redis.Redis`` argument:
  ``username``, ``ssl``, ``ssl_ca_certs``, ...), as in Celery; ``min_other_sentinels``
  is passed through as well.
- TLS to the master: ``ssl=true`` or any ``ssl_*`` option (``ssl_cert_reqs``,
  ``ssl_ca_certs``, ...) in the query, read as redis-py reads a ``rediss://`` URL's.
- ``db`` and ``global_keyprefix`` as in a ``redis://`` URL (qops/transports/redis/url.py).

Every connection of a Sentinel pool asks the Sentinels for the master when it connects
(redis-py's ``SentinelConnectionPool``), and a connection that finds its server demoted
to a replica (READONLY) drops itself: after a failover the next command of each
connection reaches the new master.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode

from qops.errors import UsageError
from qops.transports.urls import mask_password, split_network_url, url_error

SCHEME = "sentinel"
DEFAULT_PORT = 26379
#: transport options read here (the rest of broker_transport_options is not for us)
OPTIONS = ("master_name", "sentinel_kwargs", "min_other_sentinels")


@dataclass(frozen=True)
class SentinelURL:
    sentinels: tuple[tuple[str, int], ...]
    db: int
    master_name: str | None  # from the query; the transport option otherwise
    #: connection arguments for the master (username, password, socket and TLS options)
    master_kwargs: dict[str, Any] = field(default_factory=dict)


def is_sentinel(url: str) -> bool:
    return url[:9].lower() == "sentinel:"


def parse(url: str, what: str,
          check_db: Callable[[SplitResult, str, str, str], int | None]) -> SentinelURL:
    """Check a ``sentinel://`` URL (one or more, ``;``-separated); ``check_db(parts, url,
    scheme, what)`` is url.py's reading of the db (the path)."""
    segments = [s.strip() for s in url.split(";")]
    hosts: list[tuple[str, int]] = []
    dbs: set[int] = set()
    creds: set[tuple[str | None, str | None]] = set()
    query: list[tuple[str, str]] = []
    for seg in segments:
        if not seg:
            raise url_error(url, what, "an empty entry in the ';'-separated list", SCHEME)
        parts, _, port = split_network_url(seg, (SCHEME,), what, SCHEME)
        if not parts.hostname:
            raise url_error(url, what, f"no Sentinel host in {mask_password(seg)!r}", SCHEME)
        hosts.append((unquote(parts.hostname), port or DEFAULT_PORT))
        db = check_db(parts, url, SCHEME, what)
        if db is not None:
            dbs.add(db)
        if parts.username is not None or parts.password is not None:
            creds.add((unquote(parts.username) if parts.username else None,
                       unquote(parts.password) if parts.password is not None else None))
        query += parse_qsl(parts.query, keep_blank_values=True)
    if len(dbs) > 1:
        raise url_error(url, what, f"the entries name different dbs ({sorted(dbs)})", SCHEME)
    if len(creds) > 1:
        raise url_error(url, what, "the entries carry different users or passwords "
                        "(the master's password is given once)", SCHEME)
    options = dict(query)
    if len(options) < len(query):
        raise url_error(url, what, "an option is given twice", SCHEME)
    master_name = options.pop("master_name", None)
    options.pop("global_keyprefix", None)  # url.py takes it out
    if master_name == "":
        raise url_error(url, what, "master_name is empty", SCHEME)
    if options.pop("db", None) is not None:
        raise url_error(url, what, "give the db as the path (/N), not ?db=", SCHEME)
    kwargs = _master_kwargs(options, url, what)
    user, password = next(iter(creds)) if creds else (None, None)
    if user:
        kwargs["username"] = user
    if password is not None:
        kwargs["password"] = password
    return SentinelURL(tuple(hosts), next(iter(dbs)) if dbs else 0, master_name, kwargs)


def _master_kwargs(options: dict[str, str], url: str, what: str) -> dict[str, Any]:
    """The query's connection options as redis-py types them (its own URL parser, on a
    stand-in ``redis://`` URL); TLS when ``ssl=true`` or any ``ssl_*`` option is given."""
    from redis.connection import parse_url as redis_parse_url

    ssl_text = options.pop("ssl", None)
    if ssl_text is not None and ssl_text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise url_error(url, what, f"ssl={ssl_text!r} is not true or false", SCHEME)
    ssl = (ssl_text or "").lower() in ("true", "1", "yes") or any(
        k.startswith("ssl_") for k in options)
    stand_in = "redis://localhost/" + ("?" + urlencode(options) if options else "")
    try:
        kwargs = redis_parse_url(stand_in)
    except ValueError as exc:
        raise url_error(url, what, str(exc).rstrip("."), SCHEME) from None
    for key in ("host", "port", "db", "connection_class"):
        kwargs.pop(key, None)
    if ssl:
        kwargs["ssl"] = True  # SentinelConnectionPool picks SentinelManagedSSLConnection
    return dict(kwargs)


def master_name(spec: SentinelURL, options: dict[str, Any], url: str, what: str) -> str:
    name = spec.master_name or options.get("master_name")
    if not name:
        setting = ("result_backend_transport_options" if "backend" in what
                   else "broker_transport_options")
        raise UsageError(f"bad {what} {mask_password(url)!r}: no master_name: add "
                         f"?master_name=NAME to the URL or set {setting}: "
                         "{master_name: NAME} (the name in 'sentinel monitor NAME ...')")
    if not isinstance(name, str):
        raise UsageError(f"master_name must be a string, not {name!r}")
    return name


def make_pool(spec: SentinelURL, options: dict[str, Any], url: str, what: str,
              **kwargs: Any) -> Any:
    """A redis-py ``SentinelConnectionPool`` for the master: ``kwargs`` are the pool's
    connection arguments (timeouts, retry, client name, connect hook) as for a plain
    ``redis://`` pool; the URL's options come on top."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    from redis.sentinel import Sentinel, SentinelConnectionPool

    name = master_name(spec, options, url, what)
    sentinel_kwargs = options.get("sentinel_kwargs")
    if sentinel_kwargs is not None and not isinstance(sentinel_kwargs, dict):
        raise UsageError(f"sentinel_kwargs must be a mapping (e.g. {{password: ...}}), "
                         f"not {type(sentinel_kwargs).__name__}")
    conn = {**kwargs, **spec.master_kwargs, "db": spec.db}
    # The Sentinels get the socket options only (redis-py's default), never the master's
    # password; and no retry of their own: a Sentinel that does not answer is passed for
    # the next at once (redis-py's default retried each with back-off, and a command
    # line with no Sentinel running took 16 s to say so). Waiting out a failover is the
    # callers' (the worker's reconnect, the result backend's FAILOVER_WAIT).
    sentinel_kwargs = {**{k: v for k, v in conn.items() if k.startswith("socket_")},
                       "retry": Retry(NoBackoff(), 0), **(sentinel_kwargs or {})}
    manager = Sentinel(list(spec.sentinels),
                       min_other_sentinels=int(options.get("min_other_sentinels") or 0),
                       sentinel_kwargs=sentinel_kwargs)
    return SentinelConnectionPool(name, manager, **conn)
