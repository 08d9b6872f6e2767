"""Queue administration for ``qops purge`` and ``qops queues``: find the queues of this
namespace on the broker, count them, purge them.

Counts are what the broker can tell. Redis and SQLite know every queue and every message
in flight. RabbitMQ's AMQP counts only ready messages and consumers: the messages its
consumers hold unacknowledged, and the queues nobody configured or consumes, are known
to its management HTTP API (``qops.transports.amqp.management``), used when reachable;
without it the in-flight count of a queue that has consumers is unknown (None).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qops.errors import QueueNotFound

if TYPE_CHECKING:
    from qops.app import App
    from qops.transports.amqp.management import APIQueue


def configured_queues(app: App) -> set[str]:
    names = {app.default_queue}
    for target in (app.conf.task_routes or {}).values():
        if isinstance(target, str):
            names.add(target)
        elif isinstance(target, dict) and target.get("queue"):
            names.add(str(target["queue"]))
    names.update(t.queue for t in app.tasks.values() if t.queue)
    return names


def discover(app: App, *, ask_workers: float = 0.3) -> list[str]:
    """Every queue this broker has for us: what the broker lists (Redis bindings, the
    SQLite table, the queues this process has seen on RabbitMQ), what the app
    configures, and what live workers consume (asked with ``active_queues``)."""
    from qops.control import broadcast

    transport = app.transport
    names = {s.name for s in transport.queue_stats(None)}
    names |= {q for q in configured_queues(app) if transport.queue_exists(q)}
    if ask_workers > 0:
        replies = broadcast(app, "active_queues", timeout=ask_workers).replies
        for queues in replies.values():
            if isinstance(queues, list):
                names.update(q["name"] for q in queues if isinstance(q, dict) and "name" in q)
    return sorted(names)


def _require(app: App, queues: Sequence[str], note: str = "",
             what: str = "no such queue") -> None:
    """Queues named with -Q or -X must exist: raise naming every one that does not."""
    missing = [q for q in queues if not app.transport.queue_exists(q)]
    if missing:
        raise QueueNotFound(f"{what}: {', '.join(missing)}{note}")


@dataclass
class QueueCounts:
    name: str
    ready: int
    in_flight: int | None  # None: the broker cannot tell (RabbitMQ without its API)
    consumers: int


@dataclass
class Listing:
    """The queues counted, and, when the broker could not show them all or could not
    count what is in flight, a sentence saying so (for stderr)."""
    queues: list[QueueCounts]
    unseen: str | None = None
    api: str | None = field(default=None, repr=False)  # the management API used


def _api_queues(app: App) -> tuple[dict[str, APIQueue] | None, str]:
    """RabbitMQ's management API's view of the vhost: (queues, its URL), or (None, why
    not). ``broker_api`` unset: the default URL, asked with a short timeout, and a
    failure is only a note; set: a failure is an error (BrokerUnreachable)."""
    from qops.errors import BrokerUnreachable
    from qops.transports.amqp.management import (
        OFF,
        ManagementAPI,
        ManagementUnavailable,
        default_api_url,
    )

    transport = app.transport
    configured = app.conf.broker_api
    if configured is not None and str(configured).strip().lower() in (*OFF, ""):
        return None, "broker_api is off"
    params = transport.params  # type: ignore[attr-defined]
    if configured is None:
        api = ManagementAPI(default_api_url(params), timeout=1.0)
    else:
        api = ManagementAPI(str(configured),
                            timeout=float(app.conf.broker_connection_timeout))
    try:
        return api.queues(params.vhost, params.dead_letter_queue), api.safe_url
    except ManagementUnavailable as exc:
        if configured is not None:
            raise BrokerUnreachable(f"RabbitMQ management API at {api.safe_url}: {exc} "
                                    "(check --broker-api / broker_api)") from None
        return None, f"no management API at {api.safe_url} ({exc})"


def listing(app: App, queues: Sequence[str] | None = None,
            exclude: Sequence[str] | None = None, *, note: str = "") -> Listing:
    """Count ``queues`` (default: every queue found), minus ``exclude``. A queue named
    in either that does not exist is an error (QueueNotFound, ending with ``note``): a
    misspelt ``-X`` must not leave the queue it meant unprotected."""
    transport = app.transport
    exclude = exclude or ()
    if queues:
        _require(app, queues, note)
    if exclude:
        _require(app, exclude, note, what="no such queue to exclude")
    if transport.scheme != "amqp":
        names = list(queues) if queues else discover(app)
        names = [q for q in names if q not in exclude]
        return Listing([QueueCounts(s.name, s.ready, s.in_flight, s.consumers)
                        for s in transport.queue_stats(names)])
    found, why = _api_queues(app)
    if queues:
        names = list(queues)
    elif found is not None:
        names = sorted(set(found) | set(discover(app, ask_workers=0)))
    else:
        names = discover(app)
    names = [q for q in names if q not in exclude]
    rows = []
    for s in transport.queue_stats(names):
        # ready and consumers: AMQP's exact counts. In flight: none without a consumer;
        # else the API's count (it lags by up to the stats interval), or unknown.
        seen = found.get(s.name) if found is not None else None
        in_flight = 0 if s.consumers == 0 else seen.unacked if seen is not None else None
        rows.append(QueueCounts(s.name, s.ready, in_flight, s.consumers))
    if found is not None:
        return Listing(rows, api=why)
    unseen = f"{why}: in-flight counts of queues with consumers are unknown"
    if not queues:
        unseen += ("; only the queues the app configures or a live worker consumes were "
                   "seen, others on the broker were not: name them with -Q, or give "
                   "--broker-api http://user:pass@host:15672/api/")
    return Listing(rows, unseen=unseen)


def stats(app: App, queues: Sequence[str] | None = None) -> list[QueueCounts]:
    return listing(app, queues).queues


@dataclass
class PurgeReport:
    queue: str
    purged: int
    in_flight: int | None


def purge(app: App, queues: Sequence[str] | None = None, exclude: Sequence[str] = (),
          dry_run: bool = False, found: Listing | None = None) -> list[PurgeReport]:
    """Delete the ready messages of ``queues`` (default: every queue found), leaving
    in-flight ones alone. A queue named that does not exist is an error, and then
    nothing at all is purged. ``found``: a listing already made (not made again)."""
    if found is None:
        found = listing(app, queues, exclude, note=" (nothing was purged)")
    transport = app.transport
    return [PurgeReport(s.name, s.ready if dry_run else transport.purge(s.name), s.in_flight)
            for s in found.queues]
