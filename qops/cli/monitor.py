"""``qops top`` (the cluster at a glance, live or ``--once``) and ``qops exporter``
(Prometheus ``/metrics``), both on ``qops.monitor``."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Annotated, Any

import typer

from qops.errors import UsageError


def register(cli: typer.Typer) -> None:
    cli.command("top", help="The cluster live: nodes, queues, running tasks, failures "
                            "(--once: one snapshot).")(top)
    cli.command("exporter", help="Serve Prometheus metrics (/metrics) and /healthz "
                                 "(needs qops\\[metrics]).")(exporter)


Queues = Annotated[str | None, typer.Option("-Q", "--queues", help="Only these queues, comma separated (default: every queue found).")]
NoEnable = Annotated[bool, typer.Option("--no-enable-events", help="Do not ask workers to send task events (enable_events).")]


def _feed(ctx: typer.Context, queues: str | None, interval: float, no_enable: bool) -> Any:
    from qops.monitor.feed import Feed
    from qops.values import names

    only = names(queues, "-Q/--queues") or []
    app = ctx.obj.load_app()
    return Feed(app, poll_interval=interval, enable_events=not no_enable, queues=only)


def top(
    ctx: typer.Context,
    once: Annotated[bool, typer.Option("--once", help="Print one snapshot and exit (plain text, or JSON with --json).")] = False,
    wait: Annotated[float | None, typer.Option("--wait", min=0, help="--once: listen this long for heartbeats first, and measure the queues' rates over it (seconds; default: one heartbeat interval and a half).")] = None,
    interval: Annotated[float, typer.Option("--interval", min=0.2, help="Seconds between screen refreshes and queue polls.")] = 1.0,
    sort: Annotated[str, typer.Option("--sort", help="Sort nodes by name, active, rate, processed or failed (key s cycles).")] = "name",
    filter_: Annotated[str, typer.Option("--filter", help="Only nodes, queues and tasks whose name contains this (key f).")] = "",
    queues: Queues = None,
    no_enable: NoEnable = False,
) -> None:
    from qops.cli import top_view

    term = ctx.obj.terminal
    if sort not in [s[0] for s in top_view.SORTS]:
        raise UsageError(f"--sort {sort}: use one of "
                         + ", ".join(s[0] for s in top_view.SORTS))
    live = not once and not term.json_mode
    if live and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("qops top needs a terminal: use --once (plain text) or --once --json")
    feed = _feed(ctx, queues, interval if live else 3600.0, no_enable)
    if not live:
        app = feed.app
        if wait is None:
            wait = float(app.conf.worker_heartbeat_interval) * 1.5
        with feed:
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline or (feed.polls == 0
                                                  and time.monotonic() < deadline + 30):
                time.sleep(0.05)
            if wait >= 0.5:  # a second count: the queues' rates over the wait
                feed.poll_once()
        snap = top_view.select(feed.state.snapshot(), sort, filter_)
        if not snap["broker_up"]:
            from qops.errors import BrokerUnreachable

            raise BrokerUnreachable(f"broker {app.transport.safe_url()} did not answer")
        if term.json_mode:
            term.json(snap)
        else:
            term.print(top_view.plain(snap))
        return
    view = top_view.View(sort=[s[0] for s in top_view.SORTS].index(sort), filter=filter_)
    _live(feed, view, interval)


def _live(feed: Any, view: Any, interval: float) -> None:
    from rich.console import Console
    from rich.live import Live

    from qops.cli import top_view

    console = Console()
    try:
        with feed, _cbreak(), Live(console=console, screen=True, auto_refresh=False) as live:
            next_draw = 0.0
            while True:
                now = time.monotonic()
                if now >= next_draw:
                    snap = top_view.select(feed.state.snapshot(), top_view.SORTS[view.sort][0],
                                           view.filter)
                    live.update(top_view.rich_view(snap, view), refresh=True)
                    next_draw = now + interval
                ready, _, _ = select.select([sys.stdin], [], [], max(0.0, next_draw - now))
                if ready:
                    try:
                        data = os.read(sys.stdin.fileno(), 1)
                    except OSError:  # EIO: the terminal hung up
                        return
                    if not data:  # end of input: the terminal is gone (it used to spin here)
                        return
                    if not view.key(data.decode(errors="ignore")):
                        return
                    next_draw = 0.0  # show what the key changed now
    except OSError as exc:  # EIO: the terminal hung up while drawing or restoring it
        if exc.errno != errno.EIO:
            raise


@contextlib.contextmanager
def _cbreak() -> Iterator[None]:
    """Keys one at a time, unechoed, for the live view."""
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        try:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        except termios.error:  # the terminal is gone: nothing left to restore
            pass


def exporter(
    ctx: typer.Context,
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port (0: any free one, printed on stderr).")] = 9808,
    bind: Annotated[str, typer.Option("--bind", help="Address to listen on.")] = "0.0.0.0",
    interval: Annotated[float, typer.Option("--interval", min=0.2, help="Seconds between queue polls.")] = 5.0,
    queues: Queues = None,
    no_enable: NoEnable = False,
) -> None:
    from qops.monitor.exporter import Exporter

    term = ctx.obj.terminal
    feed = _feed(ctx, queues, interval, no_enable)
    server = Exporter(feed.state, bind=bind, port=port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with feed:
        server.start()
        term.note(f"qops exporter: serving http://{bind}:{server.port}/metrics "
                  f"(broker {feed.app.transport.safe_url()})")
        try:
            stop.wait()
        finally:
            server.stop()
