"""``qops`` command line. The only package that imports typer and rich.

Global options may stand before or after the command (``qops -A proj worker`` and
``qops worker -A proj`` are the same): ``main`` moves them to the front before typer
parses, so every command sees them in one place.

``main`` is also where every error becomes its exit code (the table in
docs/commands.md): a QopsError its own, a usage error from the parser 2, anything
unexpected 1 -- each as one line on stderr (the traceback only with ``--debug``) and,
with ``--json``, as ``{"error": ..., "exit_code": ...}`` on stdout.
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from qops.cli import shell
from qops.cli.shell import Context
from qops.cli.terminal import Terminal
from qops.errors import EX_FAILURE, EX_USAGE, QopsError, UsageError

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


def _version(ctx: typer.Context, value: bool) -> None:
    if value:
        from qops import __version__

        term = ctx.obj if isinstance(ctx.obj, Terminal) else Terminal()
        if term.json_mode:
            term.json({"version": __version__})
        else:
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
        return super().make_context(info_name, hoist_global_options(args), parent, **extra)


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


def _register() -> None:
    from qops.cli import (
        beat,
        config_cmd,
        control,
        demo,
        dlq,
        events_cmd,
        generate,
        monitor,
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
    monitor.register(cli)


_register()


def _early_terminal(args: list[str]) -> Terminal:
    """The Terminal for the flags among the global options at the front of ``args``
    (hoisted there), before typer parses: usage errors need it too."""
    flags = set()
    i = 0
    while i < len(args) and args[i].split("=", 1)[0] in GLOBAL_OPTIONS:
        name = args[i].split("=", 1)[0]
        flags.add(name)
        i += 2 if GLOBAL_OPTIONS[name] and "=" not in args[i] else 1
    return Terminal(json_mode="--json" in flags, quiet=bool(flags & {"-q", "--quiet"}),
                    no_color="--no-color" in flags, debug="--debug" in flags)


def _undecodable(args: list[str]) -> str | None:
    """The first argument that is not valid UTF-8 (Python keeps its bytes as lone
    surrogates), shown with its bad bytes escaped; None when all are fine."""
    for arg in args:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            raw = arg.encode("utf-8", "surrogateescape")
            return raw.decode("utf-8", "backslashreplace")
    return None


def _is_parser_error(exc: Exception) -> bool:
    return all(hasattr(exc, a) for a in ("exit_code", "format_message", "show"))


def run(args: list[str], term: Terminal) -> int:
    """Run the command line ``args`` (global options hoisted); its exit code. Every
    error ends here as one line (see the module doc)."""
    code: int
    try:
        bad = _undecodable(args)
        if bad is not None:
            raise UsageError(f"argument '{bad}' is not valid UTF-8: check the shell's "
                             "locale (LANG/LC_ALL) or the file the value came from")
        rv = cli(args=args, prog_name="qops", standalone_mode=False, obj=term)
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


def main(argv: list[str] | None = None) -> None:
    args = hoist_global_options(list(sys.argv[1:] if argv is None else argv))
    if "--no-color" in args[:args.index("--") if "--" in args else None]:
        os.environ["NO_COLOR"] = "1"
    if os.environ.get("NO_COLOR"):
        # no escapes at all in help screens and usage errors (rich's own NO_COLOR keeps
        # bold and dim); paid only by those who ask for it
        from typer import rich_utils

        rich_utils.COLOR_SYSTEM = None
    try:
        code = run(args, _early_terminal(args))
    except KeyboardInterrupt:
        code = 130
    raise SystemExit(code)
