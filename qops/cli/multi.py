"""``qops multi``: start, stop and restart worker nodes (Celery's syntax)."""

from __future__ import annotations

import os
import sys
from typing import Any

import typer

ACTIONS = ("start", "stop", "stopwait", "restart", "kill", "show", "names", "expand", "get",
           "status")

HELP = """Manage worker nodes as daemons.

qops multi start w1 w2 -A proj -c 4 -c:w2 8 --logfile=/var/log/qops/%n%I.log
qops multi start 3 -A proj               (qops1..qops3)
qops multi stopwait w1 w2 --timeout 60
qops multi restart w1 w2                 (rolling, one node at a time)

Actions: start, stop, stopwait, restart, kill, status, show, names,
expand TEMPLATE NODES, get NODE NODES.
Per-node options: -c:1 10, -c:1-3 4, -c:w1 5, --logfile:w2=/x.log.
Everything after -- goes to every worker as it is.
Multi's own options: --pidfile (default %n.pid), --logfile (default %n%I.log),
--rundir, --logdir, --range-prefix, --timeout (stopwait, restart; default 30),
--max-unavailable (restart; default 1), --uid, --gid.
Any other option is the worker's (qops worker --help)."""


def register(cli: typer.Typer) -> None:
    cli.command("multi", help=HELP, context_settings={
        "allow_extra_args": True, "ignore_unknown_options": True,
        "allow_interspersed_args": False,
        "help_option_names": ["-h", "--help"]})(multi)


def multi(ctx: typer.Context, action: str = typer.Argument(
        ..., metavar="ACTION", help="start, stop, ...")) -> None:
    from qops.errors import UsageError
    from qops.ops import actions
    from qops.ops import multi as m
    from qops.ops.daemon import resolve_ids
    from qops.ops.nodes import expand
    from qops.values import number

    g = ctx.obj
    term = g.terminal
    if action not in ACTIONS:
        raise UsageError(f"unknown multi action {action!r}: use one of {', '.join(ACTIONS)}")
    # the words after the action as typed, "--" kept (allow_interspersed_args=False:
    # click stops at the action); -h anywhere before "--" is still the help
    raw = list(ctx.args)
    if {"-h", "--help"} & set(raw[:raw.index("--")] if "--" in raw else raw):
        print(ctx.get_help())
        raise typer.Exit(0)
    template = None
    if action == "expand":
        if not raw:
            raise UsageError("multi expand needs a template, e.g. 'multi expand %n.log w1 w2'")
        template, raw = raw[0], raw[1:]
    wanted = None
    if action == "get":
        if not raw:
            raise UsageError("multi get needs a node name, e.g. 'multi get w1 w1 w2'")
        wanted, raw = raw[0], raw[1:]
    args = m.parse_args(raw, worker_options())
    timeout = number(args.own("--timeout") or 30, "--timeout", above=0)
    unavailable = number(args.own("--max-unavailable") or 1, "--max-unavailable",
                         at_least=1, whole=True)
    uid = args.own("--uid")
    uid_n, gid_n, _ = resolve_ids(uid, args.own("--gid"))
    root_with_uid = os.getuid() == 0 and uid_n not in (None, 0)
    nodes = m.build_nodes(args, global_argv=_global_argv(g), root_with_uid=root_with_uid,
                          env=_node_env(g), uid=uid_n, gid=gid_n)

    if action in ("names", "expand", "show", "get"):
        lines: list[str]
        if action == "names":
            lines = [n.name for n in nodes]
        elif action == "expand":
            assert template is not None
            lines = [expand(template, n.name) for n in nodes]
        else:
            chosen = nodes if action == "show" else [
                n for n in nodes if wanted in (n.name, n.short)]
            if not chosen:
                raise UsageError(f"no node {wanted!r} among {', '.join(n.name for n in nodes)}")
            lines = [_command_line(n) for n in chosen]
        if term.json_mode:
            term.json(lines)
        else:
            for line in lines:
                print(line)
        return

    try:
        outcomes = _act(g, action, nodes, uid_n, timeout, unavailable)
    except KeyboardInterrupt:  # the nodes launched go on starting, in their own sessions
        print("qops: interrupted: nodes already launched go on starting; their state "
              "now:", file=sys.stderr)
        render_outcomes(term, actions.status(nodes))
        raise typer.Exit(130) from None
    render_outcomes(term, outcomes)
    raise typer.Exit(actions.exit_code(action, outcomes))


def _act(g: Any, action: str, nodes: list[Any], uid_n: int | None, timeout: float,
         unavailable: int) -> list[Any]:
    from qops.ops import actions

    term = g.terminal
    if action == "start" and g.app_spec() is None and all(n.cmdfile.exists() for n in nodes):
        # without -A: the nodes as recorded by their last start (the records stay after
        # a crash or a 'multi kill'); the worker itself checks the rest as it starts
        return actions.start(nodes, use_recorded=True)
    if action == "start":
        from qops.cli.worker import check_security
        from qops.ops.privileges import check_root

        app = g.load_app(required=True)
        check_root(accept_content=list(app.conf.accept_content), uid=uid_n)
        check_security(app, term, [n.pidfile for n in nodes])
        return actions.start(nodes, pinger(app))
    if action == "restart":
        return actions.restart(nodes, timeout=timeout, max_unavailable=unavailable)
    if action == "stopwait":
        return actions.stopwait(nodes, timeout)
    return {"stop": actions.stop, "kill": actions.kill,
            "status": actions.status}[action](nodes)


def worker_options() -> dict[str, bool]:
    """Each option of ``qops worker`` -> whether it takes a value: what multi passes on."""
    import typer.main

    from qops.cli.main import cli

    command = typer.main.get_command(cli).commands["worker"]  # type: ignore[attr-defined]
    return {opt: not p.is_flag for p in command.params if p.param_type_name == "option"
            for opt in [*p.opts, *p.secondary_opts]}


def pinger(app: Any) -> Any:
    """Ping nodes through ``app`` (whose broker is theirs: they were started from it)."""
    from qops import control

    def ping(nodes: list[Any], timeout: float) -> set[str]:
        names = [n.name for n in nodes]
        return set(control.broadcast(app, "ping", destination=names, timeout=timeout).replies)

    return ping


def _global_argv(g: Any) -> list[str]:
    """The global options the nodes are started with; URLs (they may hold passwords)
    go through the environment instead (``_node_env``), so ``ps`` does not show them."""
    out: list[str] = []
    for opt, value in (("-A", g.app), ("--config", g.config and os.path.abspath(g.config)),
                       ("--compat", g.compat)):
        if value:
            out += [opt, value]
    out += ["--workdir", os.getcwd()]
    return out


def _node_env(g: Any) -> dict[str, str]:
    from qops.ops.record import environment

    env = environment()
    if g.broker:
        env["QOPS_BROKER_URL"] = g.broker
    if g.result_backend:
        env["QOPS_RESULT_BACKEND"] = g.result_backend
    return env


def _command_line(node: Any) -> str:
    """The node's command as it runs (from its record when it has one), preceded by the
    settings it gets from the environment, passwords masked."""
    from qops.transports.urls import mask_password

    node.use_record()
    env = [f"{k}={_quote(mask_password(v) if '://' in v else v)}"
           for k, v in sorted(node.env.items()) if k.startswith("QOPS_")]
    return " ".join([*env, *(_quote(a) for a in node.argv)])


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def render_outcomes(term: Any, outcomes: list[Any]) -> None:
    """One line per node on stdout; a failure's details on stderr (with --json too)."""
    if term.json_mode:
        term.json([o.as_dict() for o in outcomes])
    for o in outcomes:
        pid = f" (pid {o.pid})" if o.pid else ""
        mark = "OK" if o.ok else "FAILED"
        if o.action == "status":
            mark = "OK" if o.ok else "DOWN"
        first, *rest = (o.message or o.state).splitlines() or [""]
        if o.ok or o.action == "status":
            term.print(f"> {o.node}: {mark}{pid} {first}")
            continue
        lines = [f"> {o.node}: {mark}{pid} {first}", *(f"    {line}" for line in rest)]
        if term.json_mode or not term.quiet:
            print("\n".join(lines), file=sys.stderr, flush=True)
