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
    checks: list[tuple[Path, str]] = []  # (path, what to say when others can write it)
    for what, path in files:
        advice = f"{what} {{}}: anyone on this host could change it; chmod o-w it"
        checks += [(path, advice), (path.absolute().parent, advice)]
    checks += [(Path(p).absolute().parent,
                "pidfile {}: use a directory of the node's own (e.g. /run/qops)")
               for p in pidfiles if p is not None]
    out: list[str] = []
    seen: set[Path] = set()
    for path, advice in checks:
        if path in seen:
            continue
        seen.add(path)
        problem = _world_writable(path)
        if problem:
            out.append(advice.format(problem))
    return out
