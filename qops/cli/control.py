"""``qops control``, ``qops inspect``, ``qops status``. Health checks and cron jobs run
them every few seconds: their parameters are declared with ``qops.cli.options`` so that
a plain command line runs without typer (``qops.cli.direct``)."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated, Any

from qops.cli.options import Argument, Context, Option

if TYPE_CHECKING:
    import typer

Destination = Annotated[str | None, Option("-d", "--destination", help="Only these nodes, comma separated (w1@h,w2@h).")]
Timeout = Annotated[float, Option("--timeout", "-t", min=0.01, help="Total deadline in seconds; only silent nodes make it last.")]
ListOpt = Annotated[bool, Option("--list", help="List the commands and exit.")]
Pattern = Annotated[str | None, Option("--pattern", help="Only nodes whose name matches (glob; --matcher pcre for a regex).")]
Matcher = Annotated[str, Option("--matcher", help="glob or pcre.")]


def register(cli: typer.Typer) -> None:
    from qops.cli.params import typed

    settings = {"allow_extra_args": True, "ignore_unknown_options": False}
    cli.command("control", help="Change workers at run time (rate_limit, revoke, shutdown, ...).",
                context_settings=settings)(typed(control))
    cli.command("inspect", help="Ask workers what they are doing (active, stats, ping, ...).",
                context_settings=settings)(typed(inspect))
    cli.command("status", help="List the nodes that answer a ping.")(typed(status))


def control(
    ctx: Context,
    method: Annotated[str | None, Argument(help="The command; see --list.",
                                           completion="complete_control_method")] = None,
    args: Annotated[list[str] | None, Argument(help="Its arguments.",
                                               completion="complete_control_args")] = None,
    destination: Destination = None,
    timeout: Timeout = 1.0,
    list_: ListOpt = False,
    pattern: Pattern = None,
    matcher: Matcher = "glob",
    terminate: Annotated[bool, Option("--terminate", help="revoke: also kill the task if it runs.")] = False,
    signal: Annotated[str, Option("--signal", "-s", help="revoke --terminate: the signal (TERM, KILL, ...).")] = "SIGTERM",
    reload: Annotated[bool, Option("--reload", help="pool_restart: reload the modules already imported.")] = False,
) -> int:
    from qops.control import CONTROL

    extra: dict[str, Any] = {}
    if method == "revoke":
        extra = {"terminate": terminate, "signal": signal}
    elif method == "pool_restart":
        extra = {"reload": reload}
    return _run(ctx, "control", CONTROL, method, args or [], destination, timeout, list_,
                pattern, matcher, extra)


def inspect(
    ctx: Context,
    method: Annotated[str | None, Argument(help="The command; see --list.",
                                           completion="complete_inspect_method")] = None,
    args: Annotated[list[str] | None, Argument(help="Its arguments.")] = None,
    destination: Destination = None,
    timeout: Timeout = 1.0,
    list_: ListOpt = False,
    pattern: Pattern = None,
    matcher: Matcher = "glob",
) -> int:
    from qops.control import INSPECT

    return _run(ctx, "inspect", INSPECT, method, args or [], destination, timeout, list_,
                pattern, matcher, {})


def status(ctx: Context, destination: Destination = None, timeout: Timeout = 1.0) -> int:
    from qops import control as ctl
    from qops.values import names

    g = ctx.obj
    dest = names(destination, "-d/--destination")
    app = g.load_app()
    res = ctl.broadcast(app, "ping", destination=dest, timeout=timeout, linger=0.1)
    term = g.terminal
    if not res.signed:
        print("qops: remote control: unauthenticated (no control_key_file; "
              "see docs/security.md)", file=sys.stderr)
    for node in sorted(set(res.duplicates)):
        term.warn(f"more than one node answers as {node}: their replies are merged; "
                  "give each its own name (-n)")
    if term.json_mode:
        term.json({"nodes": {n: ("OK" if r == {"ok": "pong"} else r)
                             for n, r in sorted(res.replies.items())},
                   "missing": res.missing, "duplicates": sorted(set(res.duplicates)),
                   "remote_control": "signed" if res.signed else "unauthenticated",
                   "elapsed": round(res.elapsed, 4)})
    else:
        online = 0
        for node, reply in sorted(res.replies.items()):
            if reply == {"ok": "pong"}:
                online += 1
                term.print(f"{node}: OK")
            else:  # e.g. refused: the node wants signed control messages
                error = reply.get("error", reply) if isinstance(reply, dict) else reply
                term.print(f"{node}: ERROR {error}")
        if online:
            term.print(f"\n{online} node{'s' if online != 1 else ''} online.")
    _report_missing(res, timeout)
    return res.exit_code() or (1 if res.duplicates else 0)


def _run(ctx: Context, group: str, commands: list[Any], method: str | None,
         args: list[str], destination: str | None, timeout: float, list_: bool,
         pattern: str | None, matcher: str, extra: dict[str, Any]) -> int:
    from qops import control as ctl
    from qops.errors import UsageError
    from qops.values import names

    g = ctx.obj
    term = g.terminal
    if list_ or not method:
        if term.json_mode:
            term.json({c.name: {"args": [a.name for a in c.args], "help": c.help}
                       for c in commands})
        else:
            term.table(["command", "arguments", "what it does"],
                       [(c.name, " ".join(a.name + ("..." if a.many else "")
                                          if a.required else f"[{a.name}]" for a in c.args),
                         c.help) for c in sorted(commands, key=lambda c: c.name)])
        return 0 if list_ else 2
    if method not in {c.name for c in commands}:
        other = "inspect" if group == "control" else "control"
        hint = f" (it is a '{other}' command)" if method in ctl.COMMANDS else ""
        raise UsageError(f"unknown {group} command {method!r}{hint}: see 'qops {group} --list'")
    if matcher not in ("glob", "pcre"):
        raise UsageError("--matcher must be glob or pcre")
    if pattern is not None and not pattern.strip():
        raise UsageError("--pattern: empty (an unset variable?); omit it to reach every node")
    arguments = ctl.parse_arguments(method, args, extra)
    dest = names(destination, "-d/--destination")
    app = g.load_app()
    res = ctl.broadcast(app, method, arguments, destination=dest,
                        pattern=pattern, matcher=matcher if pattern else None,
                        timeout=timeout)
    if term.json_mode:
        term.json(res.as_dict())
    else:
        _print_replies(term, res)
    _report_missing(res, timeout)
    return res.exit_code()


def _print_replies(term: Any, res: Any) -> None:
    for node in sorted(res.replies):
        reply = res.replies[node]
        if not reply and isinstance(reply, (list, dict)):  # query_task of an id not held
            term.print(f"->  {node}: OK")
            term.print("    - empty -")
        elif isinstance(reply, dict) and set(reply) <= {"ok", "error"}:
            state = "OK" if "ok" in reply else "ERROR"
            term.print(f"->  {node}: {state}")
            text = reply.get("ok", reply.get("error"))
            for line in str(text).splitlines():
                term.print(f"        {line}")
        else:
            term.print(f"->  {node}: OK")
            for item in reply if isinstance(reply, list) else [reply]:
                term.print("    " + (item if isinstance(item, str)
                                     else json.dumps(item, default=str, sort_keys=True)))


def _report_missing(res: Any, timeout: float) -> None:
    """The nodes that did not reply, and "no nodes replied": diagnostics, on stderr."""
    for node, why in sorted(res.rejected.items()):
        print(f"qops: warning: ignored the reply of {node}: {why}", file=sys.stderr)
    for node in res.missing:
        if node not in res.rejected:  # (a rejected reply was said above)
            print(f"qops: {node}: no reply within {timeout}s", file=sys.stderr)
    if not res.replies and res.rejected:
        n = len(res.rejected)
        print(f"qops: error: no valid replies: the signatures of {n} repl{'ies' if n > 1 else 'y'} "
              "did not verify; is control_key_file the key the nodes use?", file=sys.stderr)
    elif not res.replies:
        print(f"qops: error: no nodes replied within {timeout}s", file=sys.stderr)
        if res.method == "revoke":
            print("qops: the revoke reached no node: a node that starts later does not "
                  "know it and runs the task", file=sys.stderr)
