"""What ``queue_stats`` reports: ready messages per queue, messages in flight on any
registered consumer, and the live consumers of each queue; without a list of queues,
every queue named in a kombu binding or holding messages in flight."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from qops.transports.base import QueueStats
from qops.transports.redis.names import BINDING_PREFIX, SEP, glob_escape
from qops.transports.redis.recovery import consumer_ids

if TYPE_CHECKING:
    from qops.transports.redis.transport import RedisTransport


def _consumers_view(t: RedisTransport) -> tuple[dict[str, list[str]], dict[str, int]]:
    """(live consumer id -> its queues, queue -> messages in flight on any consumer).

    In flight counts every registered consumer, dead-but-not-yet-recovered ones too:
    their messages are not ready either."""
    client = t._client
    cids = consumer_ids(t)
    if not cids:
        return {}, {}
    pipe = client.pipeline(transaction=False)
    for cid in cids:
        pipe.exists(t.key(f"qops.alive.{cid}"))
        pipe.hget(t.key(f"qops.consumer.{cid}"), "queues")
        pipe.smembers(t.key(f"qops.sources.{cid}"))
    res = pipe.execute()
    live: dict[str, list[str]] = {}
    sources: list[tuple[str, str]] = []
    for i, cid in enumerate(cids):
        alive, queues_json, names = res[3 * i: 3 * i + 3]
        if alive:
            try:
                live[cid] = [str(q) for q in json.loads(queues_json or b"[]")]
            except ValueError:
                live[cid] = []
        sources.extend((cid, n.decode("utf-8", "replace")) for n in names)
    flight: dict[str, int] = {}
    if sources:
        pipe = client.pipeline(transaction=False)
        for cid, name in sources:
            pipe.llen(t.inflight_key(cid, name))
        for (_, name), n in zip(sources, pipe.execute(), strict=True):
            if n:
                q = name.split(SEP, 1)[0]
                flight[q] = flight.get(q, 0) + int(n)
    return live, flight


#: the events exchanges of the two presets (docs/protocol.md §5)
EVENT_EXCHANGES = ("celeryev", "qopsev")


def _not_tasks(exchange: str) -> bool:
    """Whether kombu binding set ``_kombu.binding.<exchange>`` binds no task queue."""
    return (exchange.startswith("reply.") or exchange.endswith(".pidbox")
            or exchange in EVENT_EXCHANGES)


def _bound_queues(t: RedisTransport) -> set[str]:
    """Every queue named in a ``_kombu.binding.*`` set (the third field of members)."""
    client = t._client
    pattern = glob_escape(t.key(BINDING_PREFIX)) + "*"
    # Not task queues: what reply exchanges (``reply.<mailbox>``) bind (temporary reply
    # queues), what mailboxes (``*.pidbox``) bind (Celery's per-node pidbox queues) and
    # what the events exchanges bind (Celery's event receivers, ``celeryev.<uuid>``,
    # often left behind by a receiver that died).
    prefix = t.key(BINDING_PREFIX).encode()
    keys = [k for k in client.scan_iter(match=pattern, count=1000, _type="SET")
            if not _not_tasks(bytes(k)[len(prefix):].decode("utf-8", "replace"))]
    names: set[str] = set()
    if not keys:
        return names
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.smembers(k)
    for members in pipe.execute():
        for m in members:
            fields = m.decode("utf-8", "replace").split(SEP)
            if len(fields) == 3 and fields[2]:
                names.add(fields[2])
    return names


def queue_stats(t: RedisTransport, queues: Sequence[str] | None = None) -> list[QueueStats]:
    with t.guard("reading queue stats"):
        live, flight = _consumers_view(t)
        names = list(queues) if queues is not None else sorted(
            _bound_queues(t) | set(flight))
        if not names:
            return []
        pipe = t._client.pipeline(transaction=False)
        for name in names:
            for k in t.queue_keys(name):
                pipe.llen(k)
        lens = pipe.execute()
    out = []
    for i, name in enumerate(names):
        ready = int(sum(lens[4 * i: 4 * i + 4]))
        cons = sum(1 for qs in live.values() if name in qs)
        out.append(QueueStats(name, ready, flight.get(name, 0), cons))
    return out
