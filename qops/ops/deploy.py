"""Deployment configs for systemd and supervisor (docs/production.md).

``systemd_files()`` and ``supervisor_config()`` fill the templates in
``qops/ops/templates/``. Each signal and timeout setting there carries a one-line
comment saying why it has that value; the values that depend on the app (how long a
warm shutdown may take) are worked out here by ``stop_timeout()``.

Two template grammars meet in these files and must not be confused:

- systemd expands its own ``%`` specifiers in unit files (``%i`` the instance, ``%H``
  the host, ``%n`` the unit name, ``%I`` the unescaped instance): a ``%`` meant for
  qops (``--logfile /var/log/qops/%n%I.log``) is written ``%%`` there; ``$`` likewise
  starts a variable, so a literal one is ``$$``.
- supervisor expands ``%(name)s`` in most values: a literal ``%`` is ``%%`` there too.

Everything that goes into a file passes through ``_sd_word`` / ``_sv_word``, which quote
and escape it; only the few deliberate systemd specifiers (``%i@%H``) are written raw.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from qops.builtins import is_builtin
from qops.errors import UsageError
from qops.ops.nodes import check_name
from qops.transports.urls import mask_secrets

DEFAULT_STOP_TIMEOUT = 300  # seconds, when no time limit bounds the tasks
STOP_MARGIN = 30  # seconds on top of the longest limit: ack, store the result, exit
BEAT_STOP_TIMEOUT = 30
START_TIMEOUT = 90
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

WORKER_UNIT = "qops-worker@.service"
BEAT_UNIT = "qops-beat.service"
MULTI_UNIT = "qops-workers.service"
EXPORTER_UNIT = "qops-exporter.service"
TARGET = "qops.target"
ENV_FILE = "qops.env"
TMPFILES = "tmpfiles-qops.conf"


# -- how long a warm shutdown may take -------------------------------------------------


@dataclass
class StopTimeout:
    seconds: int
    why: str  # the reason, for a one-line comment


def stop_timeout(app: Any | None, override: float | None = None,
                 default: int = DEFAULT_STOP_TIMEOUT) -> StopTimeout:
    """How long a stop may wait for running tasks: the longest task time limit of ``app``
    (hard or soft, from the task, its annotation or the app's settings) plus a margin.

    A task without any limit may run for ever, so then -- and without an app -- the
    ``default`` is used, and the reason says how to make it exact."""
    if override is not None:
        if override <= 0:
            raise UsageError("--stop-timeout must be a positive number of seconds")
        seconds = math.ceil(override)
        return StopTimeout(seconds, f"{seconds} s, set with --stop-timeout")
    if app is None:
        return StopTimeout(default, f"no -A to read task time limits from, so a default "
                                    f"{default} s (or --stop-timeout)")
    limits: dict[str, float] = {}
    unlimited: list[str] = []
    for name, task in sorted(app.tasks.items()):
        if is_builtin(name):
            continue  # canvas helpers: they only publish messages
        values = [float(v) for v in (app.option_for(task, "time_limit", "task_time_limit"),
                                     app.option_for(task, "soft_time_limit",
                                                    "task_soft_time_limit")) if v]
        if values:
            limits[name] = max(values)
        else:
            unlimited.append(name)
    if unlimited:
        which = f"{unlimited[0]} and others" if len(unlimited) > 1 else unlimited[0]
        return StopTimeout(default, f"{which} have no time limit, so a default {default} s "
                                    "(set task_time_limit, or --stop-timeout)")
    if not limits:
        return StopTimeout(default, f"{app.main} has no tasks, so a default {default} s")
    name = max(limits, key=lambda n: limits[n])
    seconds = math.ceil(limits[name]) + STOP_MARGIN
    return StopTimeout(seconds, f"the longest task time limit is {limits[name]:g} s ({name}), "
                                f"+ {STOP_MARGIN} s")


# -- what to generate ------------------------------------------------------------------


@dataclass
class Deployment:
    """Everything the generated files depend on (the CLI fills it from its options)."""

    qops_bin: list[str]  # argv prefix that runs qops, e.g. ["/usr/bin/qops"]
    nodes: list[str] = field(default_factory=lambda: ["w1"])
    stop: StopTimeout = field(default_factory=lambda: stop_timeout(None))
    app: str | None = None
    broker: str | None = None
    result_backend: str | None = None
    config: str | None = None
    compat: str | None = None
    user: str = "qops"
    group: str | None = None
    workdir: str = "/srv/qops"
    env_file: str = "/etc/qops/qops.env"
    logdir: str = "/var/log/qops"
    rundir: str = "/run/qops"
    statedir: str = "/var/lib/qops"
    control_key_file: str | None = None  # signed remote control (docs/security.md)
    loglevel: str = "INFO"
    worker_args: list[str] = field(default_factory=list)  # -c 4 -Q a,b -P threads -E
    beat: bool = True
    multi: bool = False
    exporter: str | None = None  # HOST:PORT of a qops exporter unit (systemd only)
    # supervisor only
    name: str = "qops"
    force_root: bool = False
    startsecs: int = 10
    command: str = ""  # the command line that made this, for the header

    def __post_init__(self) -> None:
        if not self.qops_bin or not self.qops_bin[0].startswith("/"):
            raise UsageError(f"--qops-bin {' '.join(self.qops_bin)!r}: give an absolute path "
                             "(e.g. /usr/local/bin/qops or '/opt/venv/bin/python -m qops')")
        if not self.nodes:
            raise UsageError("no nodes: name them (w1 w2) or pass --nodes N")
        for node in self.nodes:
            if "@" in node:
                raise UsageError(
                    f"node name {node!r}: give the name part only; the host part is this "
                    "machine's name (w1 runs as w1@<host>)")
            check_name(node)
        if len(set(self.nodes)) != len(self.nodes):
            raise UsageError(f"node names repeat: {' '.join(self.nodes)}")
        if not NODE_NAME.match(self.name):
            raise UsageError(f"--name {self.name!r}: use letters, digits, '.', '_' and '-'")
        for label, path in (("--workdir", self.workdir), ("--env-file", self.env_file),
                            ("--logdir", self.logdir), ("--rundir", self.rundir),
                            ("--statedir", self.statedir)):
            if not path.startswith("/"):
                raise UsageError(f"{label} {path!r}: give an absolute path")
            if any(c in path for c in "\n\"'\\;#") or path != path.strip():
                raise UsageError(f"{label} {path!r}: quotes, backslashes, ';', '#' and "
                                 "surrounding spaces are not supported in paths here")
        if self.exporter is not None:
            host, _, port = self.exporter.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536 \
                    or not re.match(r"^[A-Za-z0-9_.:\[\]-]+$", host):
                raise UsageError(f"--exporter {self.exporter!r}: give HOST:PORT, "
                                 "e.g. 127.0.0.1:9808")
        if self.user in ("root", "0") and not self.force_root:
            raise UsageError("--user root: the nodes would refuse to start (the root guard); "
                             "run them as another user (or, for supervisor, --force-root)")
        for label, value in (("--user", self.user), ("--group", self.group or "")):
            if value and not re.match(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\$?$", value):
                raise UsageError(f"{label} {value!r} is not a user or group name")

    def global_args(self) -> list[str]:
        """Global options every generated command carries (broker URLs go in the
        environment instead: they may hold passwords, and command lines are public)."""
        out: list[str] = []
        if self.app:
            out += ["-A", self.app]
        if self.config:
            out += ["--config", self.config]
        if self.compat:
            out += ["--compat", self.compat]
        return out


# -- escaping ----------------------------------------------------------------------------


def _sd_word(arg: str) -> str:
    """One argument for an Exec*= line: quoted as needed, with systemd's % and $ escaped."""
    return shlex.quote(arg).replace("%", "%%").replace("$", "$$")


def _sd_line(args: Sequence[str]) -> str:
    return " ".join(_sd_word(a) for a in args)


def _sv_word(arg: str) -> str:
    """One argument for supervisor's command=: quoted as needed, % escaped."""
    return shlex.quote(arg).replace("%", "%%")


def _sv_value(text: str) -> str:
    """A supervisor value (a path, a name): % escaped."""
    return text.replace("%", "%%")


def _env_value(value: str) -> str:
    """A value in an EnvironmentFile: bare if plain, else single-quoted (no expansion)."""
    if "\n" in value or "'" in value:
        raise UsageError(f"cannot write {mask_secrets(value)!r} to an environment file "
                         "(newline or quote)")
    if re.match(r"^[A-Za-z0-9_@%+=:,./?&-]*$", value):
        return value
    return f"'{value}'"


def _sv_env(pairs: Sequence[tuple[str, str]]) -> str:
    """supervisor's environment=KEY="value",... with %, \\ and " escaped."""
    out = []
    for key, value in pairs:
        if "\n" in value:
            raise UsageError(f"cannot write {mask_secrets(value)!r} to supervisor's "
                             "environment=")
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        out.append(f'{key}="{_sv_value(escaped)}"')
    return ",".join(out)


# -- templates ----------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def render(template: str, **values: str) -> str:
    """Fill ``{{name}}`` placeholders. A line holding only a placeholder whose value is
    empty is dropped (optional settings). A missing or unused value is a bug: raise."""
    text = resources.files("qops.ops").joinpath("templates").joinpath(template).read_text()
    used: set[str] = set()

    def sub(m: re.Match[str]) -> str:
        used.add(m.group(1))
        return values[m.group(1)]

    lines = []
    for line in text.splitlines():
        whole = _PLACEHOLDER.fullmatch(line)
        if whole is not None and values[whole.group(1)] == "":
            used.add(whole.group(1))
            continue
        lines.append(_PLACEHOLDER.sub(sub, line))
    unused = set(values) - used
    if unused:
        raise KeyError(f"{template}: unused values {sorted(unused)}")
    return "\n".join(lines) + "\n"


def _app_desc(d: Deployment) -> str:
    return f" ({d.app})" if d.app else ""


def _header(d: Deployment, mark: str = "#") -> str:
    return f"{mark} Generated by: {d.command}" if d.command else f"{mark} Generated by qops."


# -- systemd -------------------------------------------------------------------------------


def systemd_files(d: Deployment) -> dict[str, str]:
    """File name -> content: the worker units (a template unit, or with ``multi`` the
    forking unit of ``qops multi``), beat's unit, qops.target, the environment file and
    the tmpfiles.d entry."""
    common = {
        "header": _header(d),
        "app_desc": _app_desc(d),
        "user": d.user,
        "group": f"Group={d.group}" if d.group else "",
        "workdir": d.workdir,
        "env_file": d.env_file,
    }
    files: dict[str, str] = {}
    units = []
    if d.multi:
        files[MULTI_UNIT] = _multi_unit(d, common)
        units.append(MULTI_UNIT)
    else:
        files[WORKER_UNIT] = _worker_unit(d, common)
        units += [f"qops-worker@{n}.service" for n in d.nodes]
    if d.beat:
        files[BEAT_UNIT] = _beat_unit(d, common)
        units.append(BEAT_UNIT)
    if d.exporter:
        files[EXPORTER_UNIT] = _exporter_unit(d, common)
        units.append(EXPORTER_UNIT)
    files[TARGET] = render(
        "qops.target", header=common["header"], app_desc=common["app_desc"],
        wants=" ".join(units),
        add_node="" if d.multi else
        "# Add a node later with: systemctl enable --now qops-worker@w3.service")
    files[ENV_FILE] = _env_file(d)
    files[TMPFILES] = render(
        "tmpfiles-qops.conf", header=common["header"], rundir=d.rundir, logdir=d.logdir,
        user=d.user, group=d.group or "-")
    return files


def _worker_unit(d: Deployment, common: dict[str, str]) -> str:
    # -n %i@%H is written raw: systemd fills in the instance and the host name
    exec_start = " ".join([
        _sd_line([*d.qops_bin, *d.global_args(), "worker"]), "-n", "%i@%H",
        _sd_line(["-l", d.loglevel, "--logfile", f"{d.logdir}/%n%I.log", *d.worker_args]),
        "$QOPS_WORKER_OPTS"])
    return render(WORKER_UNIT, **common, exec_start=exec_start,
                  stop_timeout=str(d.stop.seconds), stop_why=d.stop.why,
                  start_timeout=str(START_TIMEOUT))


def _multi_args(d: Deployment) -> list[str]:
    return [*d.nodes, f"--pidfile={d.rundir}/%n.pid"]


def _multi_unit(d: Deployment, common: dict[str, str]) -> str:
    n = len(d.nodes)
    start = _sd_line([*d.qops_bin, *d.global_args(), "multi", "start", *_multi_args(d),
                      f"--logfile={d.logdir}/%n%I.log", "-l", d.loglevel, *d.worker_args])
    stop = _sd_line([*d.qops_bin, "multi", "stopwait", *_multi_args(d),
                     "--timeout", str(d.stop.seconds)])
    reload = _sd_line([*d.qops_bin, *d.global_args(), "multi", "restart", *_multi_args(d),
                       "--timeout", str(d.stop.seconds)])
    # multi start: each node detaches (up to 60 s) and then answers a ping (10 s); a
    # reload -- a rolling restart, one node after the other -- runs under the same limit
    per_node = d.stop.seconds + 10 + 70
    start_timeout = max(START_TIMEOUT, n * per_node)
    stop_timeout = d.stop.seconds + 10 * n + STOP_MARGIN
    return render(MULTI_UNIT, **common, nodes=" ".join(d.nodes),
                  exec_start=f"{start} $QOPS_WORKER_OPTS", exec_stop=stop, exec_reload=reload,
                  start_timeout=str(start_timeout), stop_timeout=str(stop_timeout),
                  stop_wait=str(d.stop.seconds), stop_why=d.stop.why, per_node=str(per_node))


def _beat_unit(d: Deployment, common: dict[str, str]) -> str:
    exec_start = _sd_line([*d.qops_bin, *d.global_args(), "beat",
                           "-s", "/var/lib/qops/beat-schedule", "-l", d.loglevel,
                           "--logfile", f"{d.logdir}/beat.log"])
    return render(BEAT_UNIT, **common, exec_start=f"{exec_start} $QOPS_BEAT_OPTS",
                  stop_timeout=str(BEAT_STOP_TIMEOUT), start_timeout=str(START_TIMEOUT))


def _exporter_unit(d: Deployment, common: dict[str, str]) -> str:
    assert d.exporter is not None
    host, _, port = d.exporter.rpartition(":")
    exec_start = _sd_line([*d.qops_bin, *d.global_args(), "exporter", "--bind",
                           host.strip("[]"), "--port", port])
    return render(EXPORTER_UNIT, **common, exec_start=exec_start)


def _env_file(d: Deployment) -> str:
    def line(key: str, value: str | None, example: str) -> str:
        return f"{key}={_env_value(value)}" if value else f"#{key}={example}"

    if d.app:
        app = (f"# The app is named in the units (-A {d.app}): QOPS_APP is not needed.\n"
               f"#QOPS_APP={d.app}")
    else:
        app = "# The app (required: the units have no -A), e.g. QOPS_APP=proj\nQOPS_APP="
    return render(
        ENV_FILE, header=_header(d), env_file=d.env_file,
        broker=line("QOPS_BROKER_URL", d.broker, "redis://localhost:6379/0"),
        backend=line("QOPS_RESULT_BACKEND", d.result_backend, "redis://localhost:6379/1"),
        control_key=line("QOPS_CONTROL_KEY_FILE", d.control_key_file,
                         "/etc/qops/control.key"),
        app=app)


# -- supervisor ----------------------------------------------------------------------------


def supervisor_config(d: Deployment) -> str:
    """One file: a [program:...] per node and for beat, and a [group:...] of them."""
    env: list[tuple[str, str]] = []
    if d.force_root:
        env.append(("QOPS_FORCE_ROOT", "1"))
    if d.broker:
        env.append(("QOPS_BROKER_URL", d.broker))
    if d.result_backend:
        env.append(("QOPS_RESULT_BACKEND", d.result_backend))
    if d.control_key_file:
        env.append(("QOPS_CONTROL_KEY_FILE", d.control_key_file))
    if d.force_root:
        user = ("; RISK: no user=, so task code runs as root -- a bug in a task, or any message "
                "someone can put on the broker, becomes root on this host. QOPS_FORCE_ROOT=1 "
                "below overrides qops's refusal; prefer user=.")
    else:
        user = ("; task code runs as this user: qops refuses to run as root (exit 77)\n"
                f"user={_sv_value(d.user)}")
    common = {
        "directory": _sv_value(d.workdir),
        "user": user,
        "environment": f"environment={_sv_env(env)}" if env else "",
        "startsecs": str(d.startsecs),
    }
    programs = []
    sections = []
    for node in d.nodes:
        program = f"{d.name}-{node}"
        programs.append(program)
        command = " ".join([
            _sv_line([*d.qops_bin, *d.global_args(), "worker"]),
            # %%h: supervisor turns it into %h, which qops fills with the host name
            "-n", _sv_word(f"{node}@") + "%%h",
            _sv_line(["-l", d.loglevel, *d.worker_args])])
        sections.append(render(
            "supervisor-worker.conf", **common, program=program, node=node, command=command,
            stop_timeout=str(d.stop.seconds), stop_why=d.stop.why,
            logfile=_sv_value(f"{d.logdir}/{node}.log")))
    if d.beat:
        program = f"{d.name}-beat"
        programs.append(program)
        command = _sv_line([*d.qops_bin, *d.global_args(), "beat",
                            "-s", f"{d.statedir}/beat-schedule", "-l", d.loglevel])
        sections.append(render(
            "supervisor-beat.conf", **common, program=program, command=command,
            stop_timeout=str(BEAT_STOP_TIMEOUT), logfile=_sv_value(f"{d.logdir}/beat.log")))
    dirs = [d.logdir] + ([d.statedir] if d.beat else [])
    owner = "root" if d.force_root else d.user
    if d.broker or d.result_backend:
        notes = ("; environment= holds the broker URL and any password in it: make this file "
                 "readable by root only (chmod 0600).")
    else:
        notes = ("; No broker given (-b): give each program environment=QOPS_BROKER_URL=\"redis://...\"."
                 " The embedded SQLite\n; default lives in the home directory, and supervisor"
                 " does not change HOME for user=.")
    return render(
        "supervisor.conf", header=_header(d, ";"), app_desc=_app_desc(d), notes=notes,
        what=", ".join(d.nodes) + (" and beat" if d.beat else ""),
        mkdir=f"mkdir -p {' '.join(dirs)} && chown {owner}: {' '.join(dirs)}",
        sections="\n".join(sections), name=d.name, programs=",".join(programs))


def _sv_line(args: Sequence[str]) -> str:
    return " ".join(_sv_word(a) for a in args)
