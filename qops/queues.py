"""Queue administration for ``qops purge`` and ``qops queues``: find the queues of this
namespace on the broker, count them, purge them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qops.errors import QueueNotFound
from qops.transports.base import QueueStats

if TYPE_CHECKING:
    from qops.app import App


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


def _require(app: App, queues: Sequence[str], note: str = "") -> None:
    """Queues named with -Q must exist: raise naming every one that does not."""
    missing = [q for q in queues if not app.transport.queue_exists(q)]
    if missing:
        raise QueueNotFound(f"no such queue: {', '.join(missing)}{note}")


def stats(app: App, queues: Sequence[str] | None = None) -> list[QueueStats]:
    if queues:
        _require(app, queues)
    return app.transport.queue_stats(list(queues) if queues else discover(app))


@dataclass
class PurgeReport:
    queue: str
    purged: int
    in_flight: int


def purge(app: App, queues: Sequence[str] | None = None, exclude: Sequence[str] = (),
          dry_run: bool = False) -> list[PurgeReport]:
    """Delete the ready messages of ``queues`` (default: every queue found), leaving
    in-flight ones alone. A queue named that does not exist is an error, and then
    nothing at all is purged."""
    transport = app.transport
    if queues:
        _require(app, queues, " (nothing was purged)")
        names = [q for q in queues if q not in exclude]
    else:
        names = [q for q in discover(app) if q not in exclude]
    reports = []
    for s in transport.queue_stats(names):
        removed = s.ready if dry_run else transport.purge(s.name)
        reports.append(PurgeReport(s.name, removed, s.in_flight))
    return reports
