"""``qops multi``: start, stop and restart worker nodes as daemons.

Celery's node syntax is kept (``3``, ``w1 w2``, ``w1@%h``, ``-c:1 10``, ``-c:1-3 4``,
``-c:w1 5``, ``--logfile:w2=/x.log``, ``--`` passthrough). What differs:

- each node's record (``qops/ops/record.py``: command line, environment, user, pid and
  start time) is kept next to its pidfile, so every verb works from it alone;
- ``start`` returns when every node runs -- the detached worker reports readiness over a
  pipe and then answers a ping on its own broker -- or says which failed, with the tail
  of its log; ``restart`` first checks that every node could start again;
- pidfiles hold the pid alone and are locked: a stale one is replaced, and a pid whose
  start time is not the recorded one is never signalled.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qops.errors import UsageError
from qops.ops import record as rec
from qops.ops.nodes import check_name, expand, hostname

# multi's own options, each with a value (not passed to the worker as such)
OWN = {"--pidfile", "--logfile", "--range-prefix", "--rundir", "--logdir", "--timeout",
       "--max-unavailable", "--uid", "--gid"}


@dataclass
class Node:
    name: str  # full name, w1@host
    options: dict[str, str | None] = field(default_factory=dict)  # worker options
    pidfile: Path = Path()
    logfile: str = ""  # template: %I is expanded by the worker per pool process
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # the environment that matters
    cwd: str = ""
    uid: int | None = None  # the user the node drops to (its directories are its own)
    gid: int | None = None

    @property
    def short(self) -> str:
        return self.name.partition("@")[0]

    @property
    def cmdfile(self) -> Path:
        return rec.path_for(self.pidfile)

    def as_record(self) -> rec.Record:
        return rec.Record(self.name, self.argv, self.cwd, self.env, self.uid, self.gid)

    def use_record(self) -> bool:
        """Take the command line, environment and user from the node's record (True),
        or keep the ones built from this command line when there is none (False)."""
        found = rec.load(self.cmdfile)
        if found is None:
            return False
        self.argv, self.env, self.cwd = found.argv, found.env, found.cwd
        self.uid, self.gid = found.uid, found.gid
        return True

    def command(self) -> list[str]:
        """``python -m qops [global options]``: the part of argv before ``worker``."""
        return self.argv[:self.argv.index("worker")] if "worker" in self.argv else self.argv


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


def parse_args(argv: Sequence[str], worker_options: Mapping[str, bool]) -> MultiArgs:
    """Split ``w1 w2 -c 3 -c:1 10 --logfile:w2=/x.log -- extra`` into its parts.
    ``worker_options``: each option of ``qops worker`` -> whether it takes a value; an
    option neither the worker's nor multi's own is a usage error (after ``--``: the
    worker's to judge)."""
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
        if opt not in OWN and opt not in worker_options:
            raise UsageError(f"no such option: {opt} (see 'qops worker --help' and "
                             "'qops multi --help')")
        if value is None and (opt in OWN or worker_options[opt]):
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


def build_nodes(args: MultiArgs, *, global_argv: Sequence[str], root_with_uid: bool,
                env: Mapping[str, str] | None = None, uid: int | None = None,
                gid: int | None = None) -> list[Node]:
    """The nodes as this command line describes them. ``env``: the environment that
    matters for them (broker URLs there, never in ``global_argv``)."""
    names = expand_names(args.names, args.own("--range-prefix") or "qops")
    rundir = Path(args.own("--rundir") or ("/run/qops" if root_with_uid else "."))
    logdir = Path(args.own("--logdir") or ("/var/log/qops" if root_with_uid else "."))
    nodes = []
    for index, name in enumerate(names, start=1):
        node = Node(name, env=dict(env or {}), cwd=os.getcwd(), uid=uid, gid=gid)
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
