"""``qops events``: stream worker and task events as lines (``--json``: JSON lines)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Annotated, Any

import typer


def register(cli: typer.Typer) -> None:
    cli.command("events", help="Stream events as lines (--json: one JSON object a line).")(events)


def events(
    ctx: typer.Context,
    count: Annotated[int | None, typer.Option("--count", "-n", min=1, help="Stop after this many events.")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", min=0.1, help="Stop after this many seconds without an event.")] = None,
    types: Annotated[str | None, typer.Option("--type", help="Only these event types, comma separated, globs allowed (e.g. task-failed,worker-*).")] = None,
) -> None:
    from qops.events import receive

    g = ctx.obj
    wanted = _types(types)
    app = g.load_app()
    seen = 0
    for event in receive(app, timeout=timeout):
        if wanted is not None and event.get("type") not in wanted:
            continue
        if g.terminal.json_mode:
            print(json.dumps(event, default=str), flush=True)
        else:
            print(format_event(event), flush=True)
        seen += 1
        if count and seen >= count:
            break


def _types(value: str | None) -> set[str] | None:
    """The event types ``--type`` names, globs allowed (``task-*``); None: all."""
    import fnmatch

    from qops.errors import UsageError
    from qops.events import TYPES
    from qops.values import names

    patterns = names(value, "--type")
    if patterns is None:
        return None
    wanted: set[str] = set()
    for p in patterns:
        matched = fnmatch.filter(TYPES, p)
        if not matched:
            raise UsageError(f"--type: no event type {p!r}; the types: {', '.join(TYPES)}")
        wanted.update(matched)
    return wanted


def format_event(e: dict[str, Any]) -> str:
    when = dt.datetime.fromtimestamp(float(e.get("timestamp") or 0)).isoformat(timespec="seconds")
    kind = str(e.get("type"))
    head = f"{when} {kind:<17} {e.get('hostname')}"
    if kind.startswith("worker-"):
        return f"{head} active={e.get('active')} processed={e.get('processed')}"
    detail = " ".join(f"{k}={e[k]}" for k in ("name", "uuid", "runtime", "result", "exception")
                      if e.get(k) not in (None, ""))
    return f"{head} {detail}"
