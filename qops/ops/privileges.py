"""The root guard (docs/commands.md, exit code 77): workers, beat and ``multi start`` refuse to run as root.

Running task code as root turns any bug in a task -- or any message an attacker can put
on the broker -- into root on the host. The guard is checked before anything forks.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

from qops.errors import PrivilegeError

TRUE = ("1", "true", "yes")


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() in TRUE


def force_root(environ: Mapping[str, str] | None = None) -> bool:
    """True when QOPS_FORCE_ROOT (or Celery's C_FORCE_ROOT) is 1/true/yes."""
    env = os.environ if environ is None else environ
    if _flag(env, "QOPS_FORCE_ROOT"):
        return True
    if _flag(env, "C_FORCE_ROOT"):
        print("qops: warning: C_FORCE_ROOT is deprecated; set QOPS_FORCE_ROOT=1 instead",
              file=sys.stderr)
        return True
    return False


def check_root(*, accept_content: Sequence[str] = ("json",), uid: int | None = None,
               environ: Mapping[str, str] | None = None) -> None:
    """Raise PrivilegeError (exit 77) when running as root without a way out.

    ``uid`` is the (resolved) --uid the process will drop to before any task runs."""
    if os.getuid() != 0 and os.geteuid() != 0:
        return
    if uid is not None and uid != 0:
        return  # privileges are dropped to --uid before any task runs
    pickle = any("pickle" in str(c) for c in accept_content)
    if pickle:
        raise PrivilegeError(
            "refusing to run as root while pickle is accepted (a message could run any "
            "code as root): drop privileges with --uid, or accept only json")
    if force_root(environ):
        return
    raise PrivilegeError(
        "refusing to run as root: task code would run with root privileges. "
        "Drop privileges with --uid/--gid, run it as another user, or set "
        "QOPS_FORCE_ROOT=1 if you accept the risk")
