"""``qops dlq``: messages a worker could not run, with the reason."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from qops.errors import QopsError, UsageError


def register(cli: typer.Typer) -> None:
    group = typer.Typer(help="List, requeue or purge dead-lettered messages.",
                        no_args_is_help=True)
    group.command("list", help="List dead letters with their reasons.")(list_)
    group.command("requeue", help="Put dead letters back on their queues.")(requeue)
    group.command("purge", help="Delete every dead letter.")(purge)
    cli.add_typer(group, name="dlq")


def list_(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many.")] = 100,
) -> None:
    g = ctx.obj
    transport = g.load_app().transport
    items = transport.dead_letters(limit)
    if g.terminal.json_mode:
        g.terminal.json([d.as_dict() for d in items])
        return
    if not items:
        g.terminal.print("no dead letters")
        return
    import datetime as dt

    g.terminal.table(["id", "queue", "task", "task id", "time", "reason"], [
        (d.id, d.queue, *d.names(),
         dt.datetime.fromtimestamp(d.time).isoformat(timespec="seconds"), d.reason)
        for d in items])


def requeue(
    ctx: typer.Context,
    ids: Annotated[list[str] | None, typer.Argument(help="Dead-letter ids (see 'qops dlq list').")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Requeue every dead letter.")] = False,
) -> None:
    g = ctx.obj
    if not ids and not all_:
        raise UsageError("name dead-letter ids, or pass --all")
    if ids and all_:
        raise UsageError("give ids or --all, not both")
    n = g.load_app().transport.requeue_dead_letters(None if all_ else ids)
    missing = len(ids) - n if ids else 0
    if g.terminal.json_mode:
        g.terminal.json({"requeued": n, "not_found": missing})
    else:
        g.terminal.print(f"requeued {n} message(s)")
    if missing:  # exit 1: well-formed, not there (requeued already, or purged)
        raise QopsError(f"{missing} of {len(ids or [])} id(s) not found among the dead "
                        "letters: see 'qops dlq list'")


def purge(
    ctx: typer.Context,
    force: Annotated[bool, typer.Option("-f", "--force", help="Do not ask.")] = False,
) -> None:
    g = ctx.obj
    if not force:
        if not sys.stdin.isatty():
            raise UsageError("refusing to purge without a terminal to confirm: pass -f/--force")
        if not typer.confirm("Delete every dead letter?", err=True):
            raise QopsError("not confirmed: nothing was purged")  # exit 1
    n = g.load_app().transport.purge_dead_letters()
    if g.terminal.json_mode:
        g.terminal.json({"purged": n})
    else:
        g.terminal.print(f"purged {n} dead letter(s)")
