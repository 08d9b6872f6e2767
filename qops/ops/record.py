"""The node record: everything ``qops multi`` needs to run a node again, kept beside its
pidfile (``w1.pid`` -> ``w1.pid.cmd``), so that every ``multi`` verb works from the
record alone, with no repeat of the original options.

It holds the node's command line, working directory, user and group, the environment
that matters (``QOPS_*`` settings -- the broker and result backend URLs among them --,
``PYTHONPATH``, ``PATH``, locale), and, once the node runs, its pid and the start time
that proves the pid is still that node's. Broker URLs travel in the environment, never
in the command line, so ``ps`` shows no password; hence the file is written 0600, and
a record that is not the caller's own (another owner, writable by others) is refused:
``multi restart`` run as root must not run a command a node's user could have planted.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qops.errors import UsageError

VERSION = 2
#: environment variables a node is started with, recorded and given back on restart
KEEP_PREFIXES = ("QOPS_", "LC_")
KEEP = ("C_FORCE_ROOT", "PYTHONPATH", "PATH", "VIRTUAL_ENV", "LANG", "TZ",
        "PYTHONDONTWRITEBYTECODE")
#: global options that hold URLs: they go to the node through the environment
URL_OPTIONS = {"-b": "QOPS_BROKER_URL", "--broker": "QOPS_BROKER_URL",
               "--result-backend": "QOPS_RESULT_BACKEND"}


def matters(name: str) -> bool:
    return name in KEEP or name.startswith(KEEP_PREFIXES)


def environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The part of ``environ`` (default: ours) that a node's behaviour depends on."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in sorted(env.items()) if matters(k)}


@dataclass
class Record:
    node: str
    argv: list[str]
    cwd: str
    env: dict[str, str] = field(default_factory=dict)
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    start_time: int | None = None  # clock ticks since boot (/proc/<pid>/stat)

    def process_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment to start the node in: ``base`` (default: ours) without the
        variables a record decides about, then the recorded ones."""
        env = {k: v for k, v in (os.environ if base is None else base).items()
               if not matters(k)}
        env.update(self.env)
        return env


def path_for(pidfile: Path) -> Path:
    return pidfile.with_name(pidfile.name + ".cmd")


def split_urls(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Take ``-b URL`` / ``--result-backend URL`` out of the qops global options in
    ``argv`` (those before the command): (the rest, their environment variables)."""
    out: list[str] = []
    env: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "worker":
            out += argv[i:]
            break
        name, eq, value = arg.partition("=")
        if name in URL_OPTIONS:
            if not eq:
                value = argv[i + 1] if i + 1 < len(argv) else ""
                i += 1
            env[URL_OPTIONS[name]] = value
        else:
            out.append(arg)
        i += 1
    return out, env


def load(path: Path) -> Record | None:
    """The record at ``path``; None when there is none. A record of an older qops (the
    command line alone, URLs in it) is read, its URLs moved to the environment."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(f"cannot read the node record {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UsageError(
                f"the node record {path} belongs to uid {st.st_uid} or is writable by "
                "others: not trusted; remove it and start the node with 'multi start'")
        with os.fdopen(fd, closefd=False) as f:
            data = json.load(f)
    except ValueError:
        return None
    finally:
        os.close(fd)
    if not isinstance(data, dict) or not isinstance(data.get("argv"), list):
        return None
    argv, url_env = split_urls([str(a) for a in data["argv"]])
    env = {str(k): str(v) for k, v in (data.get("env") or {}).items()}
    env.update(url_env)
    return Record(node=str(data.get("node", "")), argv=argv,
                  cwd=str(data.get("cwd") or os.getcwd()), env=env,
                  uid=_int(data.get("uid")), gid=_int(data.get("gid")),
                  pid=_int(data.get("pid")), start_time=_int(data.get("start_time")))


def save(path: Path, record: Record) -> None:
    """Write ``record`` to ``path``, mode 0600, replacing it atomically; UsageError when
    the pidfile's directory does not let us."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data: dict[str, Any] = {"version": VERSION, **asdict(record)}
    try:
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, json.dumps(data, indent=1).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        raise UsageError(f"cannot write the node's record {path} (beside its pidfile): "
                         f"{exc.strerror}") from None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
