"""``qops generate systemd|supervisor``: deployment configs for the app's worker nodes."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

HELP = """Write deployment configs: systemd units or a supervisor config.

qops -A proj generate systemd w1 w2 --user qops --workdir /srv/proj -o units/

qops -A proj generate supervisor --nodes 2 --user qops --workdir /srv/proj -o qops.conf

The global --workdir (the app's directory on the target host, which need not exist \
here) becomes the working directory of the nodes. With -A the app is imported to find \
its longest task time limit, which the stop timeouts must exceed."""

Names = Annotated[list[str] | None, typer.Argument(help="Node names (default: w1, or w1..wN with --nodes).", show_default=False)]
Nodes = Annotated[int | None, typer.Option("--nodes", min=1, help="Number of nodes: w1..wN.")]
User = Annotated[str, typer.Option("--user", help="User the nodes run as (qops refuses root).")]
QopsBin = Annotated[str | None, typer.Option("--qops-bin", help="Absolute command that runs qops, e.g. /usr/local/bin/qops or '/opt/venv/bin/python -m qops' (default: this installation's).")]
StopTimeoutOpt = Annotated[float | None, typer.Option("--stop-timeout", help="Seconds a stop waits for running tasks (default: the longest task time limit + 30, else 300).")]
Concurrency = Annotated[int | None, typer.Option("-c", "--concurrency", min=1, help="Pool size of each node.")]
Queues = Annotated[str | None, typer.Option("-Q", "--queues", help="Queues each node consumes, comma separated.")]
Pool = Annotated[str | None, typer.Option("-P", "--pool", help="prefork, threads or solo.")]
Loglevel = Annotated[str, typer.Option("-l", "--loglevel", help="Log level of the nodes and beat.")]
Events = Annotated[bool, typer.Option("-E", "--task-events", help="Nodes send task events.")]
Logdir = Annotated[str, typer.Option("--logdir", help="Directory of the log files.")]
NoBeat = Annotated[bool, typer.Option("--no-beat", help="No beat (periodic tasks) unit/program.")]
ControlKey = Annotated[str | None, typer.Option("--control-key-file", help="Path on the host of the remote-control key (make it with 'qops generate key'): nodes then obey signed commands only.")]


def register(cli: typer.Typer) -> None:
    gen = typer.Typer(name="generate", help=HELP, no_args_is_help=True,
                      context_settings={"help_option_names": ["-h", "--help"]})
    gen.command("systemd", help="Write systemd units: a template unit qops-worker@.service "
                "(or --multi), qops-beat.service, qops.target, an environment file and a "
                "tmpfiles.d entry (--exporter: qops-exporter.service too).")(systemd)
    gen.command("supervisor", help="Write a supervisor config: a program section per "
                "node and for beat, and a group of them.")(supervisor)
    gen.command("key", help="Create a remote-control key file (docs/security.md): "
                "0600, or 0640 with --group; an existing file is kept.")(key)
    cli.add_typer(gen, name="generate")


def key(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="The key file to create, e.g. /etc/qops/control.key.")],
    group: Annotated[str | None, typer.Option("--group", help="Give the file to this group, mode 0640 (the nodes' group).")] = None,
) -> None:
    import grp

    from qops.errors import UsageError
    from qops.signing import check_key_file_mode, write_key_file

    term = ctx.obj.terminal
    gid = None
    if group is not None:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise UsageError(f"no group named {group!r}") from None
    try:
        write_key_file(path, gid)
        created = True
    except FileExistsError:
        created = False
        problem = check_key_file_mode(path)
        if problem:
            raise UsageError(f"key file {path} exists and {problem}") from None
    except OSError as exc:
        raise UsageError(f"cannot create key file {path}: {exc.strerror}") from None
    if term.json_mode:
        term.json({"key_file": str(path), "created": created})
        return
    term.print(f"{'wrote' if created else 'kept the existing'} {path}")
    term.note("Give every node and every client that may steer them this file "
              "(control_key_file: or QOPS_CONTROL_KEY_FILE); see docs/security.md.")


def systemd(
    ctx: typer.Context,
    names: Names = None,
    nodes: Nodes = None,
    user: User = "qops",
    group: Annotated[str | None, typer.Option("--group", help="Group the nodes run as (default: the user's).")] = None,
    env_file: Annotated[str, typer.Option("--env-file", help="Path of the environment file on the host.")] = "/etc/qops/qops.env",
    multi: Annotated[bool, typer.Option("--multi", help="One Type=forking unit running qops multi start/stopwait/restart instead of the template unit.")] = False,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write the files into this directory (default: print them).")] = None,
    qops_bin: QopsBin = None,
    stop_timeout: StopTimeoutOpt = None,
    concurrency: Concurrency = None,
    queues: Queues = None,
    pool: Pool = None,
    loglevel: Loglevel = "INFO",
    task_events: Events = False,
    logdir: Logdir = "/var/log/qops",
    rundir: Annotated[str, typer.Option("--rundir", help="Directory of multi's pidfiles.")] = "/run/qops",
    no_beat: NoBeat = False,
    control_key_file: ControlKey = None,
    exporter: Annotated[str | None, typer.Option("--exporter", help="Also a unit for qops exporter (Prometheus metrics) listening on HOST:PORT, e.g. 127.0.0.1:9808.")] = None,
) -> None:
    from qops.ops import deploy

    g = ctx.obj
    d = _deployment(g, "systemd", names, nodes, qops_bin, stop_timeout, concurrency, queues,
                    pool, loglevel, task_events, user=user, group=group, env_file=env_file,
                    multi=multi, logdir=logdir, rundir=rundir, beat=not no_beat,
                    control_key_file=control_key_file, exporter=exporter)
    files = deploy.systemd_files(d)
    term = g.terminal
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            _write(output / name, text, private=name == deploy.ENV_FILE)
        if term.json_mode:
            term.json({"written": [str(output / n) for n in files]})
            return
        for name in files:
            term.print(f"wrote {output / name}")
        term.note(_systemd_next_steps(d))
    elif term.json_mode:
        term.json(files)
    else:
        sys.stdout.write("\n".join(f"# ---- {name} ----\n{text}" for name, text in files.items()))
        sys.stdout.flush()


def supervisor(
    ctx: typer.Context,
    names: Names = None,
    nodes: Nodes = None,
    user: User = "qops",
    force_root: Annotated[bool, typer.Option("--force-root", help="No user=: run as root with QOPS_FORCE_ROOT=1 (task code runs as root).")] = False,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write the config to this file (default: print it).")] = None,
    qops_bin: QopsBin = None,
    stop_timeout: StopTimeoutOpt = None,
    concurrency: Concurrency = None,
    queues: Queues = None,
    pool: Pool = None,
    loglevel: Loglevel = "INFO",
    task_events: Events = False,
    logdir: Logdir = "/var/log/qops",
    statedir: Annotated[str, typer.Option("--statedir", help="Directory of beat's schedule file.")] = "/var/lib/qops",
    name: Annotated[str, typer.Option("--name", help="Group name and program prefix (\\[program:NAME-w1], \\[group:NAME]).")] = "qops",
    startsecs: Annotated[int, typer.Option("--startsecs", min=1, help="Seconds a program must run to count as started.")] = 10,
    no_beat: NoBeat = False,
    control_key_file: ControlKey = None,
) -> None:
    from qops.ops import deploy

    g = ctx.obj
    d = _deployment(g, "supervisor", names, nodes, qops_bin, stop_timeout, concurrency,
                    queues, pool, loglevel, task_events, user=user, force_root=force_root,
                    logdir=logdir, statedir=statedir, name=name, startsecs=startsecs,
                    beat=not no_beat, control_key_file=control_key_file)
    text = deploy.supervisor_config(d)
    term = g.terminal
    if output is not None:
        if output.parent != Path(""):
            output.parent.mkdir(parents=True, exist_ok=True)
        _write(output, text, private=True)
        if term.json_mode:
            term.json({"written": [str(output)]})
            return
        term.print(f"wrote {output}")
    elif term.json_mode:
        term.json({"supervisor.conf": text})
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


def _deployment(g: Any, kind: str, names: list[str] | None, nodes: int | None,
                qops_bin: str | None, stop_timeout: float | None, concurrency: int | None,
                queues: str | None, pool: str | None, loglevel: str, task_events: bool,
                **extra: Any) -> Any:
    from qops.errors import UsageError
    from qops.ops import deploy
    from qops.ops.daemon import check_level

    if names and nodes is not None:
        raise UsageError("name the nodes (w1 w2) or pass --nodes N, not both")
    node_names = list(names) if names else [f"w{i}" for i in range(1, (nodes or 1) + 1)]
    if pool is not None and pool not in ("prefork", "threads", "solo"):
        raise UsageError(f"unknown pool {pool!r}: choose prefork, threads or solo")
    level = check_level(loglevel)
    worker_args: list[str] = []
    if concurrency is not None:
        worker_args += ["-c", str(concurrency)]
    if queues:
        worker_args += ["-Q", queues]
    if pool:
        worker_args += ["-P", pool]
    if task_events:
        worker_args.append("-E")
    workdir = os.path.abspath(g.workdir) if g.workdir else os.getcwd()
    app = _load_app(g, workdir) if g.app and stop_timeout is None else None
    d = deploy.Deployment(
        qops_bin=_qops_bin(qops_bin), nodes=node_names,
        stop=deploy.stop_timeout(app, stop_timeout), app=g.app, broker=g.broker,
        result_backend=g.result_backend,
        config=os.path.abspath(g.config) if g.config else None, compat=g.compat,
        workdir=workdir, loglevel=level, worker_args=worker_args, **extra)
    d.command = _command_line(g, kind, d, names, nodes, qops_bin, stop_timeout, **extra)
    return d


def _load_app(g: Any, workdir: str) -> Any:
    """The app, imported as the nodes will import it: from ``workdir`` when that exists
    here, else from the current directory (generating for another host)."""
    if os.path.isdir(workdir) and os.path.abspath(os.getcwd()) != workdir:
        os.chdir(workdir)
        sys.path.insert(0, workdir)
    return g.load_app(required=True, import_tasks=True)


def _qops_bin(value: str | None) -> list[str]:
    if value:
        return shlex.split(value)
    script = Path(sys.executable).parent / "qops"  # this installation's entry point
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "qops"]


def _command_line(g: Any, kind: str, d: Any, names: list[str] | None, nodes: int | None,
                  qops_bin: str | None, stop_timeout: float | None, **extra: Any) -> str:
    """The command that regenerates these files, for their header (passwords hidden)."""
    from qops.transports.urls import mask_password

    args = ["qops"]
    for opt, value in (("-A", g.app), ("-b", g.broker and mask_password(g.broker)),
                       ("--result-backend", g.result_backend and mask_password(g.result_backend)),
                       ("--config", d.config), ("--compat", g.compat)):
        if value:
            args += [opt, value]
    args += ["generate", kind, *(names or [])]
    if nodes is not None:
        args += ["--nodes", str(nodes)]
    defaults = {"group": None, "env_file": "/etc/qops/qops.env", "multi": False,
                "logdir": "/var/log/qops", "rundir": "/run/qops", "statedir": "/var/lib/qops",
                "force_root": False, "name": "qops", "startsecs": 10, "beat": True,
                "control_key_file": None, "exporter": None}
    for key, value in extra.items():
        if value == defaults.get(key, object()) or (key == "user" and extra.get("force_root")):
            continue  # (--force-root: no user, whatever --user says)
        if key == "beat":
            args.append("--no-beat")
        elif value is True:
            args.append("--" + key.replace("_", "-"))
        else:
            args += ["--" + key.replace("_", "-"), str(value)]
    args += ["--workdir", d.workdir]
    if qops_bin:
        args += ["--qops-bin", qops_bin]
    if stop_timeout is not None:
        args += ["--stop-timeout", f"{stop_timeout:g}"]
    args += d.worker_args
    if d.loglevel != "INFO":
        args += ["-l", d.loglevel]
    return " ".join(shlex.quote(a) for a in args)


def _write(path: Path, text: str, private: bool) -> None:
    """Write a generated file: 0600 when it may hold a password (qops.env, the
    supervisor config), else 0644; the mode is set even on a file that existed."""
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _systemd_next_steps(d: Any) -> str:
    return (f"Next: copy the units to /etc/systemd/system/, the environment file to "
            f"{d.env_file} (chmod 0600), the tmpfiles entry to /etc/tmpfiles.d/qops.conf; run "
            "systemd-tmpfiles --create /etc/tmpfiles.d/qops.conf, systemctl daemon-reload, "
            "systemctl enable --now qops.target")
