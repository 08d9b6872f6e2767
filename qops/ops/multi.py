"""``qops multi``: start, stop and restart worker nodes as daemons.

Celery's node syntax is kept (``3``, ``w1 w2``, ``w1@%h``, ``-c:1 10``, ``-c:1-3 4``,
``-c:w1 5``, ``--logfile:w2=/x.log``, ``--`` passthrough). What differs:

- each node's full command line is recorded next to its pidfile (``<pidfile>.cmd``), so
  ``restart``, ``show`` and ``status`` need no repeat of the original options;
- ``start`` returns when every node runs -- the detached worker reports readiness over a
  pipe and then answers a ping -- or says which failed, with the tail of its log;
- pidfiles are locked and carry the process start time: a stale one is replaced, and a
  pid that belongs to another process is never signalled.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qops.errors import UsageError
from qops.ops import pidfile
from qops.ops.nodes import check_name, expand, hostname

# worker options that take no value
FLAGS = {"-E", "--task-events", "-D", "--detach", "-B", "--beat"}
# multi's own options (not passed to the worker as such)
OWN = {"--pidfile", "--logfile", "--range-prefix", "--rundir", "--logdir", "--timeout",
       "--max-unavailable", "--uid", "--gid"}


@dataclass
class Node:
    name: str  # full name, w1@host
    options: dict[str, str | None] = field(default_factory=dict)  # worker options
    pidfile: Path = Path()
    logfile: str = ""  # template: %I is expanded by the worker per pool process
    argv: list[str] = field(default_factory=list)

    @property
    def short(self) -> str:
        return self.name.partition("@")[0]

    @property
    def cmdfile(self) -> Path:
        return self.pidfile.with_name(self.pidfile.name + ".cmd")


@dataclass
class MultiArgs:
    names: list[str]
    options: list[tuple[str, str | None, str | None]]  # (option, selector, value)
    passthrough: list[str]

    def own(self, name: str, default: str | None = None) -> str | None:
        for opt, sel, value in self.options:
            if opt == name and sel is None:
                return value
        return default


_OPT = re.compile(r"^(--?[A-Za-z][\w-]*)(?::([^=]+))?(?:=(.*))?$", re.DOTALL)


def parse_args(argv: Sequence[str]) -> MultiArgs:
    """Split ``w1 w2 -c 3 -c:1 10 --logfile:w2=/x.log -- extra`` into its parts."""
    names: list[str] = []
    options: list[tuple[str, str | None, str | None]] = []
    passthrough: list[str] = []
    i = 0
    args = list(argv)
    while i < len(args):
        arg = args[i]
        if arg == "--":
            passthrough = args[i + 1:]
            break
        m = _OPT.match(arg) if arg.startswith("-") else None
        if m is None:
            if options:
                raise UsageError(f"node names go before options: {arg!r}")
            names.append(arg)
            i += 1
            continue
        opt, selector, value = m.group(1), m.group(2), m.group(3)
        if value is None and opt not in FLAGS:
            if i + 1 >= len(args):
                raise UsageError(f"option {opt} needs a value")
            value = args[i + 1]
            i += 1
        options.append((opt, selector, value))
        i += 1
    return MultiArgs(names, options, passthrough)


def expand_names(names: Sequence[str], range_prefix: str = "qops") -> list[str]:
    """``3`` -> qops1..qops3; ``w1`` -> w1@host; ``w1@%h`` expanded; others as given."""
    if not names:
        raise UsageError("name the nodes: e.g. 'w1 w2', or '3' for three nodes")
    if len(names) == 1 and names[0].isdigit():
        count = int(names[0])
        if count < 1:
            raise UsageError("the number of nodes must be at least 1")
        names = [f"{range_prefix}{i}" for i in range(1, count + 1)]
    out = []
    for name in names:
        local, sep, host = name.partition("@")
        host = expand(host, f"{local}@{hostname()}") if sep else hostname()
        out.append(check_name(f"{local}@{host}"))
    if len(set(out)) != len(out):
        raise UsageError("a node is named twice")
    return out


def _selects(selector: str, index: int, node: str) -> bool:
    """``1`` / ``1-3`` / ``1,2`` (1-based positions) or a node name (short or full)."""
    for part in selector.split(","):
        part = part.strip()
        if re.fullmatch(r"\d+-\d+", part):
            low, high = (int(x) for x in part.split("-"))
            if low <= index <= high:
                return True
        elif part.isdigit():
            if int(part) == index:
                return True
        elif part in (node, node.partition("@")[0]):
            return True
    return False


def build_nodes(args: MultiArgs, *, global_argv: Sequence[str], root_with_uid: bool
                ) -> list[Node]:
    names = expand_names(args.names, args.own("--range-prefix") or "qops")
    rundir = Path(args.own("--rundir") or ("/run/qops" if root_with_uid else "."))
    logdir = Path(args.own("--logdir") or ("/var/log/qops" if root_with_uid else "."))
    nodes = []
    for index, name in enumerate(names, start=1):
        node = Node(name)
        # options for every node first, so a per-node one (-c:1 10) wins wherever it stands
        ordered = sorted(args.options, key=lambda o: o[1] is not None)
        for opt, selector, value in ordered:
            if selector is not None and not _selects(selector, index, name):
                continue
            if opt in ("-n", "--hostname"):
                raise UsageError("-n is set by multi from the node names")
            node.options[opt] = value
        pid_t = node.options.pop("--pidfile", None) or "%n.pid"
        log_t = node.options.pop("--logfile", None) or "%n%I.log"
        for own in OWN - {"--uid", "--gid"}:
            node.options.pop(own, None)
        node.pidfile = (rundir / expand(pid_t, name)).absolute()
        expand(log_t, name, 1)  # reject a bad template now
        log_path = Path(log_t)
        node.logfile = str(log_path if log_path.is_absolute() else
                           (logdir / log_path).absolute())
        node.argv = [sys.executable, "-m", "qops", *global_argv, "worker", "-n", name,
                     "--detach", "--pidfile", str(node.pidfile), "--logfile", node.logfile]
        for opt, value in node.options.items():
            node.argv += [opt] if value is None else [opt, value]
        node.argv += args.passthrough
        nodes.append(node)
    return nodes


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
