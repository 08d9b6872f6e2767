"""What ``qops multi`` does to its nodes: start, stop, stopwait, kill, restart, status.

The nodes come from ``qops/ops/multi.py`` (Celery's node syntax); here they are started
as daemons and signalled through their pidfiles (``qops/ops/pidfile.py``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qops.ops import pidfile
from qops.ops.multi import Node
from qops.ops.nodes import expand

# -- results ---------------------------------------------------------------------------


@dataclass
class Outcome:
    node: str
    action: str
    ok: bool
    pid: int | None = None
    state: str = ""
    message: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node, "action": self.action, "result": "ok" if self.ok else
                "failed", "pid": self.pid, "state": self.state, "message": self.message}


def log_tail(node: Node, lines: int = 10) -> str:
    path = Path(expand(node.logfile, node.name))
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log file at {path})"
    return "\n".join(text.strip().splitlines()[-lines:])


def recorded(node: Node) -> list[str] | None:
    try:
        data = json.loads(node.cmdfile.read_text())
    except (OSError, ValueError):
        return None
    argv = data.get("argv")
    return list(argv) if isinstance(argv, list) else None


def record(node: Node) -> None:
    node.pidfile.parent.mkdir(parents=True, exist_ok=True)
    node.cmdfile.write_text(json.dumps({"node": node.name, "argv": node.argv,
                                        "cwd": os.getcwd()}, indent=1))


def uptime(pid: int) -> float | None:
    start = pidfile.process_start_time(pid)
    if start is None:
        return None
    try:
        with open("/proc/uptime") as f:
            booted_for = float(f.read().split()[0])
    except OSError:
        return None
    return max(0.0, booted_for - start / os.sysconf("SC_CLK_TCK"))


def node_state(node: Node) -> tuple[str, int | None]:
    """(state, pid): running, stale, foreign, stopped."""
    info = pidfile.read(node.pidfile)
    if info is None:
        return "stopped", None
    if info.running:
        return "running", info.pid
    if info.foreign:
        return "foreign", info.pid
    return "stale", info.pid


# -- actions -----------------------------------------------------------------------------

Ping = Callable[[list[str], float], set[str]]


def start(nodes: Sequence[Node], ping: Ping, *, use_recorded: bool = False,
          timeout: float = 60.0, env: Mapping[str, str] | None = None) -> list[Outcome]:
    """Start the nodes in parallel; return when each runs and answers a ping, or failed.
    ``env``: the nodes' environment (default: this process's)."""
    outcomes: dict[str, Outcome] = {}
    procs: dict[str, tuple[Node, subprocess.Popen[bytes]]] = {}
    for node in nodes:
        state, pid = node_state(node)
        if state == "running":
            outcomes[node.name] = Outcome(node.name, "start", True, pid, "running",
                                          "already running: left alone")
            continue
        if use_recorded:
            node.argv = recorded(node) or node.argv
        record(node)
        procs[node.name] = (node, subprocess.Popen(
            node.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env=env))
    started = []
    for name, (node, proc) in procs.items():
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode == 0:
            started.append(node)
            continue
        message = err.decode(errors="replace").strip() or f"exit code {proc.returncode}"
        outcomes[name] = Outcome(name, "start", False, None, "failed",
                                 f"{message}\n--- last lines of {expand(node.logfile, name)}:"
                                 f"\n{log_tail(node)}")
    answered = ping([n.name for n in started], 10.0) if started else set()
    for node in started:
        state, pid = node_state(node)
        if node.name in answered:
            outcomes[node.name] = Outcome(node.name, "start", True, pid, "running", "started")
        else:
            outcomes[node.name] = Outcome(node.name, "start", False, pid, state,
                                          "started but does not answer a ping\n"
                                          + log_tail(node))
    return [outcomes[n.name] for n in nodes]


def _signal(node: Node, sig: int, action: str) -> Outcome | int:
    """Send ``sig`` to the node's main process if the pidfile is really its; else say why."""
    state, pid = node_state(node)
    if state == "stopped":
        return Outcome(node.name, action, True, None, "stopped", "not running")
    if state == "stale":
        node.pidfile.unlink(missing_ok=True)
        return Outcome(node.name, action, True, pid, "stopped",
                       f"not running (removed a stale pidfile naming pid {pid})")
    if state == "foreign":
        return Outcome(node.name, action, False, pid, "foreign",
                       f"the pidfile names pid {pid}, which is another process now: "
                       "not signalled")
    assert pid is not None
    os.kill(pid, sig)
    return pid


def stop(nodes: Sequence[Node]) -> list[Outcome]:
    out = []
    for node in nodes:
        r = _signal(node, signal.SIGTERM, "stop")
        out.append(r if isinstance(r, Outcome) else
                   Outcome(node.name, "stop", True, r, "stopping", "sent TERM (warm shutdown)"))
    return out


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pidfile.pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pidfile.pid_alive(pid)


def _kill_group(pid: int) -> None:
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    if pgid == os.getpgid(0):
        os.kill(pid, signal.SIGKILL)  # never our own group
    else:
        os.killpg(pgid, signal.SIGKILL)


def stopwait(nodes: Sequence[Node], timeout: float) -> list[Outcome]:
    """TERM; after ``timeout`` QUIT (cold); after a few more seconds KILL the group."""
    pids: dict[str, int] = {}
    out: dict[str, Outcome] = {}
    for node in nodes:
        r = _signal(node, signal.SIGTERM, "stopwait")
        if isinstance(r, Outcome):
            out[node.name] = r
        else:
            pids[node.name] = r
    deadline = time.monotonic() + timeout
    for name, pid in pids.items():
        if _wait_gone(pid, max(0.0, deadline - time.monotonic())):
            out[name] = Outcome(name, "stopwait", True, pid, "stopped", "stopped by TERM")
            continue
        os.kill(pid, signal.SIGQUIT)
        if _wait_gone(pid, min(5.0, max(timeout, 1.0))):
            out[name] = Outcome(name, "stopwait", True, pid, "stopped",
                                f"still running after {timeout:g}s: stopped by QUIT (cold)")
            continue
        _kill_group(pid)
        _wait_gone(pid, 5.0)
        out[name] = Outcome(name, "stopwait", True, pid, "killed",
                            "did not stop after TERM and QUIT: KILLed (process group)")
    for node in nodes:
        if out[node.name].state in ("stopped", "killed") and not \
                pidfile.pid_alive(out[node.name].pid or 0):
            node.pidfile.unlink(missing_ok=True)
    return [out[n.name] for n in nodes]


def kill(nodes: Sequence[Node]) -> list[Outcome]:
    out = []
    for node in nodes:
        r = _signal(node, signal.SIGKILL, "kill")
        if isinstance(r, Outcome):
            out.append(r)
            continue
        _kill_group(r)
        _wait_gone(r, 5.0)
        node.pidfile.unlink(missing_ok=True)
        out.append(Outcome(node.name, "kill", True, r, "killed", "KILLed (process group)"))
    return out


def restart(nodes: Sequence[Node], ping: Ping, *, timeout: float,
            max_unavailable: int = 1) -> list[Outcome]:
    """Rolling: at most ``max_unavailable`` nodes down at a time; each batch is back and
    answering before the next goes down. Each node restarts with its recorded command."""
    out: list[Outcome] = []
    batch = max(1, max_unavailable)
    for i in range(0, len(nodes), batch):
        group = list(nodes[i:i + batch])
        stopped = {o.node: o for o in stopwait(group, timeout)}
        started = start(group, ping, use_recorded=True)
        for node, st in zip(group, started, strict=True):
            how = stopped[node.name].message
            out.append(Outcome(node.name, "restart", st.ok, st.pid, st.state,
                               f"{how}; {st.message}"))
        if not all(o.ok for o in started):
            break  # keep the rest up: don't take more nodes down after a failure
    return out


def status(nodes: Sequence[Node]) -> list[Outcome]:
    out = []
    for node in nodes:
        state, pid = node_state(node)
        up = uptime(pid) if state == "running" and pid else None
        msg = f"up {_human(up)}" if up is not None else ""
        out.append(Outcome(node.name, "status", state in ("running", "stopped"), pid,
                           state, msg))
    return out


def _human(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"
