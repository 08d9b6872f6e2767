"""Becoming a daemon, dropping privileges, and the signals an operator sends.

``detach()`` double-forks: the first child calls setsid (a new session, so no terminal
can ever be acquired and a logout's SIGHUP doesn't reach it), the second is the daemon
(not a session leader). The original process does not exit at once: it waits on a pipe
until the daemon reports that it runs (or why it could not start), so its exit code --
what a shell script or ``multi start`` sees -- tells the truth.
"""

from __future__ import annotations

import faulthandler
import grp
import logging
import os
import pwd
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from qops.errors import EX_FAILURE, PidfileLocked, PrivilegeError, UsageError
from qops.values import file_name

log = logging.getLogger("qops")


class Readiness:
    """The daemon's side of the pipe to the waiting parent."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def _send(self, text: str) -> None:
        if self.fd is None:
            return
        try:
            # one line: pool children forked before this hold copies of the pipe, so
            # the parent reads up to the newline instead of waiting for end-of-file
            os.write(self.fd, text.replace("\n", " ").encode()[:4000] + b"\n")
            os.close(self.fd)
        except OSError:
            pass
        self.fd = None

    def ready(self) -> None:
        self._send("OK")
        sd_notify("READY=1\nSTATUS=running")

    def failed(self, message: str, code: int = EX_FAILURE) -> None:
        self._send(f"ERR {code} {message}")


def sd_notify(state: str) -> bool:
    """Tell systemd (``Type=notify`` units) about our state; no-op outside systemd."""
    import socket

    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(state.encode())
        return True
    except OSError:
        return False


def detach(*, workdir: str | None = None, umask: int | None = None,
           timeout: float = 60.0) -> Readiness:
    """Fork into the background. Returns (in the daemon) the Readiness to report to.

    The calling process never returns: it exits 0 once the daemon reports ready, or 1
    with the daemon's message (or after ``timeout`` seconds of silence)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid > 0:  # the original process: wait for the verdict
        os.close(w)
        _wait_for_daemon(r, timeout)
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)  # the session leader goes; the daemon can't regain a terminal
    if workdir:
        os.chdir(workdir)
    if umask is not None:
        os.umask(umask)
    _redirect_stdio()
    return Readiness(w)


def _wait_for_daemon(fd: int, timeout: float) -> None:
    import select

    data = b""
    deadline = time.monotonic() + timeout
    ready = False
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        ready = True
        chunk = os.read(fd, 4096)
        if not chunk:
            break  # the daemon died without a word
        data += chunk
    text = data.decode(errors="replace").strip()
    if text == "OK":
        os._exit(0)
    code = EX_FAILURE
    if text.startswith("ERR "):
        _, raw_code, message = text.split(" ", 2)
        code = int(raw_code) if raw_code.isdigit() else EX_FAILURE
    else:
        message = ("the daemon exited before it was ready (see its log file)" if ready else
                   f"the daemon did not report ready within {timeout:.0f}s "
                   "(see its log file)")
    print(f"qops: error: {message}", file=sys.stderr, flush=True)
    os._exit(code)


def _redirect_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def parse_umask(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value, 8)
    except ValueError:
        raise UsageError(f"--umask {value!r} is not an octal number (e.g. 022)") from None


def resolve_ids(uid: str | None, gid: str | None) -> tuple[int | None, int | None, str | None]:
    """(uid, gid, user name) from names or numbers; gid defaults to the user's group."""
    user_name = None
    uid_n = gid_n = None
    if uid is not None:
        try:
            entry = pwd.getpwuid(int(uid)) if uid.isdigit() else pwd.getpwnam(uid)
        except (KeyError, ValueError):
            raise UsageError(f"--uid {uid!r}: no such user") from None
        uid_n, user_name = entry.pw_uid, entry.pw_name
        gid_n = entry.pw_gid
    if gid is not None:
        try:
            gid_n = int(gid) if gid.isdigit() else grp.getgrnam(gid).gr_gid
        except KeyError:
            raise UsageError(f"--gid {gid!r}: no such group") from None
    return uid_n, gid_n, user_name


def drop_privileges(uid: int | None, gid: int | None, user_name: str | None) -> None:
    """setgid, initgroups, setuid -- in that order (after setuid we could no longer
    change groups) -- then prove that root can't be regained."""
    if gid is not None:
        os.setgid(gid)
        if user_name is not None:
            os.initgroups(user_name, gid)
        else:
            os.setgroups([gid])
    if uid is not None:
        os.setuid(uid)
        if uid != 0:
            try:
                os.setuid(0)
            except PermissionError:
                pass
            else:
                raise PrivilegeError("dropped privileges but could regain root: refusing to run")
        home = pwd.getpwuid(uid).pw_dir
        os.environ["HOME"] = home  # the default SQLite broker lives under the user's home
        os.environ["USER"] = os.environ["LOGNAME"] = user_name or str(uid)


def reopen_log_files() -> None:
    """Reopen every file the root logger writes to (after logrotate moved it)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                if handler.stream:
                    handler.stream.close()
                handler.stream = handler._open()
            finally:
                handler.release()


def install_operator_signals(reopen_logs: Callable[[], None] = reopen_log_files,
                             children: Callable[[], Iterable[int]] = tuple) -> None:
    """HUP reopens log files (for logrotate), and is passed on to ``children()`` (the pool
    processes, which reopen theirs); USR1 dumps every thread's stack to the log."""

    def on_hup(signum: int, frame: object) -> None:
        reopen_logs()
        for pid in children():
            if pid != os.getpid():
                try:
                    os.kill(pid, signal.SIGHUP)
                except OSError:
                    pass  # a child that just ended
        log.info("Reopened log files (SIGHUP).")

    def on_usr1(signum: int, frame: object) -> None:
        stream = _log_stream()
        print("qops: thread dump (SIGUSR1):", file=stream, flush=True)
        faulthandler.dump_traceback(file=stream, all_threads=True)

    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGUSR1, on_usr1)


def _log_stream() -> Any:
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        if stream is not None and hasattr(stream, "fileno"):
            return stream
    return sys.stderr


LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def check_level(loglevel: str) -> str:
    level = loglevel.upper()
    if level not in LEVELS:
        raise UsageError(f"unknown log level {loglevel!r}: use one of {', '.join(LEVELS)}")
    return level


def setup_logging(level: str, logfile: str | None, node: str, index: int = 0) -> None:
    """Log to ``logfile`` (templates expanded for ``node`` and pool ``index``) or stderr."""
    from qops.ops.nodes import expand

    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if logfile:
        path = expand(logfile, node, index)
        try:  # a new log file is 0640: task arguments and errors show in it
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             0o640))
        except OSError:
            pass  # there already (its mode is the operator's), or FileHandler says why
        try:
            handler = logging.FileHandler(path, delay=False)
        except OSError as exc:
            raise UsageError(f"cannot open log file {path}: {exc.strerror}") from None
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    if level != "DEBUG":
        # pika logs every dropped connection at ERROR; the transport says it once
        logging.getLogger("pika").setLevel(logging.CRITICAL)


@dataclass
class NodeProcess:
    """How a long-running qops process (worker, beat) runs: in the foreground or as a
    daemon, with a pidfile, a log file and maybe another user."""

    node: str
    loglevel: str = "WARNING"
    logfile: str | None = None
    pidfile: str | None = None
    detach: bool = False
    uid: str | None = None
    gid: str | None = None
    umask: str | None = None
    #: the pool processes' pids, to pass HUP on to (set once the pool exists)
    children: Callable[[], Iterable[int]] = tuple

    def __post_init__(self) -> None:
        from qops.ops.nodes import expand

        file_name(self.logfile, "--logfile")
        file_name(self.pidfile, "--pidfile")
        self.level = check_level(self.loglevel)
        self.mask = parse_umask(self.umask)
        self.uid_n, self.gid_n, self.user = resolve_ids(self.uid, self.gid)
        self.pid_path = expand(self.pidfile, self.node) if self.pidfile else None
        if self.logfile:
            expand(self.logfile, self.node, 1)  # a bad template fails now, not in the daemon

    def check_files(self) -> None:
        """What ``worker --check`` can tell of the files a start opens, leaving none
        behind: the pidfile can be read where it is, the log file opened for appending
        (or created, or its directories made). A node of the same name running is not
        an error here: ``multi restart`` checks a node while it runs."""
        from qops.ops.nodes import expand
        from qops.ops.pidfile import read

        if self.pid_path:
            read(self.pid_path)
        if self.logfile:
            path = expand(self.logfile, self.node)
            try:
                try:
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
                    os.unlink(path)
                except FileExistsError:
                    os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
            except FileNotFoundError:  # directories to make: the nearest one there
                above = os.path.dirname(os.path.abspath(path))
                while not os.path.exists(above):
                    above = os.path.dirname(above)
                if not os.path.isdir(above):
                    raise UsageError(f"cannot create the directory of log file {path}: "
                                     f"{above} is not a directory") from None
            except OSError as exc:
                raise UsageError(f"cannot open log file {path}: {exc.strerror}") from None

    @contextmanager
    def run(self, preload: Callable[[], None] = lambda: None) -> Iterator[Readiness]:
        """Check, detach, drop privileges, lock the pidfile, set up logging; yield the
        Readiness to report to. Errors are reported to a waiting parent and logged."""
        from qops.errors import QopsError
        from qops.ops.nodes import expand
        from qops.ops.pidfile import Pidfile, read

        if self.pid_path:
            info = read(self.pid_path)
            if info is not None and info.locked:  # "already running", said before forking
                raise PidfileLocked(f"pidfile {self.pid_path} is held by pid {info.pid}: the "
                                    "node is already running (stop it first)")
        # Directories for the pidfile and log, made while we may still be root, then
        # handed to the user we drop to.
        for path in filter(None, (self.pid_path,
                                  self.logfile and expand(self.logfile, self.node))):
            make_dirs(os.path.dirname(os.path.abspath(path)), self.uid_n, self.gid_n)
        readiness = detach(umask=self.mask) if self.detach else Readiness(None)
        if not self.detach and self.mask is not None:
            os.umask(self.mask)
        lock = Pidfile(self.pid_path) if self.pid_path else None
        to_file = False  # where errors go: a log file once it is open
        try:
            # Import what will be needed now: after dropping privileges the Python
            # installation itself may no longer be readable (e.g. under /root).
            preload()
            drop_privileges(self.uid_n, self.gid_n, self.user)
            if lock is not None:
                lock.acquire()
            setup_logging(self.level, self.logfile, self.node)
            to_file = bool(self.logfile)
            if lock is not None and lock.replaced is not None:
                log.warning("Replaced a stale pidfile %s (pid %d was not running it).",
                            self.pid_path, lock.replaced.pid)
            install_operator_signals(children=lambda: self.children())
            yield readiness
        # An error is logged when the log is a file; on the terminal the command line
        # says it (qops: error: ...), once.
        except QopsError as exc:
            readiness.failed(str(exc), exc.exit_code)
            if to_file:
                log.error("%s", exc)
            raise
        except Exception as exc:
            readiness.failed(f"{type(exc).__name__}: {exc}")
            if to_file:
                log.exception("failed")
            raise
        finally:
            if lock is not None:
                lock.release()


def make_dirs(directory: str | os.PathLike[str], uid: int | None = None,
              gid: int | None = None) -> None:
    """Create ``directory`` and any missing parents; each one created belongs to
    ``uid``/``gid`` (the user the node drops to, who writes there), not to root."""
    from pathlib import Path

    path = Path(directory).absolute()
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    try:
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:  # nodes starting in parallel race here
                continue
            if uid is not None or gid is not None:
                os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
    except OSError as exc:
        raise UsageError(f"cannot create {path}: {exc.strerror}") from None
