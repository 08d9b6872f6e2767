"""``qops demo``: the main job in under a minute, on the embedded SQLite broker.

Starts a worker node, sends a few tasks, prints their results, stops the node cleanly.
Everything lives in a temporary directory that is removed afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from qops.errors import QopsError


def register(cli: typer.Typer) -> None:
    cli.command("demo", help="Start a worker, send tasks, show results, stop (SQLite, ~5 s).")(demo)


def demo(
    ctx: typer.Context,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the demo directory (broker file, log).")] = False,
) -> None:
    g = ctx.obj
    term = g.terminal
    spec = g.app or "proj"
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="qops-demo-"))
    broker = f"sqlite://{workdir / 'broker.db'}"
    env = dict(os.environ, QOPS_BROKER_URL=broker, QOPS_RESULT_BACKEND=broker)
    env.pop("QOPS_CONFIG", None)
    if os.getuid() == 0 or os.geteuid() == 0:
        term.note("Running as root (as in many containers): the demo sets QOPS_FORCE_ROOT=1 "
                  "for its own worker only, so the root guard lets it run. Everywhere else "
                  "qops refuses to run tasks as root unless you say so.")
        env["QOPS_FORCE_ROOT"] = "1"
    os.environ.update(QOPS_BROKER_URL=broker, QOPS_RESULT_BACKEND=broker)
    app = g.load_app(required=False) if g.app else _load(spec)
    logfile = workdir / "worker.log"
    cmd = [sys.executable, "-m", "qops", "-A", spec, "worker", "-n", "demo1@%h",
           "-c", "2", "-l", "INFO", "--logfile", str(logfile)]
    term.print(f"$ qops -A {spec} worker -n demo1@%h -c 2   (broker: {broker})")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_ready(app, proc, logfile)
        term.print(f"worker demo1 is up (pid {proc.pid}); sending tasks ...")
        rows = _send_tasks(app)
        if term.json_mode:
            term.json({"results": [dict(zip(("call", "id", "state", "result"), r, strict=True))
                                   for r in rows]})
        else:
            term.table(["call", "task id", "state", "result"], rows)
        term.print("stopping the worker (TERM: warm shutdown) ...")
    finally:
        code = _stop(proc)
        app.close()
    if code != 0:
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise QopsError(f"the demo worker exited with {code}: {err.strip()[-500:]}")
    term.print(f"done in {time.monotonic() - started:.1f}s.")
    if keep:
        term.print(f"demo files kept in {workdir}")
    else:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


def _load(spec: str) -> Any:
    from qops.app import load_app

    app = load_app(spec)
    app.import_modules()
    return app


def _wait_ready(app: Any, proc: subprocess.Popen[bytes], logfile: Path) -> None:
    """The worker is up when it has run a task; fail with its log if it exits first."""
    res = app.send_task("proj.tasks.add", [0, 0])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            log = logfile.read_text() if logfile.exists() else ""
            tail = "\n".join((err + log).strip().splitlines()[-5:])
            raise QopsError(f"the demo worker exited with {proc.returncode}:\n{tail}")
        if res.ready():
            return
        time.sleep(0.05)
    raise QopsError("the demo worker did not run a task within 30 s")


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


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
    return proc.returncode
