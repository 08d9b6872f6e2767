"""``qops purge`` and ``qops queues``."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from qops.errors import QopsError, UsageError

BROKER_API_HELP = ("RabbitMQ management API, for in-flight counts and every queue of the "
                   "vhost, e.g. http://guest:guest@localhost:15672/api/ (default: the "
                   "broker's host, port 15672; 'off': do not ask).")
BrokerAPI = Annotated[str | None, typer.Option("--broker-api", help=BROKER_API_HELP)]


def register(cli: typer.Typer) -> None:
    cli.command("purge", help="Delete the ready messages of queues (in-flight ones stay).")(purge)
    cli.command("queues", help="Each queue with ready and in-flight counts and consumers.")(queues)


def _unknown(value: int | None) -> Any:
    """The table's cell for a count the broker cannot tell."""
    return "?" if value is None else value


def _load(ctx: typer.Context, broker_api: str | None) -> Any:
    app = ctx.obj.load_app()
    if broker_api is not None:
        app.conf.set("broker_api", broker_api, layer="cli", source="command line")
    return app


def purge(
    ctx: typer.Context,
    queues: Annotated[str | None, typer.Option("-Q", "--queues", help="Only these queues, comma separated (default: every queue found).")] = None,
    exclude: Annotated[str | None, typer.Option("-X", "--exclude-queues", help="Leave these queues alone.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count only; delete nothing.")] = False,
    force: Annotated[bool, typer.Option("-f", "--force", help="Do not ask for confirmation.")] = False,
    broker_api: BrokerAPI = None,
) -> None:
    from qops import queues as q
    from qops.values import names

    term = ctx.obj.terminal
    only, skip = names(queues, "-Q/--queues"), names(exclude, "-X/--exclude-queues")
    app = _load(ctx, broker_api)
    found = q.listing(app, only, skip, note=" (nothing was purged)")
    if found.unseen:
        term.note(f"qops: note: {found.unseen}")
    if not dry_run and not force:
        if not sys.stdin.isatty():
            raise UsageError("refusing to purge without a terminal to confirm: pass -f/--force "
                             "(or --dry-run to count)")
        preview = q.purge(app, dry_run=True, found=found)
        total = sum(r.purged for r in preview)
        listing = ", ".join(f"{r.queue} ({r.purged})" for r in preview) or "none"
        if not typer.confirm(f"Delete {total} message(s) from: {listing}?", err=True):
            raise QopsError("not confirmed: nothing was purged")  # exit 1
    reports = q.purge(app, dry_run=dry_run, found=found)
    total = sum(r.purged for r in reports)
    if term.json_mode:
        term.json({"dry_run": dry_run, "total": total,
                   "queues": {r.queue: {"purged": r.purged, "in_flight": r.in_flight}
                              for r in reports}})
        return
    verb = "would purge" if dry_run else "purged"
    term.table(["queue", verb, "in flight (left)"],
               [(r.queue, r.purged, _unknown(r.in_flight)) for r in reports])
    term.print(f"{verb} {total} message(s) from {len(reports)} queue(s).")


def queues(
    ctx: typer.Context,
    only: Annotated[str | None, typer.Option("-Q", "--queues", help="Only these queues, comma separated.")] = None,
    broker_api: BrokerAPI = None,
) -> None:
    from qops import queues as q
    from qops.values import names

    term = ctx.obj.terminal
    wanted = names(only, "-Q/--queues")
    found = q.listing(_load(ctx, broker_api), wanted)
    if found.unseen:
        term.note(f"qops: note: {found.unseen}")
    if term.json_mode:
        term.json([{"name": s.name, "ready": s.ready, "in_flight": s.in_flight,
                    "consumers": s.consumers} for s in found.queues])
        return
    term.table(["queue", "ready", "in flight", "consumers"],
               [(s.name, s.ready, _unknown(s.in_flight), s.consumers) for s in found.queues])
