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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qops.errors import EX_FAILURE, EX_TEMPFAIL, EX_UNAVAILABLE, UsageError
from qops.ops import pidfile
from qops.ops import record as rec
from qops.ops.daemon import make_dirs
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
    code: int = 0  # a failure's exit code (the node's own, e.g. 74 broker unreachable)

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node, "action": self.action, "result": "ok" if self.ok else
                "failed", "pid": self.pid, "state": self.state, "message": self.message,
                "exit_code": self.code if not self.ok else 0}


def exit_code(action: str, outcomes: Sequence[Outcome]) -> int:
    """``status``: 0 all running, 75 some down, 69 none up. Other actions: 0, or the
    failed nodes' exit code when they agree on one (74, 77...), else 1."""
    if action == "status":
        up = sum(o.ok for o in outcomes)
        return 0 if up == len(outcomes) else EX_UNAVAILABLE if up == 0 else EX_TEMPFAIL
    failed = [o for o in outcomes if not o.ok]
    if not failed:
        return 0
    codes = {o.code for o in failed if o.code}
    return codes.pop() if len(codes) == 1 else EX_FAILURE


def log_tail(node: Node, lines: int = 10) -> str:
    path = Path(expand(node.logfile, node.name))
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log file at {path})"
    return "\n".join(text.strip().splitlines()[-lines:])


def _trusted_record(node: Node) -> rec.Record | None:
    try:
        return rec.load(node.cmdfile)
    except UsageError:
        return None


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
    """(state, pid): running, stale, foreign, stopped. The start time that proves the
    pid is the node's comes from its record (or an older qops's second pidfile line,
    which is then moved to the record)."""
    info = pidfile.read(node.pidfile)
    if info is None:
        return "stopped", None
    found = _trusted_record(node)
    start_time = info.start_time
    if start_time is None and found is not None and found.pid == info.pid:
        start_time = found.start_time
    alive = pidfile.pid_alive(info.pid)
    actual = pidfile.process_start_time(info.pid) if alive else None
    if alive and start_time is not None and actual != start_time:
        return "foreign", info.pid
    if not (info.locked and alive):
        return "stale", info.pid
    if info.start_time is not None:  # an older qops's two-line pidfile: the pid alone
        pidfile.rewrite_one_line(node.pidfile, info.pid)
        if found is not None:
            found.pid, found.start_time = info.pid, info.start_time
            rec.save(node.cmdfile, found)
    return "running", info.pid


# -- actions -----------------------------------------------------------------------------

Ping = Callable[[list[Node], float], set[str]]


def ping_nodes(nodes: Sequence[Node], timeout: float) -> set[str]:
    """The nodes that answer a ping, asked on each node's own broker: ``qops status``
    run with the node's recorded global options and environment."""
    groups: dict[tuple[Any, ...], list[Node]] = {}
    for node in nodes:
        key = (tuple(node.command()), tuple(sorted(node.env.items())), node.cwd)
        groups.setdefault(key, []).append(node)
    answered: set[str] = set()
    for group in groups.values():
        first = group[0]
        argv = [*first.command(), "--json", "status", "-d", ",".join(n.name for n in group),
                "--timeout", f"{timeout:g}"]
        try:
            r = subprocess.run(argv, env=first.as_record().process_env(), cwd=first.cwd or None,
                               capture_output=True, text=True, timeout=timeout + 60,
                               stdin=subprocess.DEVNULL)
            answered |= set(json.loads(r.stdout).get("nodes", {}))
        except (OSError, ValueError, subprocess.TimeoutExpired, AttributeError):
            continue
    return answered


def _launch(node: Node, argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=node.as_record().process_env(),
                            cwd=node.cwd or None)


def _finish(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err.decode(errors="replace").strip()


def check_urls(node: Node) -> None:
    """The node's broker and result backend URLs are well formed (and a SQLite file's
    directory is there): a one-line UsageError before a record or log is written."""
    from qops.backends.base import backend_class
    from qops.transports.base import transport_class
    from qops.transports.sqlite.url import check_directory, path_from_url

    for key, check, what in (("QOPS_BROKER_URL", transport_class, "broker URL"),
                             ("QOPS_RESULT_BACKEND", backend_class, "result backend URL")):
        url = node.env.get(key)
        if url is None:
            continue
        check(url)
        if url.lower().startswith("sqlite:"):
            check_directory(path_from_url(url, what), f"the SQLite file of {what}")


def start(nodes: Sequence[Node], ping: Ping | None = None, *, use_recorded: bool = False,
          timeout: float = 60.0) -> list[Outcome]:
    """Start the nodes in parallel; return when each runs and answers a ping (``ping``,
    default: on each node's own broker), or failed. Each node's record is written first;
    ``use_recorded``: start a node from its record when it has one."""
    outcomes: dict[str, Outcome] = {}
    procs: dict[str, tuple[Node, subprocess.Popen[bytes]]] = {}
    for node in nodes:
        state, pid = node_state(node)
        if state == "running":
            outcomes[node.name] = Outcome(node.name, "start", True, pid, "running",
                                          "already running: left alone")
            continue
        try:
            if use_recorded:
                node.use_record()
            check_urls(node)  # before anything is written for it
            make_dirs(node.pidfile.parent, node.uid, node.gid)
            rec.save(node.cmdfile, node.as_record())
            procs[node.name] = (node, _launch(node, node.argv))
        except (OSError, UsageError) as exc:
            outcomes[node.name] = Outcome(node.name, "start", False, None, "failed",
                                          str(exc), getattr(exc, "exit_code", EX_FAILURE))
    started = []
    for name, (node, proc) in procs.items():
        code, err = _finish(proc, timeout)
        if code == 0:
            started.append(node)
            continue
        outcomes[name] = Outcome(name, "start", False, None, "failed",
                                 f"{err or f'exit code {code}'}\n--- last lines of "
                                 f"{expand(node.logfile, name)}:\n{log_tail(node)}",
                                 code if code > 0 else EX_FAILURE)
    answered = (ping or ping_nodes)(started, 10.0) if started else set()
    for node in started:
        state, pid = node_state(node)
        if node.name in answered:
            outcomes[node.name] = Outcome(node.name, "start", True, pid, "running", "started")
            _note_identity(node, pid)
        else:
            outcomes[node.name] = Outcome(node.name, "start", False, pid, state,
                                          "started but does not answer a ping\n"
                                          + log_tail(node), EX_FAILURE)
    return [outcomes[n.name] for n in nodes]


def _note_identity(node: Node, pid: int | None) -> None:
    """Put the node's pid and start time in its record: what proves it later."""
    start_time = pidfile.process_start_time(pid) if pid else None
    if start_time is None:
        return
    record = node.as_record()
    record.pid, record.start_time = pid, start_time
    try:
        rec.save(node.cmdfile, record)
    except UsageError:
        pass


def check(nodes: Sequence[Node], action: str = "restart") -> list[Outcome]:
    """Could each node start now? Its own command with ``worker --check`` (options, app
    and tasks, root guard, broker), run in parallel in its environment."""
    procs: list[tuple[Node, subprocess.Popen[bytes] | OSError | None]] = []
    for node in nodes:
        argv = list(node.argv)
        if "worker" not in argv:
            procs.append((node, None))
            continue
        at = argv.index("worker") + 1
        try:
            procs.append((node, _launch(node, [*argv[:at], "--check", *argv[at:]])))
        except OSError as exc:
            procs.append((node, exc))
    out = []
    for node, proc in procs:
        if not isinstance(proc, subprocess.Popen):
            out.append(Outcome(node.name, action, False, None, "unchanged",
                               f"cannot check it: {proc or 'no worker command'}"))
            continue
        code, err = _finish(proc, 120.0)
        lines = [x for x in err.splitlines() if x.strip()]
        out.append(Outcome(node.name, action, code == 0, None, "checked",
                           lines[-1] if lines else f"exit code {code}", code))
    return out


def _signal(node: Node, sig: int, action: str) -> Outcome | int:
    """Send ``sig`` to the node's main process if the pidfile is really its; else say why."""
    state, pid = node_state(node)
    if state == "stopped":  # stopping what is stopped succeeds, as systemctl's does
        known = node.cmdfile.exists()
        return Outcome(node.name, action, True, None, "stopped", "not running" if known else
                       f"not running (never started here: no pidfile or record in "
                       f"{node.pidfile.parent})")
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


def restart(nodes: Sequence[Node], ping: Ping | None = None, *, timeout: float,
            max_unavailable: int = 1) -> list[Outcome]:
    """Rolling, from each node's record (the command line given now for a node that
    has none). First every node must pass ``check``: if one could not start again,
    none is stopped. Then at most ``max_unavailable`` nodes are down at a time, each
    batch back and answering before the next goes down; a node that was up and does
    not come back is tried once more, and after a failure the rest are left alone."""
    for node in nodes:
        node.use_record()
    checked = check(nodes)
    if not all(o.ok for o in checked):
        return [o if not o.ok else Outcome(o.node, "restart", False, None, "unchanged",
                                           "not restarted: another node could not start "
                                           "again") for o in checked]
    out: list[Outcome] = []
    batch = max(1, max_unavailable)
    for i in range(0, len(nodes), batch):
        group = list(nodes[i:i + batch])
        was_up = {n.name for n in group if node_state(n)[0] == "running"}
        stopped = {o.node: o for o in stopwait(group, timeout)}
        started = start(group, ping)
        again = [n for n, st in zip(group, started, strict=True)
                 if not st.ok and n.name in was_up]
        if again:
            time.sleep(1.0)
            retried = {o.node: o for o in start(again, ping)}
            started = [retried.get(o.node, o) for o in started]
        for node, st in zip(group, started, strict=True):
            how = stopped[node.name].message
            out.append(Outcome(node.name, "restart", st.ok, st.pid, st.state,
                               f"{how}; {st.message}", st.code))
        if not all(o.ok for o in started):
            out += [Outcome(n.name, "restart", False, None, "unchanged",
                            "not restarted: the rolling restart stopped at a failure")
                    for n in nodes[i + batch:]]
            break  # keep the rest up: don't take more nodes down after a failure
    return out


def status(nodes: Sequence[Node]) -> list[Outcome]:
    out = []
    for node in nodes:
        state, pid = node_state(node)
        up = uptime(pid) if state == "running" and pid else None
        msg = {"running": f"up {_human(up or 0)}", "stopped": "not running",
               "stale": f"not running (stale pidfile naming pid {pid})",
               "foreign": f"not running (the pidfile names pid {pid}, another process)"}
        out.append(Outcome(node.name, "status", state == "running", pid, state, msg[state],
                           0 if state == "running" else EX_UNAVAILABLE))
    return out


def _human(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"
