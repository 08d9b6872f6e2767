"""The broker URL of the AMQP transport: ``amqp://user:pass@host:5672/vhost?options``,
or the nodes of a cluster, ``;``-separated (``parse_urls``).

``parse_url`` reads it the way kombu does into ``AMQPParams``. Query options:
``heartbeat`` (AMQP heartbeat in seconds, default 60, 0 = off), ``dead_letter_queue``
(default ``qops.dlq``), ``blocked_connection_timeout`` (seconds, default 60: how long a
publish may wait while the broker blocks publishers, e.g. on a memory alarm, before it
fails with PublishError instead of hanging).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote

from qops.transports.urls import split_network_url, url_error

DEAD_LETTER_QUEUE = "qops.dlq"
DEFAULT_HEARTBEAT = 60
DEFAULT_BLOCKED_TIMEOUT = 60.0


@dataclass(frozen=True)
class AMQPParams:
    host: str
    port: int
    vhost: str
    user: str
    password: str
    tls: bool
    heartbeat: int
    dead_letter_queue: str
    blocked_connection_timeout: float


def parse_url(url: str) -> AMQPParams:
    """Split an ``amqp://`` URL the way kombu does: ``/x`` is vhost ``x``; an empty
    path, ``/`` or ``//`` is vhost ``/``; every part is percent-decoded. A malformed
    URL is a one-line UsageError naming the expected form."""
    what = "broker URL"
    parts, scheme, port = split_network_url(url, ("amqp", "amqps", "pyamqp"), what, "amqp")
    path = parts.path
    vhost = "/" if path in ("", "/") else unquote(path[1:])
    query = dict(parse_qsl(parts.query))
    try:
        heartbeat = int(query.get("heartbeat", DEFAULT_HEARTBEAT))
        blocked = float(query.get("blocked_connection_timeout", DEFAULT_BLOCKED_TIMEOUT))
    except ValueError as exc:
        raise url_error(url, what, f"bad option: {exc}", scheme) from None
    tls = scheme == "amqps"
    return AMQPParams(
        host=parts.hostname or "localhost",
        port=port or (5671 if tls else 5672),
        vhost=vhost,
        user=unquote(parts.username) if parts.username is not None else "guest",
        password=unquote(parts.password) if parts.password is not None else "guest",
        tls=tls,
        heartbeat=max(0, heartbeat),
        dead_letter_queue=query.get("dead_letter_queue") or DEAD_LETTER_QUEUE,
        blocked_connection_timeout=blocked,
    )


def parse_urls(url: str) -> tuple[AMQPParams, ...]:
    """The nodes of ``amqp://h1;amqp://h2...`` (one for a plain URL), each read by
    ``parse_url``. They are one cluster: the same vhost and dead-letter queue."""
    nodes = []
    for part in url.split(";"):
        if not part.strip():
            raise url_error(url, "broker URL", "an empty entry in the ';'-separated list",
                            "amqp")
        nodes.append(parse_url(part.strip()))
    first = nodes[0]
    for n in nodes[1:]:
        if n.vhost != first.vhost:
            raise url_error(url, "broker URL", f"the nodes name different vhosts "
                            f"({first.vhost!r}, {n.vhost!r}): one cluster, one vhost", "amqp")
        if n.dead_letter_queue != first.dead_letter_queue:
            raise url_error(url, "broker URL", "the nodes name different dead_letter_queue "
                            "options", "amqp")
    return tuple(nodes)
