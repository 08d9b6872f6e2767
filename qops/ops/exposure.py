"""Start-time checks of the files a node trusts (docs/security.md, "Safe defaults").

A config file, a key file or a pidfile directory that any local user may change is a
way in: a planted ``broker_url`` or ``imports``, a swapped key, a pidfile pointing
``multi stop`` at another process. The worker, ``multi start`` and beat warn about
each such path when they start (a warning, not a refusal: the operator decides).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def _world_writable(path: Path) -> str | None:
    try:
        st = path.stat()
    except OSError:
        return None
    if not st.st_mode & stat.S_IWOTH:
        return None
    kind = "directory" if stat.S_ISDIR(st.st_mode) else "file"
    sticky = " (sticky: others can't replace its files, but can create names in it)" \
        if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX else ""
    return f"{kind} {path} is writable by every user (mode {stat.S_IMODE(st.st_mode):04o}){sticky}"


def warnings(app: Any, pidfiles: Iterable[str | os.PathLike[str] | None] = ()) -> list[str]:
    """One line per world-writable config file, key file, or directory of those files
    and of ``pidfiles``."""
    from qops.settings import find_config_file

    files: list[tuple[str, Path]] = []
    try:
        config = find_config_file()
    except Exception:
        config = None
    if config is not None:
        files.append(("config", config))
    for setting in ("control_key_file", "task_key_file"):
        value = app.conf.get(setting)
        if value:
            files.append(("key", Path(str(value))))
    out: list[str] = []
    seen: set[Path] = set()
    for what, path in files:
        for p in (path, path.absolute().parent):
            if p in seen:
                continue
            seen.add(p)
            problem = _world_writable(p)
            if problem:
                out.append(f"{what} {problem}: anyone on this host could change it; "
                           "chmod o-w it")
    for pidfile in pidfiles:
        if pidfile is None:
            continue
        d = Path(pidfile).absolute().parent
        if d in seen:
            continue
        seen.add(d)
        problem = _world_writable(d)
        if problem:
            out.append(f"pidfile {problem}: use a directory of the node's own (e.g. "
                       "/run/qops)")
    return out
