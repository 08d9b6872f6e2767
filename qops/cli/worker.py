"""``qops worker``."""

from __future__ import annotations

import logging
from typing import Annotated, Any

import typer

LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def register(cli: typer.Typer) -> None:
    cli.command("worker", help="Run a worker node in the foreground.")(worker)


def worker(
    ctx: typer.Context,
    hostname: Annotated[str | None, typer.Option("-n", "--hostname", help="Node name, e.g. w1@%h.")] = None,
    queues: Annotated[str | None, typer.Option("-Q", "--queues", help="Queues to consume, comma separated.")] = None,
    concurrency: Annotated[int | None, typer.Option("-c", "--concurrency", min=1, help="Pool size (default: CPUs).")] = None,
    pool: Annotated[str | None, typer.Option("-P", "--pool", help="prefork, threads or solo.")] = None,
    loglevel: Annotated[str, typer.Option("-l", "--loglevel", help="DEBUG, INFO, WARNING, ERROR.")] = "WARNING",
    logfile: Annotated[str | None, typer.Option("--logfile", "-f", help="Log file (templates %n %I ...).")] = None,
    prefetch_multiplier: Annotated[int | None, typer.Option("--prefetch-multiplier", min=1, help="Messages reserved per pool slot.")] = None,
    max_tasks_per_child: Annotated[int | None, typer.Option("--max-tasks-per-child", min=1, help="Replace a prefork child after N tasks.")] = None,
) -> None:
    from qops.errors import UsageError
    from qops.ops.nodes import node_name
    from qops.ops.privileges import check_root

    g = ctx.obj
    level = loglevel.upper()
    if level not in LEVELS:
        raise UsageError(f"unknown log level {loglevel!r}: use one of {', '.join(LEVELS)}")
    if pool is not None and pool not in ("prefork", "threads", "solo"):
        raise UsageError(f"unknown pool {pool!r}: choose prefork, threads or solo")
    app = g.load_app(required=True, import_tasks=True)
    check_root(accept_content=list(app.conf.accept_content))
    node = node_name(hostname)
    setup_logging(level, logfile, node)
    from qops.worker.worker import Worker

    w = Worker(app, hostname=node,
               queues=[q.strip() for q in queues.split(",") if q.strip()] if queues else None,
               concurrency=concurrency, pool=pool, prefetch_multiplier=prefetch_multiplier,
               max_tasks_per_child=max_tasks_per_child,
               child_init=(lambda index: reopen_child_log(level, logfile, node, index))
               if logfile else None)
    if not g.terminal.quiet:
        print_banner(w, g.terminal)
    raise typer.Exit(w.start())


def setup_logging(level: str, logfile: str | None, node: str, index: int = 0) -> None:
    from qops.ops.nodes import expand

    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if logfile:
        handler = logging.FileHandler(expand(logfile, node, index), delay=False)
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)


def reopen_child_log(level: str, logfile: str | None, node: str, index: int) -> None:
    """In a prefork child: log to its own file when the template has %I or %i."""
    if logfile and ("%I" in logfile or "%i" in logfile):
        setup_logging(level, logfile, node, index)


def print_banner(w: Any, terminal: Any) -> None:
    from qops import __version__

    info = w.info()
    lines = [
        f"qops {__version__}  {info['hostname']}",
        "",
        f"  app:          {info['app']}",
        f"  transport:    {info['transport']}",
        f"  results:      {info['results']}",
        f"  concurrency:  {info['concurrency']}",
        f"  prefetch:     {info['prefetch']}",
        f"  queues:       {', '.join(info['queues'])}",
        "",
        "[tasks]",
        *[f"  . {name}" for name in info["tasks"]],
        "",
    ]
    terminal.print("\n".join(lines))
