"""``qops purge`` and ``qops queues``."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from qops.errors import QopsError, UsageError


def register(cli: typer.Typer) -> None:
    cli.command("purge", help="Delete the ready messages of queues (in-flight ones stay).")(purge)
    cli.command("queues", help="Each queue with ready and in-flight counts and consumers.")(queues)


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def purge(
    ctx: typer.Context,
    queues: Annotated[str | None, typer.Option("-Q", "--queues", help="Only these queues, comma separated (default: every queue found).")] = None,
    exclude: Annotated[str | None, typer.Option("-X", "--exclude-queues", help="Leave these queues alone.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count only; delete nothing.")] = False,
    force: Annotated[bool, typer.Option("-f", "--force", help="Do not ask for confirmation.")] = False,
) -> None:
    from qops import queues as q

    g = ctx.obj
    term = g.terminal
    app = g.load_app()
    names = _split(queues)
    if not dry_run and not force:
        if not sys.stdin.isatty():
            raise UsageError("refusing to purge without a terminal to confirm: pass -f/--force "
                             "(or --dry-run to count)")
        preview = q.purge(app, names or None, _split(exclude), dry_run=True)
        total = sum(r.purged for r in preview)
        listing = ", ".join(f"{r.queue} ({r.purged})" for r in preview) or "none"
        if not typer.confirm(f"Delete {total} message(s) from: {listing}?"):
            raise QopsError("not confirmed: nothing was purged")  # exit 1
    reports = q.purge(app, names or None, _split(exclude), dry_run=dry_run)
    total = sum(r.purged for r in reports)
    if term.json_mode:
        term.json({"dry_run": dry_run, "total": total,
                   "queues": {r.queue: {"purged": r.purged, "in_flight": r.in_flight}
                              for r in reports}})
        return
    verb = "would purge" if dry_run else "purged"
    term.table(["queue", verb, "in flight (left)"],
               [(r.queue, r.purged, r.in_flight) for r in reports])
    term.print(f"{verb} {total} message(s) from {len(reports)} queue(s).")


def queues(
    ctx: typer.Context,
    names: Annotated[str | None, typer.Option("-Q", "--queues", help="Only these queues, comma separated.")] = None,
) -> None:
    from qops import queues as q

    g = ctx.obj
    app = g.load_app()
    rows = q.stats(app, _split(names) or None)
    if g.terminal.json_mode:
        g.terminal.json([{"name": s.name, "ready": s.ready, "in_flight": s.in_flight,
                          "consumers": s.consumers} for s in rows])
        return
    g.terminal.table(["queue", "ready", "in flight", "consumers"],
                     [(s.name, s.ready, s.in_flight, s.consumers) for s in rows])
