"""``qops call`` and ``qops result``: send a task and read a result from scripts."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from qops.cli.shell import complete_task
from qops.errors import EX_FAILURE, EX_TEMPFAIL, QopsError, UsageError


def register(cli: typer.Typer) -> None:
    cli.command("call", help="Send a task by name; prints its id.")(call)
    cli.command("result", help="Show a task's state and result.")(result)


def _json_arg(text: str | None, what: str, kind: type) -> Any:
    """``--args``/``--kwargs``: inline JSON, ``@file`` (a file holding it) or ``-``
    (standard input); a one-line UsageError naming the source and the position."""
    if text is None:
        return kind()
    source = f"--{what}"
    if text == "-":
        source = f"--{what} - (stdin)"
        text = _read(sys.stdin.buffer, source)
    elif text.startswith("@"):
        path = text[1:]
        source = f"--{what} @{path}"
        try:
            with open(path, "rb") as f:
                text = _read(f, source)
        except OSError as exc:
            raise UsageError(f"{source}: cannot read {path}: {exc.strerror}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{source} is not valid JSON: {exc.msg} at line {exc.lineno} "
                         f"column {exc.colno} (char {exc.pos})") from None
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(value, kind):
        raise UsageError(f"{source} must be a JSON {'list' if kind is list else 'object'}")
    return value


def _read(stream: Any, source: str) -> str:
    data: bytes = stream.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{source} is not UTF-8 (byte {exc.start})") from None


def call(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Task name, e.g. proj.tasks.add.",
                                        autocompletion=complete_task)],
    args: Annotated[str | None, typer.Option("--args", "-a", help="Positional arguments as a JSON list; @file reads it from a file, - from stdin.")] = None,
    kwargs: Annotated[str | None, typer.Option("--kwargs", "-k", help="Keyword arguments as a JSON object; @file reads it from a file, - from stdin.")] = None,
    queue: Annotated[str | None, typer.Option("--queue", help="Queue (default: routing).")] = None,
    countdown: Annotated[float | None, typer.Option("--countdown", min=0, help="Run after this many seconds.")] = None,
    expires: Annotated[float | None, typer.Option("--expires", min=0, help="Seconds after which it is not run.")] = None,
    priority: Annotated[int | None, typer.Option("--priority", min=0, max=9, help="0..9, 9 runs first.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result and print it.")] = False,
    timeout: Annotated[float | None, typer.Option("--timeout", min=0, help="With --wait: give up after this many seconds.")] = None,
) -> None:
    g = ctx.obj
    a = _json_arg(args, "args", list)
    kw = _json_arg(kwargs, "kwargs", dict)
    app = g.load_app()
    if wait:
        app.backend.check()
    res = app.send_task(name, a, kw, queue=queue, countdown=countdown, expires=expires,
                        priority=priority)
    if not wait:
        if g.terminal.json_mode:
            g.terminal.json({"id": res.id, "task": name})
        else:
            print(res.id)
        return
    try:
        _show(g, res, wait=True, timeout=timeout)
    except QopsError as exc:  # sent: the id, to follow it up rather than send it again
        exc.args = (f"task {res.id} was sent; waiting for its result: {exc}",)
        raise


def result(
    ctx: typer.Context,
    task_id: Annotated[str, typer.Argument(help="The task id.")],
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the task is done.")] = False,
    timeout: Annotated[float | None, typer.Option("--timeout", min=0, help="With --wait: give up after this many seconds.")] = None,
    traceback: Annotated[bool, typer.Option("--traceback", help="Print the traceback of a failure.")] = False,
) -> None:
    """Exit 0 for SUCCESS, 1 for FAILURE/REVOKED, 75 when not done yet (try again)."""
    g = ctx.obj
    app = g.load_app()
    _show(g, app.AsyncResult(task_id), wait=wait, timeout=timeout, traceback=traceback)


def _show(g: Any, res: Any, *, wait: bool, timeout: float | None,
          traceback: bool = False) -> None:
    from qops.errors import ResultTimeout

    term = g.terminal
    if wait:
        try:
            res.get(timeout=timeout, propagate=False)
        except ResultTimeout:
            pass
    meta = res.as_dict()
    state = meta["status"]
    if term.json_mode:
        term.json(meta)
    elif state == "SUCCESS":
        print(json.dumps(meta["result"], default=str))
    elif state in ("FAILURE", "REVOKED"):
        r = meta.get("result")
        if isinstance(r, dict) and "exc_type" in r:
            msg = ", ".join(str(m) for m in r.get("exc_message") or [])
            print(f"{state}: {r['exc_type']}: {msg}")
        else:
            print(f"{state}: {r}")
        if traceback and meta.get("traceback"):
            print(meta["traceback"].rstrip())
    else:
        print(state)
    if state == "SUCCESS":
        return
    raise typer.Exit(EX_FAILURE if state in ("FAILURE", "REVOKED") else EX_TEMPFAIL)
