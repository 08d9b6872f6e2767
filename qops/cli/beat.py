"""``qops beat`` and ``qops schedule`` (= ``beat --show``). Their options are declared
with ``qops.cli.options.Option``, as worker's: a plain ``beat`` command line runs
without typer (qops.cli.options)."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Annotated, Any

from qops.cli.options import Context, Option
from qops.cli.worker import Detach, Gid, Logfile, Pidfile, Uid, Umask

if TYPE_CHECKING:
    import typer


def register(cli: typer.Typer) -> None:
    from qops.cli.params import typed

    cli.command("beat", help="Send periodic tasks when they are due (one beat per schedule).")(
        typed(beat))
    cli.command("schedule", help="List the periodic tasks with their next run times.")(
        typed(schedule))


def beat(
    ctx: Context,
    schedule_file: Annotated[str | None, Option("-s", "--schedule", help="Schedule file keeping last-run times (default: beat_schedule_filename, ./qops-beat-schedule).")] = None,
    loglevel: Annotated[str, Option("-l", "--loglevel", help="DEBUG, INFO (default: a line per task sent), WARNING, ERROR.")] = "INFO",
    logfile: Logfile = None,
    pidfile: Pidfile = None,
    detach: Detach = False,
    uid: Uid = None,
    gid: Gid = None,
    umask: Umask = None,
    max_interval: Annotated[float | None, Option("--max-interval", min=0.01, help="Seconds to sleep at most between looks at the schedule (default 2; the lock's ttl is 3x this).")] = None,
    show: Annotated[bool, Option("--show", help="List the entries with their next run times and exit.")] = False,
) -> int:
    from qops.beat import Beat
    from qops.ops.daemon import NodeProcess
    from qops.ops.nodes import node_name
    from qops.ops.privileges import check_root

    g = ctx.obj
    proc = NodeProcess(node_name("beat"), loglevel, logfile, pidfile, detach, uid, gid, umask)
    app = g.load_app(required=True, import_tasks=True)
    if show:
        _show(app, g.terminal, schedule_file)
        return 0
    check_root(accept_content=list(app.conf.accept_content), uid=proc.uid_n)
    from qops.cli.worker import check_security

    check_security(app, g.terminal, [proc.pid_path])
    with proc.run(preload=app.preload) as readiness:
        b = Beat(app, schedule_file=schedule_file, max_interval=max_interval)
        b.setup()
        if not g.terminal.quiet and not detach:
            _banner(b, g.terminal)
        signal.signal(signal.SIGTERM, lambda *_: b.stop())
        signal.signal(signal.SIGINT, lambda *_: b.stop())
        readiness.ready()
        b.run()
    return 0


def schedule(
    ctx: Context,
    schedule_file: Annotated[str | None, Option("-s", "--schedule", help="Schedule file to read last-run times from.")] = None,
) -> None:
    g = ctx.obj
    _show(g.load_app(required=True, import_tasks=True), g.terminal, schedule_file)


def _show(app: Any, terminal: Any, schedule_file: str | None) -> None:
    """The entries and their next runs, from the config and the schedule file (read
    only: no lock, nothing written)."""
    from qops.beat import Beat

    b = Beat(app, schedule_file=schedule_file)
    b.setup(check_writable=False)
    rows = b.table()
    if terminal.json_mode:
        terminal.json({"timezone": str(app.conf.timezone),
                       "schedule_file": str(b.schedule_file.path), "entries": rows})
        return
    if not rows:
        terminal.print("No periodic tasks: add entries to beat_schedule or call "
                       "app.add_periodic_task().")
        return
    terminal.table(
        ["name", "task", "schedule", "next run", "in", "last run", "queue"],
        [(r["name"], r["task"], r["schedule"], _short(r["next_run"]), _human(r["due_in"]),
          _short(r["last_run"]), r["options"].get("queue")) for r in rows],
        title=f"Periodic tasks (times in {app.conf.timezone})")


def _short(iso: str | None) -> str | None:
    """``2024-03-31T07:30:00+02:00`` -> ``2024-03-31 07:30:00+02:00``."""
    if not iso:
        return None
    text = iso.replace("T", " ")
    head, _, tail = text.partition(".")
    if tail:  # drop microseconds, keep the offset
        offset = tail[6:] if len(tail) > 6 else ""
        text = head + offset
    return text


def _human(seconds: float) -> str:
    """``3725`` -> ``1h 2m``: the two largest units."""
    if seconds < 1:
        return "due"
    rest = int(seconds)
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size or parts:
            parts.append(f"{rest // size}{unit}")
            rest %= size
        if len(parts) == 2:
            break
    return " ".join(parts)


def _banner(b: Any, terminal: Any) -> None:
    from qops import __version__

    app = b.app
    lines = [
        f"qops beat {__version__} is starting.",
        "",
        f"  app:          {app.main}",
        f"  transport:    {app.transport.safe_url()}",
        f"  schedule:     {b.schedule_file.path}",
        f"  timezone:     {app.conf.timezone}",
        f"  max interval: {b.max_interval:g}s",
        f"  lock:         {b.lock_name} (ttl {b.lock_ttl:g}s)",
        f"  entries:      {len(b.entries)}",
        "",
    ]
    terminal.print("\n".join(lines))
