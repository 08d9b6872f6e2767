"""``qops worker``. Its options are declared with ``qops.cli.options.Option``: a plain
``worker`` command line is run without typer (see that module), which a worker would
otherwise keep in memory for as long as it runs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from qops.cli.options import Context, Option
from qops.values import MAX_POOL_SIZE

if TYPE_CHECKING:
    import typer

# Options shared by the long-running commands (worker, beat)
Pidfile = Annotated[str | None, Option("--pidfile", help="Pidfile (templates %n ...), locked while the process runs.")]
Detach = Annotated[bool, Option("--detach", "-D", help="Run in the background; exit 0 once it runs.")]
Uid = Annotated[str | None, Option("--uid", help="Drop privileges to this user (name or number).")]
Gid = Annotated[str | None, Option("--gid", help="Drop privileges to this group.")]
Umask = Annotated[str | None, Option("--umask", help="Octal umask, e.g. 022.")]
Logfile = Annotated[str | None, Option("--logfile", "-f", help="Log file (templates %n %I ...).")]


def register(cli: typer.Typer) -> None:
    from qops.cli.params import typed

    cli.command("worker", help="Run a worker node (in the foreground, or --detach).")(
        typed(worker))


def worker(
    ctx: Context,
    hostname: Annotated[str | None, Option("-n", "--hostname", help="Node name, e.g. w1@%h.")] = None,
    queues: Annotated[str | None, Option("-Q", "--queues", help="Queues to consume, comma separated.")] = None,
    concurrency: Annotated[int | None, Option("-c", "--concurrency", min=1, max=MAX_POOL_SIZE, help="Pool size (default: CPUs).")] = None,
    pool: Annotated[str | None, Option("-P", "--pool", help="prefork, threads or solo.")] = None,
    loglevel: Annotated[str, Option("-l", "--loglevel", help="DEBUG, INFO, WARNING, ERROR.")] = "WARNING",
    logfile: Logfile = None,
    pidfile: Pidfile = None,
    detach: Detach = False,
    uid: Uid = None,
    gid: Gid = None,
    umask: Umask = None,
    prefetch_multiplier: Annotated[int | None, Option("--prefetch-multiplier", min=1, help="Messages reserved per pool slot.")] = None,
    max_tasks_per_child: Annotated[int | None, Option("--max-tasks-per-child", min=1, help="Replace a prefork child after N tasks.")] = None,
    task_events: Annotated[bool, Option("-E", "--task-events", help="Send task events (worker events are always sent).")] = False,
    beat: Annotated[bool, Option("-B", "--beat", help="Also run beat in this node (development only).")] = False,
    schedule: Annotated[str | None, Option("-s", "--schedule", help="With -B: beat's schedule file.")] = None,
    check: Annotated[bool, Option("--check", help="Check that this worker could start (options, app and tasks, root guard, broker) and exit 0, or with the error.")] = False,
    statedb: Annotated[str | None, Option("-S", "--statedb", help="File keeping revoked task ids across restarts (templates %n ...).")] = None,
) -> int:
    from qops.errors import UsageError
    from qops.ops.daemon import NodeProcess, setup_logging
    from qops.ops.nodes import node_name
    from qops.ops.privileges import check_root
    from qops.values import file_name, queue_name
    from qops.values import names as qnames

    g = ctx.obj
    if pool is not None and pool not in ("prefork", "threads", "solo"):
        raise UsageError(f"unknown pool {pool!r}: choose prefork, threads or solo")
    names = [queue_name(q) for q in qnames(queues, "-Q/--queues") or []]
    file_name(statedb, "the state db (-S)")
    file_name(schedule, "the schedule file (-s)")
    node = node_name(hostname)
    proc = NodeProcess(node, loglevel, logfile, pidfile, detach, uid, gid, umask)
    app = g.load_app(required=True, import_tasks=True)
    check_root(accept_content=list(app.conf.accept_content), uid=proc.uid_n)
    check_security(app, g.terminal, [proc.pid_path])
    if check:
        proc.check_files()
        app.transport.ping()
        return 0
    if detach and not logfile:
        g.terminal.note("qops: --detach without --logfile: the worker's logs are discarded")
    from qops.worker.worker import Worker

    def child_log(index: int) -> None:
        # a prefork child logs to its own file when the template has %I or %i
        if logfile and ("%I" in logfile or "%i" in logfile):
            setup_logging(proc.level, logfile, node, index)

    with proc.run(preload=app.preload) as readiness:
        from qops.control import name_taken

        if name_taken(app, node):
            from qops.errors import DuplicateNode

            raise DuplicateNode(f"a node named {node} is already running (it answers a "
                                "ping): stop it, or give this one another name (-n)")
        w = Worker(app, hostname=node,
                   queues=names or None,
                   concurrency=concurrency, pool=pool, prefetch_multiplier=prefetch_multiplier,
                   max_tasks_per_child=max_tasks_per_child,
                   task_events=True if task_events else None,
                   on_ready=lambda _w: readiness.ready(), child_init=child_log,
                   statedb=statedb)
        proc.children = lambda: w.pool.pids() if w.pool else ()
        if not g.terminal.quiet and not detach:
            print_banner(w, g.terminal)
        embedded = None
        if beat:
            from qops.beat import EmbeddedBeat

            embedded = EmbeddedBeat(app, schedule_file=schedule).start()  # forks: first
        try:
            code = w.start()
        finally:
            if embedded is not None:
                embedded.stop()
    return code


def check_security(app: Any, terminal: Any, pidfiles: list[Any]) -> None:
    """Before a node starts: a bad key file is a one-line error; a config file, key
    file or pidfile directory others may change is a warning (docs/security.md)."""
    from qops.ops.exposure import warnings
    from qops.signing import control_signer, task_signer

    control_signer(app)
    task_signer(app)
    for line in warnings(app, pidfiles):
        terminal.warn(line)


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
        f"  remote control: {info['remote_control']}",
        "",
        "[tasks]",
        *[f"  . {name}" for name in info["tasks"]],
        "",
    ]
    terminal.print("\n".join(lines))
