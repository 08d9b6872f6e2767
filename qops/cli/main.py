"""``qops`` command line. The only package that imports typer and rich.

Global options may stand before or after the command (``qops -A proj worker`` and
``qops worker -A proj`` are the same): ``main`` moves them to the front before typer
parses, so every command sees them in one place.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from qops.cli import shell
from qops.cli.shell import Context
from qops.cli.terminal import Terminal
from qops.errors import EX_USAGE, QopsError

# Global options: name -> takes a value
GLOBAL_OPTIONS: dict[str, bool] = {
    "-A": True, "--app": True, "-b": True, "--broker": True, "--result-backend": True,
    "--config": True, "--workdir": True, "--compat": True,
    "-q": False, "--quiet": False, "--json": False, "--no-color": False, "--debug": False,
}


def hoist_global_options(argv: list[str]) -> list[str]:
    """Move global options found after the command to the front (stops at ``--``)."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest.extend(argv[i:])
            break
        name = arg.split("=", 1)[0]
        if name in GLOBAL_OPTIONS:
            if GLOBAL_OPTIONS[name] and "=" not in arg:
                front.extend(argv[i:i + 2])
                i += 2
                continue
            front.append(arg)
        else:
            rest.append(arg)
        i += 1
    return front + rest


@dataclass
class Globals:
    app: str | None = None
    broker: str | None = None
    result_backend: str | None = None
    config: str | None = None
    workdir: str | None = None
    compat: str | None = None
    terminal: Terminal = Terminal()

    def load_app(self, *, required: bool = False, import_tasks: bool = False) -> Any:
        """The App for this command. Broker-only commands pass ``required=False`` and get
        a bare App unless ``-A`` (or QOPS_APP / ``app:`` in the config file) names one."""
        from qops.app import App
        from qops.loading import load_app
        from qops.settings import find_config_file, read_yaml

        spec = self.app or os.environ.get("QOPS_APP")
        if not spec:
            path = find_config_file()
            if path is not None:
                spec = read_yaml(path).get("app")
        if spec:
            app = load_app(str(spec))
            if import_tasks:
                app.import_modules()
        elif required:
            from qops.errors import UsageError

            raise UsageError("this command needs the app: pass -A/--app (e.g. -A proj), "
                             "set QOPS_APP, or put 'app: proj' in qops.yaml")
        else:
            app = App("qops")
        for key, value in (("broker_url", self.broker),
                           ("result_backend", self.result_backend),
                           ("compat", self.compat)):
            if value is not None:
                app.conf.set(key, value, layer="cli", source="command line")
        return app


def _version(value: bool) -> None:
    if value:
        from qops import __version__

        print(f"qops {__version__}")
        raise typer.Exit()


class QopsGroup(TyperGroup):
    """The root command. Global options may follow the command: they are moved to the
    front here, where shell completion's parsing sees them too. The examples in each
    command's help and the completions of values come from ``shell``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        shell.decorate(self)

    def make_context(self, info_name: str | None, args: list[str],
                     parent: Context | None = None, **extra: Any) -> Context:
        with shell.plain_usage_errors():
            return super().make_context(info_name, hoist_global_options(args), parent,
                                        **extra)

    def invoke(self, ctx: Context) -> Any:
        with shell.plain_usage_errors():
            return super().invoke(ctx)


cli = typer.Typer(
    name="qops",
    cls=QopsGroup,
    help="qops: a fast, scriptable task queue speaking Celery's protocol.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@cli.callback()
def root(
    ctx: typer.Context,
    app: Annotated[str | None, typer.Option("-A", "--app", help="The app: module, module:attr or module.attr.")] = None,
    broker: Annotated[str | None, typer.Option("-b", "--broker", help="Broker URL (sqlite://, redis://, amqp://).")] = None,
    result_backend: Annotated[str | None, typer.Option("--result-backend", help="Result backend URL.")] = None,
    config: Annotated[str | None, typer.Option("--config", help="YAML config file (default ./qops.yaml, then /etc/qops/qops.yaml).")] = None,
    workdir: Annotated[str | None, typer.Option("--workdir", help="Change to this directory first.")] = None,
    compat: Annotated[str | None, typer.Option("--compat", help="Names on the wire: qops or celery.")] = None,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Print less.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
    no_color: Annotated[bool, typer.Option("--no-color", help="No colours.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    if workdir and ctx.invoked_subcommand != "generate":  # generate: the target host's dir
        try:
            os.chdir(workdir)
        except OSError as exc:
            Terminal().abort(f"--workdir {workdir}: {exc.strerror}", EX_USAGE)
    if config:
        os.environ["QOPS_CONFIG"] = os.path.abspath(config)
    # -A names modules relative to the working directory, as Celery does.
    if (workdir or app) and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    ctx.obj = Globals(app=app, broker=broker, result_backend=result_backend, config=config,
                      workdir=workdir, compat=compat,
                      terminal=Terminal(json_mode=json_out, quiet=quiet, no_color=no_color,
                                        debug=debug))


def _register() -> None:
    from qops.cli import (
        beat,
        config_cmd,
        control,
        demo,
        dlq,
        events_cmd,
        generate,
        multi,
        queues,
        tasks,
        worker,
    )

    worker.register(cli)
    tasks.register(cli)
    control.register(cli)
    queues.register(cli)
    events_cmd.register(cli)
    multi.register(cli)
    beat.register(cli)
    config_cmd.register(cli)
    dlq.register(cli)
    demo.register(cli)
    generate.register(cli)


_register()


def main(argv: list[str] | None = None) -> None:
    args = hoist_global_options(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in args
    if "--no-color" in args[:args.index("--") if "--" in args else None]:
        os.environ["NO_COLOR"] = "1"  # rich's help screens and errors read it too
    try:
        cli(args=args, prog_name="qops", standalone_mode=True)
    except QopsError as exc:
        if debug:
            raise
        Terminal().abort(exc)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
