"""The SQLite URL (broker and result backend): ``sqlite:///absolute/path/to/broker.db``.

Kept apart from the transport so that the URL is checked, and the file's directory
looked at, before anything is created: a typo in the path must not leave a new
directory tree behind. Only the default file's directory (the per-user state dir) is
created when it is missing.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

from qops.errors import UsageError
from qops.transports.urls import url_error


def path_from_url(url: str, what: str = "broker URL") -> Path:
    """``sqlite:///abs/path.db`` (``sqlite:////abs/path.db``, SQLAlchemy's spelling of an
    absolute path, too) -> Path. Anything else is a one-line UsageError."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "sqlite" or not url.split(":", 1)[1].startswith("//"):
        raise url_error(url, what, "not a SQLite URL", "sqlite")
    if parts.netloc:
        raw = unquote(parts.netloc + parts.path)
        guess = Path(raw).absolute()
        raise url_error(url, what, "the path must be absolute, after three slashes "
                        f"(for {raw!r} here: sqlite://{guess})", "sqlite")
    raw = unquote(parts.path)
    while raw.startswith("//"):
        raw = raw[1:]
    if not raw or raw == "/":
        raise url_error(url, what, "it names no file", "sqlite")
    if raw.endswith("/"):
        raise url_error(url, what, "it names a directory, not a file", "sqlite")
    return Path(raw)


def check_directory(path: Path, what: str = "SQLite broker") -> None:
    """Make sure ``path``'s directory is there, creating it only when it is the default
    state dir; a one-line UsageError naming the directory otherwise."""
    from qops.settings import default_state_dir

    parent = path.parent
    if parent.is_dir():
        return
    if parent == default_state_dir().absolute():
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return
    if parent.exists():
        raise UsageError(f"{what} {path}: {parent} is not a directory")
    missing = parent
    while not missing.parent.exists() and missing.parent != missing:
        missing = missing.parent
    raise UsageError(f"{what} {path}: directory {missing} does not exist; create it "
                     f"(mkdir -p {parent}) or fix the URL")


def describe_open_error(path: Path, exc: BaseException) -> str:
    """Why ``path`` could not be opened, naming the path and what to check."""
    text = " ".join(str(exc).split())
    if path.exists() and not os.access(path, os.W_OK):
        return f"{path} is read-only ({text}): qops needs to write to it"
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return (f"directory {path.parent} is not writable ({text}): SQLite needs to "
                "create the file and its -wal and -shm files there")
    return text
