"""The typer side of the ``qops`` command line: the root command (its global options
are ``qops.cli.context.root``'s), the registration of the commands, and ``run``, where
every error becomes its exit code (the table in docs/commands.md): a QopsError its own,
a usage error from the parser 2, anything unexpected 1 -- each as one line on stderr
(the traceback only with ``--debug``) and, with ``--json``, as ``{"error": ...,
"exit_code": ...}`` on stdout (``qops.cli.options.outcome``).

``qops.cli.main`` (the entry point) imports this module only when typer has work to
do, and asks ``register`` for only the module of the command on the command line.
"""

from __future__ import annotations

import importlib
from typing import Any

import typer
from typer.core import TyperGroup

from qops.cli import params, shell
from qops.cli.context import root
from qops.cli.main import MODULES, hoist_global_options, undecodable
from qops.cli.options import outcome
from qops.cli.shell import Context
from qops.cli.terminal import Terminal
from qops.errors import EX_FAILURE, EX_USAGE, UsageError


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


#: the root callback as typer reads it (made once: ``help_root`` makes a second root)
_root_callback = params.typed(root)


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
    root_cmd.callback()(_root_callback)
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


def _typer_error(term: Terminal, exc: Exception) -> int | None:
    """The exit code of an error of typer's (reported here), None for any other."""
    if isinstance(exc, typer.Abort):
        term.fail("aborted", EX_FAILURE)
        return EX_FAILURE
    if _is_parser_error(exc):  # click's (typer's own copy of click in newer typer)
        name = str(getattr(exc, "option_name", None) or "")
        if name[1:2].isdigit() and hasattr(exc, "message"):  # rate_limit T -1/m
            exc.message += " (a value starting with '-'? put -- before the arguments)"
        shell.show_usage_error(exc)
        code = int(getattr(exc, "exit_code", EX_USAGE))
        term.error_document(exc.format_message(), code)  # type: ignore[attr-defined]
        return code
    return None


def run(args: list[str], term: Terminal, command: typer.Typer) -> int:
    """Run the command line ``args`` (global options hoisted) with the root ``command``;
    its exit code. Every error ends as one line (``terminal.outcome``)."""

    def call() -> Any:
        bad = undecodable(args)
        if bad is not None:
            raise UsageError(f"argument '{bad}' is not valid UTF-8: check the shell's "
                             "locale (LANG/LC_ALL) or the file the value came from")
        return command(args=args, prog_name="qops", standalone_mode=False, obj=term)

    return outcome(term, call, lambda exc: _typer_error(term, exc))
