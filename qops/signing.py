"""HMAC signatures for remote control, its replies, and (optionally) task messages.

One shared secret, in a key file (``control_key_file`` / ``QOPS_CONTROL_KEY_FILE``),
proves that a message comes from someone who holds the key (docs/security.md). The
file holds one key a line: the first signs, every one verifies, so a key can be
rolled over without stopping the fleet. The signature travels in one message header
(``qops_auth``), so the body stays Celery's and nodes without a key ignore it.

What is signed: a purpose ("control", "reply", "task"), the sender's name, a
timestamp, a random nonce, a context string (a reply's ticket, a task's name and id)
and the body. Remote control is also checked for freshness (``WINDOW`` seconds either
way, so clocks may differ that much) and replay (a nonce is refused once seen within
the window). Only the standard library: ``hmac``, ``hashlib``, ``secrets``.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import secrets
import stat
import threading
import time
from pathlib import Path
from typing import Any

from qops.errors import ConfigError

#: the message header that carries the signature
HEADER = "qops_auth"
#: seconds a signed control message stays valid, either side of the receiver's clock
WINDOW = 60.0
#: shortest key accepted, in characters
MIN_KEY_LENGTH = 16
VERSION = 1


class SignatureError(Exception):
    """A message that does not carry a valid signature; the text says why."""


def check_key_file_mode(path: Path, st: os.stat_result | None = None) -> str | None:
    """Why ``path`` may not hold a key, or None: it must be a regular file owned by
    this user (or root), with no access for others and no write access for its group
    (0600, or 0640 to a service group)."""
    st = st or path.stat()
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid not in (os.geteuid(), 0):
        return f"is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()}) or root"
    if st.st_mode & 0o027:
        who = "its group could change it" if not st.st_mode & 0o007 else \
            "other users could read or change it"
        return (f"has mode {stat.S_IMODE(st.st_mode):04o}: {who}; chmod 600 it (or 640 "
                "to the service's group)")
    return None


def load_keys(path: str | os.PathLike[str]) -> list[bytes]:
    """The keys in ``path`` (one a line; blank lines and ``#`` comments skipped);
    a one-line ConfigError when the file is missing, open to others or holds no key."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise ConfigError(f"control key file {p}: {exc.strerror or exc}") from None
    try:
        problem = check_key_file_mode(p, os.fstat(fd))
        if problem:
            raise ConfigError(f"control key file {p} {problem}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            text = f.read().decode("utf-8", "replace")
    finally:
        os.close(fd)
    keys = [line.strip().encode() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ConfigError(f"control key file {p} holds no key")
    short = [i + 1 for i, k in enumerate(keys) if len(k) < MIN_KEY_LENGTH]
    if short:
        raise ConfigError(f"control key file {p}: key {short[0]} is shorter than "
                          f"{MIN_KEY_LENGTH} characters (make one: qops generate key)")
    return keys


def new_key() -> str:
    """A fresh random key (64 hex characters)."""
    return secrets.token_hex(32)


def write_key_file(path: Path, group: int | None = None) -> None:
    """Create ``path`` holding a new key, mode 0600 (0640 when ``group`` is given and
    the file is chowned to it); an existing file is left alone."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (new_key() + "\n").encode())
        if group is not None:
            os.fchown(fd, -1, group)
            os.fchmod(fd, 0o640)
    finally:
        os.close(fd)


def _digest(key: bytes, purpose: str, sender: str, ts: str, nonce: str, context: str,
            body: bytes) -> str:
    head = "\n".join((f"qops-v{VERSION}", purpose, sender, ts, nonce, context)).encode()
    return hmac.new(key, head + b"\n" + body, hashlib.sha256).hexdigest()


class Signer:
    """Signs with the first key, verifies with any; remembers the nonces it has seen
    (for ``WINDOW`` seconds) so a copied message is refused (thread-safe)."""

    def __init__(self, keys: list[bytes], sender: str, window: float = WINDOW) -> None:
        if not keys:
            raise ValueError("no key")
        self.keys = keys
        self.sender = sender
        self.window = window
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def sign(self, purpose: str, body: bytes, context: str = "") -> dict[str, Any]:
        """The header value that proves ``body`` was sent by a key holder."""
        ts = f"{time.time():.6f}"
        nonce = secrets.token_hex(16)
        return {"v": VERSION, "sender": self.sender, "ts": ts, "nonce": nonce,
                "sig": _digest(self.keys[0], purpose, self.sender, ts, nonce, context, body)}

    def verify(self, purpose: str, body: bytes, auth: Any, context: str = "", *,
               fresh: bool = True) -> str:
        """The sender of a validly signed ``body``; raises SignatureError saying why
        not. ``fresh``: also refuse a stale or already seen message."""
        if auth is None:
            raise SignatureError("unsigned")
        if not isinstance(auth, dict) or not all(
                isinstance(auth.get(k), str) for k in ("sender", "ts", "nonce", "sig")):
            raise SignatureError("malformed signature header")
        sender, ts, nonce = auth["sender"], auth["ts"], auth["nonce"]
        if not any(hmac.compare_digest(_digest(k, purpose, sender, ts, nonce, context, body),
                                       auth["sig"]) for k in self.keys):
            raise SignatureError("bad signature")
        if fresh:
            try:
                sent = float(ts)
            except ValueError:
                raise SignatureError("malformed timestamp") from None
            now = time.time()
            if abs(now - sent) > self.window:
                when = (f"{now - sent:.0f}s ago" if now > sent
                        else f"{sent - now:.0f}s in the future")
                raise SignatureError(f"stale: signed {when} by this node's clock "
                                     f"(allowed: {self.window:g}s either way)")
            with self._lock:
                self._forget(now)
                if nonce in self._seen:
                    raise SignatureError("replayed (nonce already seen)")
                self._seen[nonce] = sent
        return sender

    def _forget(self, now: float) -> None:
        if len(self._seen) > 64:
            limit = now - 2 * self.window
            for n in [n for n, t in self._seen.items() if t < limit]:
                del self._seen[n]


# -- the keys an app is configured with ----------------------------------------------------

_cache: dict[tuple[str, int, int], list[bytes]] = {}


def _cached_keys(path: str) -> list[bytes]:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"control key file {path}: {exc.strerror or exc}") from None
    tag = (path, st.st_ino, st.st_mtime_ns)
    keys = _cache.get(tag)
    if keys is None:
        keys = _cache[tag] = load_keys(path)
    return keys


@functools.lru_cache(maxsize=1)
def default_sender() -> str:
    """A client's name in its signatures: user@host."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except Exception:
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def control_signer(app: Any, sender: str | None = None) -> Signer | None:
    """The signer for ``app``'s remote control, or None when no key is configured."""
    path = app.conf.control_key_file
    if not path:
        return None
    return Signer(_cached_keys(str(path)), sender or default_sender())


def remote_control_line(app: Any) -> str:
    """"signed (<key file>)" or "unauthenticated", for the worker's banner."""
    path = app.conf.control_key_file
    return f"signed ({path})" if path else "unauthenticated"


def task_signer(app: Any, sender: str | None = None) -> Signer | None:
    """The signer for ``app``'s task messages, or None when ``task_signing`` is off."""
    if not app.conf.task_signing:
        return None
    path = app.conf.task_key_file or app.conf.control_key_file
    if not path:
        raise ConfigError("task_signing is on but no key file is set: set task_key_file "
                          "or control_key_file")
    return Signer(_cached_keys(str(path)), sender or default_sender())


def task_context(headers: dict[str, Any]) -> str:
    """What a task signature binds besides the body: the task's name and id."""
    return f"{headers.get('task')}\n{headers.get('id')}"
