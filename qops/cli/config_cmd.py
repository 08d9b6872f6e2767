"""``qops config show``: every setting, its value and where it came from."""

from __future__ import annotations

from typing import Annotated

import typer


def register(cli: typer.Typer) -> None:
    group = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
    group.command("show", help="Print every setting with its value and source.")(show)
    cli.add_typer(group, name="config")


def show(
    ctx: typer.Context,
    changed: Annotated[bool, typer.Option("--changed", help="Only settings not at their default.")] = False,
) -> None:
    from qops.transports.base import mask_password

    g = ctx.obj
    app = g.load_app()
    rows = []
    for name, value, source in app.conf.table():
        if name in ("broker_url", "result_backend") and isinstance(value, str):
            value = mask_password(value)
        if changed and source == "default":
            continue
        rows.append((name, value, source))
    # The effective URLs, with the defaults filled in (the SQLite file is named here).
    effective = [("broker (effective)", mask_password(app.broker_url), ""),
                 ("results (effective)", mask_password(app.result_backend_url or "disabled"), "")]
    if g.terminal.json_mode:
        g.terminal.json({"settings": {n: {"value": v, "source": s} for n, v, s in rows},
                         "broker": mask_password(app.broker_url),
                         "result_backend": app.result_backend_url and
                         mask_password(app.result_backend_url)})
        return
    g.terminal.table(["setting", "value", "source"], effective + rows)
