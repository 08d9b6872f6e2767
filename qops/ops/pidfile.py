"""Pidfiles that can't lie: the pid alone on one line (as Celery writes it, so ``kill
$(cat w1.pid)``, systemd ``PIDFile=``, monit and start-stop-daemon read it), and the
running process holds an ``flock`` on the file for as long as it lives.

- locked  -> the node runs (the lock dies with the process, however it died);
- not locked -> stale, whatever pid it names: it is replaced;
- a pid whose start time differs from the one recorded for it is another process:
  never signalled. ``qops multi`` keeps that start time in the node's record beside
  the pidfile (``qops/ops/record.py``); pidfiles of older qops versions carried it on a
  second line, which is still read (and the file rewritten with the pid alone).
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from qops.errors import PidfileLocked, UsageError


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its ')'
    fields = data[data.rindex(b")") + 2:].split()
    return int(fields[19])  # field 22 overall


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs. A zombie counts as dead: a daemon's parent is init,
    which may take its time to reap it."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2:data.rindex(b")") + 3] != b"Z"
    except (OSError, ValueError):
        return True


@dataclass
class PidInfo:
    pid: int
    start_time: int | None
    locked: bool

    @property
    def running(self) -> bool:
        """The very process that wrote the file still runs and holds the lock."""
        return self.locked and pid_alive(self.pid) and (
            self.start_time is None or process_start_time(self.pid) == self.start_time)

    @property
    def foreign(self) -> bool:
        """The pid is alive but is not the process that wrote the file."""
        return pid_alive(self.pid) and self.start_time is not None and \
            process_start_time(self.pid) != self.start_time


def read(path: str | Path) -> PidInfo | None:
    """What the pidfile says, and whether a live process holds its lock."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:  # a directory, a path through a file, no permission
        raise UsageError(f"cannot read pidfile {path}: {exc.strerror}") from None
    try:
        text = os.read(fd, 256).decode(errors="replace").split()
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            locked = False
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            locked = True
    finally:
        os.close(fd)
    try:
        pid = int(text[0])
    except (IndexError, ValueError):
        return PidInfo(0, None, locked)
    start = int(text[1]) if len(text) > 1 and text[1].isdigit() else None
    return PidInfo(pid, start, locked)


def rewrite_one_line(path: str | Path, pid: int) -> None:
    """Write ``pid`` alone into an existing pidfile (an older qops's two-line file), in
    place: the running node's lock is on the file, which stays the same file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        data = f"{pid}\n".encode()
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


class Pidfile:
    """``acquire()`` in the process that is the node; the lock lives as long as it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.fd: int | None = None
        self.replaced: PidInfo | None = None  # the stale file we replaced, if any

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise UsageError(f"cannot open pidfile {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            info = read(self.path)
            who = f"pid {info.pid}" if info and info.pid else "another process"
            raise PidfileLocked(f"pidfile {self.path} is held by {who}: the node is already "
                                "running (stop it first)") from None
        old = os.read(fd, 256).decode(errors="replace").split()
        if old and old[0].isdigit():
            self.replaced = PidInfo(int(old[0]), int(old[1]) if len(old) > 1 and
                                    old[1].isdigit() else None, False)
        pid = os.getpid()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{pid}\n".encode())
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None
