"""The global options of ``qops`` (``-A``, ``-b``, ``--json``, ...) and what they set up
for every command: ``root`` is the root command's callback, declared with
``qops.cli.options.Option`` so that a worker can be started without typer
(qops.cli.options); ``Globals`` is what it leaves in ``ctx.obj`` for the command.
"""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass
from typing import Annotated, Any

from qops.cli.main import show_version
from qops.cli.options import Context, Option
from qops.cli.terminal import Terminal
from qops.errors import EX_USAGE


@dataclass
class Globals:
    app: str | None = None
    broker: str | None = None
    result_backend: str | None = None
    config: str | None = None
    workdir: str | None = None
    compat: str | None = None
    terminal: Terminal = Terminal()

    def app_spec(self) -> str | None:
        """What names the app: -A, else QOPS_APP, else ``app:`` in the config file."""
        from qops.settings import find_config_file, read_yaml

        spec = self.app or os.environ.get("QOPS_APP")
        if not spec:
            path = find_config_file()
            if path is not None:
                spec = read_yaml(path).get("app")
        return str(spec) if spec else None

    def load_app(self, *, required: bool = False, import_tasks: bool = False) -> Any:
        """The App for this command. Broker-only commands pass ``required=False`` and get
        a bare App unless ``-A`` (or QOPS_APP / ``app:`` in the config file) names one."""
        from qops.app import App
        from qops.loading import load_app

        spec = self.app_spec()
        if spec:
            app = load_app(spec)
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
        # Its connections end cleanly when the command does (a SQLite database is
        # checkpointed, RabbitMQ gets its Connection.Close), not when, if ever, the
        # garbage collector gets to them (see qops.cli.main.end).
        atexit.register(app.close)
        return app


def _version(ctx: Context, value: bool) -> None:
    """``--version`` after other options (``qops --version`` alone never gets here)."""
    if value:
        show_version(ctx.obj if isinstance(ctx.obj, Terminal) else Terminal())
        raise SystemExit(0)


def root(
    ctx: Context,
    app: Annotated[str | None, Option("-A", "--app", help="The app: module, module:attr or module.attr.")] = None,
    broker: Annotated[str | None, Option("-b", "--broker", help="Broker URL (sqlite://, redis://, sentinel://, amqp://; a cluster: amqp://h1;amqp://h2).")] = None,
    result_backend: Annotated[str | None, Option("--result-backend", help="Result backend URL.")] = None,
    config: Annotated[str | None, Option("--config", help="YAML config file (default ./qops.yaml, then /etc/qops/qops.yaml).")] = None,
    workdir: Annotated[str | None, Option("--workdir", help="Change to this directory first.")] = None,
    compat: Annotated[str | None, Option("--compat", help="Names on the wire: qops or celery.")] = None,
    quiet: Annotated[bool, Option("-q", "--quiet", help="Print less.")] = False,
    json_out: Annotated[bool, Option("--json", help="Print one JSON document on stdout.")] = False,
    no_color: Annotated[bool, Option("--no-color", help="No colours.")] = False,
    debug: Annotated[bool, Option("--debug", help="Show tracebacks of errors.")] = False,
    version: Annotated[bool, Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
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
