"""``qops config show``: every setting, its value and where it came from.

Passwords are masked (URLs, password-like keys) unless ``--secrets`` is given, which
only the owner of the config file in use, or root, may do (docs/security.md): a
config file readable by a group must not hand its passwords to every member through
this command run with a shared app.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer


def register(cli: typer.Typer) -> None:
    group = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
    group.command("show", help="Print every setting with its value and source.")(show)
    cli.add_typer(group, name="config")


def show(
    ctx: typer.Context,
    changed: Annotated[bool, typer.Option("--changed", help="Only settings not at their default.")] = False,
    secrets: Annotated[bool, typer.Option("--secrets", help="Show passwords (only the config file's owner or root).")] = False,
) -> None:
    from qops.transports.urls import mask_secrets

    g = ctx.obj
    if secrets:
        check_may_reveal()
    app = g.load_app()

    def shown(value: object) -> object:
        return value if secrets else mask_secrets(value)

    rows = []
    for name, value, source in app.conf.table():
        if changed and source == "default":
            continue
        rows.append((name, shown(value), source))
    # The effective URLs, with the defaults filled in (the SQLite file is named here).
    effective = [("broker (effective)", shown(app.broker_url), ""),
                 ("results (effective)", shown(app.result_backend_url or "disabled"), "")]
    if g.terminal.json_mode:
        g.terminal.json({"settings": {n: {"value": v, "source": s} for n, v, s in rows},
                         "broker": shown(app.broker_url),
                         "result_backend": app.result_backend_url and
                         shown(app.result_backend_url)})
        return
    g.terminal.table(["setting", "value", "source"], effective + rows)


def check_may_reveal() -> None:
    """``--secrets`` is for root and for the owner of the config file in use (with no
    config file the secrets come from the caller's own environment or command line)."""
    from qops.errors import UsageError
    from qops.settings import find_config_file

    path = find_config_file()
    if path is None or os.geteuid() == 0:
        return
    owner = path.stat().st_uid
    if owner != os.geteuid():
        raise UsageError(f"--secrets: the config file {path} belongs to uid {owner}, not "
                         "to you: only its owner or root may see its passwords")
