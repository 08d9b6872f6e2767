"""The typer side of the ``qops`` command line: the root command with the global
options, the registration of the commands, and ``run``, where every error becomes its
exit code (the table in docs/commands.md): a QopsError its own, a usage error from the
parser 2, anything unexpected 1 -- each as one line on stderr (the traceback only with
``--debug``) and, with ``--json``, as ``{"error": ..., "exit_code": ...}`` on stdout.

``qops.cli.main`` (the entry point) imports this module only when typer has work to
do, and asks ``register`` for only the module of the command on the command line.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from qops.cli import params, shell
from qops.cli.main import MODULES, hoist_global_options, show_version, undecodable
from qops.cli.shell import Context
from qops.cli.terminal import Terminal
from qops.errors import EX_FAILURE, EX_USAGE, QopsError, UsageError


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


def _version(ctx: typer.Context, value: bool) -> None:
    if value:
        show_version(ctx.obj if isinstance(ctx.obj, Terminal) else Terminal())
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
        params.install(self)  # here: typer adds its completion options after __init__
        return super().make_context(info_name, hoist_global_options(args), parent, **extra)


def root(
    ctx: typer.Context,
    app: Annotated[str | None, typer.Option("-A", "--app", help="The app: module, module:attr or module.attr.")] = None,
    broker: Annotated[str | None, typer.Option("-b", "--broker", help="Broker URL (sqlite://, redis://, sentinel://, amqp://; a cluster: amqp://h1;amqp://h2).")] = None,
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
    # main's Terminal (already serving usage errors), set up from the parsed options
    terminal = ctx.obj if isinstance(ctx.obj, Terminal) else Terminal()
    terminal.__init__(json_mode=json_out, quiet=quiet,  # type: ignore[misc]
                      no_color=no_color, debug=debug)
    if workdir and ctx.invoked_subcommand != "generate":  # generate: the target host's dir
        try:
            os.chdir(workdir)
        except OSError as exc:
            terminal.abort(f"--workdir {workdir}: {exc.strerror}", EX_USAGE)
    if config:
        os.environ["QOPS_CONFIG"] = os.path.abspath(config)
    # -A names modules relative to the working directory, as Celery does.
    if (workdir or app) and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    ctx.obj = Globals(app=app, broker=broker, result_backend=result_backend, config=config,
                      workdir=workdir, compat=compat, terminal=terminal)


def _new_root() -> typer.Typer:
    """The root command, without commands."""
    root_cmd = typer.Typer(
        name="qops",
        cls=QopsGroup,
        help="qops: a fast, scriptable task queue speaking Celery's protocol.",
        no_args_is_help=True,
        add_completion=True,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    root_cmd.callback()(root)
    return root_cmd


cli = _new_root()
_registered: set[str] = set()


def register(modules: tuple[str, ...] = MODULES) -> typer.Typer:
    """Register the commands of ``modules`` (of qops.cli; each once), in the order of
    MODULES, which is the order of ``qops --help``; the root command."""
    for name in MODULES:
        if name in modules and name not in _registered:
            _registered.add(name)
            importlib.import_module(f"qops.cli.{name}").register(cli)
    return cli


class _Recorder(typer.Typer):
    """Takes the registrations of a command module in place of the root command."""

    def __init__(self) -> None:
        super().__init__()
        self.commands: list[tuple[str | None, dict[str, Any], Any]] = []
        self.groups: list[tuple[typer.Typer, dict[str, Any]]] = []

    def command(self, name: str | None = None, **kwargs: Any) -> Any:
        def record(func: Any) -> Any:
            self.commands.append((name, kwargs, func))
            return func
        return record

    def add_typer(self, typer_instance: typer.Typer, **kwargs: Any) -> None:
        self.groups.append((typer_instance, kwargs))


def _stand_in(func: Any) -> Any:
    def stand_in() -> None:  # pragma: no cover - never invoked
        raise AssertionError("a stand-in for the root help screen")
    stand_in.__doc__ = func.__doc__
    return stand_in


def help_root() -> typer.Typer:
    """A root command for ``qops --help`` alone: every command is there with its name
    and help as registered, but without its options (typer would otherwise work out
    the options of all the commands to show one line of each). Its own root command, so
    ``cli`` stays whole."""
    help_cmd = _new_root()
    for name in MODULES:
        recorder = _Recorder()
        importlib.import_module(f"qops.cli.{name}").register(recorder)
        for command_name, kwargs, func in recorder.commands:
            help_cmd.command(command_name, **kwargs)(_stand_in(func))
        for group, kwargs in recorder.groups:
            hollow = typer.Typer()
            hollow.info = group.info
            help_cmd.add_typer(hollow, **kwargs)
    return help_cmd


def _is_parser_error(exc: Exception) -> bool:
    return all(hasattr(exc, a) for a in ("exit_code", "format_message", "show"))


def run(args: list[str], term: Terminal, command: typer.Typer) -> int:
    """Run the command line ``args`` (global options hoisted) with the root ``command``;
    its exit code. Every error ends here as one line (see the module doc)."""
    code: int
    try:
        bad = undecodable(args)
        if bad is not None:
            raise UsageError(f"argument '{bad}' is not valid UTF-8: check the shell's "
                             "locale (LANG/LC_ALL) or the file the value came from")
        rv = command(args=args, prog_name="qops", standalone_mode=False, obj=term)
        code = rv if isinstance(rv, int) else 0
    except typer.Abort:
        code = EX_FAILURE
        term.fail("aborted", code)
    except QopsError as exc:
        if term.debug:
            traceback.print_exc()
        code = exc.exit_code
        term.fail(str(exc), code)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception as exc:
        from qops.transports.base import one_line

        if _is_parser_error(exc):  # click's (typer's own copy of click in newer typer)
            shell.show_usage_error(exc)
            code = int(getattr(exc, "exit_code", EX_USAGE))
            term.error_document(exc.format_message(), code)  # type: ignore[attr-defined]
            return code
        if term.debug:
            traceback.print_exc()
        code = EX_FAILURE
        term.fail(f"unexpected {type(exc).__name__}: {one_line(exc)} (this is a bug: "
                  "run again with --debug for the traceback)", code)
    if code and term.json_mode and not term.documents:
        term.json({"error": f"failed with exit code {code} (details on stderr)",
                   "exit_code": code})
    return code
