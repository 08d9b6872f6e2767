"""``qops demo``: the main job in under a minute, on the embedded SQLite broker.

Starts two worker nodes with ``multi start`` (it returns once each node runs and answers
a ping), sends a few tasks and prints their results, asks the nodes ``inspect stats``,
and stops them with ``multi stopwait`` (TERM: warm shutdown). Each step prints the
command a user would type. The broker file, pidfiles and logs live in a temporary
directory, removed afterwards (kept with --keep, or when the demo fails).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from qops.errors import QopsError

NODES = ("w1", "w2")
STOP_TIMEOUT = 15.0  # multi stopwait --timeout: TERM, then QUIT after this
INSPECT_TIMEOUT = 2.0


def register(cli: typer.Typer) -> None:
    cli.command("demo", help="Start two nodes (multi), send tasks, show results, inspect, "
                "stop (SQLite, ~5 s).")(demo)


def demo(
    ctx: typer.Context,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the demo directory (broker file, pidfiles, logs).")] = False,
) -> None:
    g = ctx.obj
    term = g.terminal
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="qops-demo-"))
    ok = False
    try:
        report = _run(term, g.app or "proj", workdir)
        ok = True
    finally:
        if not ok and any(workdir.iterdir()):
            term.note(f"qops: the demo's files (broker, pidfiles, logs) are kept in {workdir}")
        elif not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report["elapsed"] = round(time.monotonic() - started, 2)
    report["workdir"] = str(workdir) if keep else None
    if term.json_mode:
        term.json(report)
        return
    term.print(f"done in {report['elapsed']:.1f}s.")
    if keep:
        term.print(f"demo files kept in {workdir}")


def _run(term: Any, spec: str, workdir: Path) -> dict[str, Any]:
    """Start the nodes, send tasks, inspect, stop; a QopsError says what failed. The
    nodes it started are stopped whatever happens (by their pidfiles)."""
    from qops.cli.multi import pinger, render_outcomes
    from qops.ops import actions
    from qops.ops import multi as m
    from qops.ops.nodes import expand
    from qops.ops.privileges import check_root

    broker = f"sqlite://{workdir / 'broker.db'}"
    # The nodes' environment. This process's os.environ is left as it is: the root
    # guard is relaxed for the demo's own nodes only, never for anything else.
    env = dict(os.environ, QOPS_BROKER_URL=broker, QOPS_RESULT_BACKEND=broker)
    env.pop("QOPS_CONFIG", None)
    prefix = ""
    if os.getuid() == 0 or os.geteuid() == 0:
        term.note("Running as root (as in many containers): the demo sets QOPS_FORCE_ROOT=1 "
                  "for its own worker nodes only, so the root guard lets them run. Everywhere "
                  "else qops refuses to run tasks as root unless you say so.")
        env["QOPS_FORCE_ROOT"] = "1"
        prefix = "QOPS_FORCE_ROOT=1 "
    app = _load(spec)
    for key in ("broker_url", "result_backend"):
        app.conf.set(key, broker, layer="cli", source="qops demo")
    check_root(accept_content=list(app.conf.accept_content), environ=env)  # as multi start
    options = ["-c", "2", "-l", "INFO", f"--pidfile={workdir}/%n.pid",
               f"--logfile={workdir}/%n%I.log"]
    from qops.cli.multi import worker_options
    from qops.ops.record import environment

    nodes = m.build_nodes(m.parse_args([*NODES, *options], worker_options()),
                          global_argv=["-A", spec, "--workdir", os.getcwd()],
                          root_with_uid=False, env=environment(env))
    names = " ".join(NODES)
    report: dict[str, Any] = {"broker": broker}
    term.print(f"$ export QOPS_BROKER_URL={broker}   # results go to the same file")
    term.print(f"$ {prefix}qops -A {spec} multi start {names} {' '.join(options)}")
    try:
        outcomes = actions.start(nodes, pinger(app))
        report["nodes"] = [o.as_dict() for o in outcomes]
        if not term.json_mode:
            render_outcomes(term, [o for o in outcomes if o.ok])
        for o in outcomes:
            if not o.ok:
                raise QopsError(f"{o.node} did not start: {o.message}")
        term.print(">>> from proj.tasks import add, mul, xsum, sleep, fail   # send tasks:")
        rows = _send_tasks(app)
        report["results"] = [dict(zip(("call", "id", "state", "result"), r, strict=True))
                             for r in rows]
        if not term.json_mode:
            term.table(["call", "task id", "state", "result"], rows)
        term.print(f"$ qops -A {spec} inspect stats")
        report["inspect"] = _inspect(term, app, [n.name for n in nodes])
    finally:
        term.print(f"$ qops multi stopwait {names} --pidfile={workdir}/%n.pid "
                   f"--timeout {STOP_TIMEOUT:g}   # TERM: warm shutdown")
        try:
            stopped = actions.stopwait(nodes, STOP_TIMEOUT)
        finally:
            app.close()
        if not term.json_mode:
            render_outcomes(term, stopped)
    report["stopped"] = [o.as_dict() for o in stopped]
    for node, o in zip(nodes, stopped, strict=True):
        if o.message != "stopped by TERM":
            reason = f"did not stop on TERM: {o.message}"
        elif not _log_says_stopped(node):
            reason = (f"exited without finishing its warm shutdown (its log lacks "
                      f"'{node.name} stopped.': did it crash?)")
        else:
            continue
        raise QopsError(f"{o.node} {reason}\n--- last lines of "
                        f"{expand(node.logfile, node.name)}:\n{actions.log_tail(node)}")
    return report


def _load(spec: str) -> Any:
    from qops.loading import load_app

    app = load_app(spec)
    app.import_modules()
    return app


def _send_tasks(app: Any) -> list[tuple[str, str, str, str]]:
    from qops.canvas import chain

    t = app.tasks
    calls = [
        ("add(2, 3)", t["proj.tasks.add"].delay(2, 3)),
        ("mul(4, 5)", t["proj.tasks.mul"].delay(4, 5)),
        ("xsum([1..10])", t["proj.tasks.xsum"].delay(list(range(1, 11)))),
        ("add(2, 2) | mul(8)", chain(t["proj.tasks.add"].s(2, 2),
                                     t["proj.tasks.mul"].s(8))()),
        ("sleep(0.5)", t["proj.tasks.sleep"].delay(0.5)),
        ("fail('kaboom')", t["proj.tasks.fail"].delay("kaboom")),
    ]
    rows = []
    for label, res in calls:
        value = res.get(timeout=30, propagate=False)
        shown = f"{type(value).__name__}: {value}" if isinstance(value, BaseException) \
            else repr(value)
        rows.append((label, res.id[:8], res.state, shown))
    return rows


def _inspect(term: Any, app: Any, names: list[str]) -> dict[str, Any]:
    """``inspect stats``: every node must answer; show who did, and how fast."""
    from qops import control

    res = control.broadcast(app, "stats", timeout=INSPECT_TIMEOUT)
    missing = [n for n in names if n not in res.replies]
    if missing:
        raise QopsError(f"{', '.join(missing)} did not answer 'inspect stats' within "
                        f"{INSPECT_TIMEOUT:g}s")
    if res.errors:
        node, error = next(iter(res.errors.items()))
        raise QopsError(f"{node} answered 'inspect stats' with an error: {error}")
    nodes: dict[str, dict[str, Any]] = {}
    for name in names:
        reply = res.replies[name] if isinstance(res.replies[name], dict) else {}
        pool = reply.get("pool") or {}
        total = reply.get("total") or {}
        nodes[name] = {"pid": reply.get("pid"), "pool": pool.get("implementation"),
                       "concurrency": pool.get("max-concurrency"),
                       "tasks": sum(total.values())}
    if not term.json_mode:
        term.table(["node", "pid", "pool", "tasks done"],
                   [(n, i["pid"], f"{i['pool']} x{i['concurrency']}", i["tasks"])
                    for n, i in nodes.items()])
        term.print(f"{len(names)} nodes answered in {res.elapsed * 1000:.0f} ms.")
    return {"command": "stats", "elapsed": round(res.elapsed, 4), "nodes": nodes}


def _log_says_stopped(node: Any) -> bool:
    """A detached node's exit code can't be collected: its log stands in. The worker
    logs "<node> stopped." as the last step of a complete shutdown."""
    from qops.ops.nodes import expand

    try:
        text = Path(expand(node.logfile, node.name)).read_text(errors="replace")
    except OSError:
        return False
    return f"{node.name} stopped." in text
