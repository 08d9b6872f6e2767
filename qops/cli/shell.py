"""The habits of a shell user: an example in every command's ``--help``, completion of
node names and task names, and usage errors on one line when stderr is a file.

``decorate`` is applied by the root command (``main.QopsGroup``) to the commands typer
builds, so the examples live in one table here and each command module stays as it is.
Completion itself is typer's (``qops --install-completion``); the functions here supply
the values: node names from the pidfiles in the run directory (``multi``), task names
from the app, only when ``-A`` is on the command line (the app is never imported
otherwise).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

try:  # recent typer vendors click and uses that copy, not the ``click`` package
    from typer._click.core import Command, Context
    from typer._click.shell_completion import CompletionItem
except ImportError:  # pragma: no cover - typer before it vendored click
    from click.core import Command, Context  # type: ignore[assignment]
    from click.shell_completion import CompletionItem  # type: ignore[assignment]

#: command path -> command lines that work (the project's example app is ``proj``)
EXAMPLES: dict[str, tuple[str, ...]] = {
    "": ("qops -A proj worker -l INFO",
         "qops -A proj call proj.tasks.add --args '[2, 2]' --wait",
         "qops status --json"),
    "worker": ("qops -A proj worker -n w1@%h -c 4 -Q celery,images -l INFO",
               "qops -A proj worker -P threads --detach --logfile w1.log --pidfile w1.pid"),
    "call": ("qops -A proj call proj.tasks.add --args '[2, 2]' --wait --timeout 10",
             "qops -A proj call proj.tasks.mul --kwargs '{\"x\": 3, \"y\": 5}' --countdown 60"),
    "result": ("ID=$(qops -A proj call proj.tasks.add --args '[1, 2]')",
               'qops -A proj result "$ID" --wait --timeout 10'),
    "control": ("qops control rate_limit proj.tasks.add 10/m -d w1@web1",
                "qops control shutdown -d w1@web1 --json"),
    "inspect": ("qops inspect active --json",
                "qops inspect ping -d w1@web1 --timeout 5"),
    "status": ("qops status --json",
               "qops -b redis://localhost:6379/0 status -d w1@web1,w2@web1"),
    "purge": ("qops purge -Q celery --dry-run",
              "qops -b amqp://guest:guest@localhost:5672// purge -f -X important"),
    "queues": ("qops queues --json",
               "qops -b amqp://guest:guest@localhost:5672// queues "
               "--broker-api http://guest:guest@localhost:15672/api/"),
    "events": ("qops events --json -n 10",
               "qops events --type task-failed --timeout 60"),
    "top": ("qops -b redis://localhost:6379/0 top",
            "qops top --once --json --wait 3"),
    "exporter": ("qops -b redis://localhost:6379/0 exporter --port 9808",
                 "qops -b amqp://guest:guest@localhost:5672// exporter --bind 127.0.0.1"),
    "multi": ("qops multi start w1 w2 -A proj -c 4",
              "qops multi status w1 w2"),
    "beat": ("qops -A proj beat -l INFO",
             "qops -A proj beat --detach --pidfile beat.pid --logfile beat.log"),
    "schedule": ("qops -A proj schedule",),
    "demo": ("PYTHONPATH=examples qops demo",),
    "config": ("qops config show --changed",),
    "config show": ("qops --config ./qops.yaml config show --json",),
    "dlq": ("qops dlq list",),
    "dlq list": ("qops dlq list --limit 20 --json",),
    "dlq requeue": ("qops dlq requeue --all",),
    "dlq purge": ("qops dlq purge -f",),
    "generate": ("qops -A proj generate systemd --nodes 2 -o ./units",),
    "generate systemd": ("qops -A proj generate systemd --nodes 2 -c 4 -o ./units",),
    "generate supervisor": ("qops -A proj generate supervisor w1 w2 -o ./qops.conf",),
    "generate key": ("qops generate key /etc/qops/control.key --group qops",),
}

#: multi actions whose arguments are nodes that exist (completed from the rundir)
NODE_ACTIONS = ("stop", "stopwait", "restart", "kill", "status", "show", "get")


def decorate(group: TyperGroup, path: str = "") -> None:
    """Give ``group`` and its commands their examples (as the help's epilog), and
    ``multi`` its completion of node names."""
    _add_examples(group, path)
    for name, cmd in group.commands.items():
        sub = f"{path} {name}".strip()
        if isinstance(cmd, TyperGroup):
            decorate(cmd, sub)
        else:
            _add_examples(cmd, sub)
        if sub == "multi":
            _complete_nodes(cmd)


def _add_examples(cmd: Command, path: str) -> None:
    lines = EXAMPLES.get(path)
    if lines and not cmd.epilog:
        cmd.epilog = "Examples:\n" + "\n".join(f"  {line}" for line in lines)


def _complete_nodes(cmd: Command) -> None:
    """``multi`` takes its nodes as extra arguments (Celery's syntax), which click does
    not complete: after a node action, complete the nodes found in the run directory."""
    base = cmd.shell_complete

    def complete(ctx: Context, incomplete: str) -> list[Any]:

        if ctx.params.get("action") in NODE_ACTIONS and not incomplete.startswith("-"):
            return [CompletionItem(n) for n in node_names(list(ctx.args), incomplete)]
        return base(ctx, incomplete)

    cmd.shell_complete = complete  # type: ignore[method-assign]


def node_names(args: list[str], incomplete: str = "") -> list[str]:
    """Names of the nodes with a pidfile (or a node record beside it) in the run
    directory multi would use with ``args`` (``--rundir``; ``/run/qops`` for root with
    ``--uid``; else the current directory), not already in ``args``."""
    rundir = None
    for i, arg in enumerate(args):
        if arg == "--rundir" and i + 1 < len(args):
            rundir = args[i + 1]
        elif arg.startswith("--rundir="):
            rundir = arg.split("=", 1)[1]
    if rundir is None:
        root_with_uid = os.getuid() == 0 and any(a.split("=")[0] == "--uid" for a in args)
        rundir = "/run/qops" if root_with_uid else "."
    names: set[str] = set()
    with contextlib.suppress(OSError):
        for entry in Path(rundir).iterdir():
            m = re.fullmatch(r"(.+?)\.pid(\..+)?", entry.name)
            if m:
                names.add(m.group(1))
    return sorted(n for n in names if n.startswith(incomplete) and n not in args)


def _app_spec(ctx: Context) -> str | None:
    """The ``-A`` given on the command line being completed (not QOPS_APP or the
    config file: completing must not import an app nobody named)."""
    spec = ctx.find_root().params.get("app")
    return str(spec) if spec else None


def task_names(ctx: Context, incomplete: str) -> list[str]:
    """The app's task names starting with ``incomplete``, when ``-A`` names the app;
    nothing (never an error) otherwise."""
    spec = _app_spec(ctx)
    if not spec:
        return []
    try:
        with _silenced():
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            from qops.loading import load_app

            app = load_app(spec)
            app.import_modules()
            names = sorted(app.tasks)
    except Exception:  # noqa: BLE001 - a completion must never fail the shell
        return []
    builtin = ("qops.", "celery.")  # shown only when asked for by prefix
    return [n for n in names if n.startswith(incomplete)
            and (not n.startswith(builtin) or incomplete.startswith(builtin))]


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """Keep what an app prints on import out of the completion output (stdout)."""
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), \
            contextlib.redirect_stderr(devnull):
        yield


def complete_task(ctx: Context, incomplete: str) -> list[str]:
    """typer ``autocompletion`` for an argument that is a task name."""
    return task_names(ctx, incomplete)


def complete_control_args(ctx: Context, incomplete: str) -> list[str]:
    """``control rate_limit TASK`` / ``control time_limit TASK``: the task name."""
    if ctx.params.get("method") in ("rate_limit", "time_limit") and not ctx.params.get("args"):
        return task_names(ctx, incomplete)
    return []


def complete_control_method(incomplete: str) -> list[str]:
    from qops.control import CONTROL

    return sorted(c.name for c in CONTROL if c.name.startswith(incomplete))


def complete_inspect_method(incomplete: str) -> list[str]:
    from qops.control import INSPECT

    return sorted(c.name for c in INSPECT if c.name.startswith(incomplete))


def show_usage_error(exc: Any) -> None:
    """Show a usage error from the parser. On a terminal as typer does (rich's panel);
    elsewhere as click does without rich: the usage, the hint, and the error on one
    line (rich's panel wraps at 80 columns, which splits a long error over several
    lines of a log file)."""
    from typer import core

    if sys.stderr.isatty() or type(exc).__name__ == "NoArgsIsHelpError":
        if core.HAS_RICH:
            from qops.cli.richhelp import rich_utils

            rich_utils().rich_format_error(exc)
        else:
            exc.show()
        return
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        typer.echo(ctx.get_usage(), err=True)
        if ctx.command.get_help_option(ctx) is not None:
            typer.echo(f"Try '{ctx.command_path} {ctx.help_option_names[0]}' for help.",
                       err=True)
    message = " ".join(exc.format_message().split())
    typer.echo(f"qops: error: {message}", err=True)
