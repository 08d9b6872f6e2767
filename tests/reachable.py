"""A Python environment another user can reach, for tests that drop privileges.

A test running as root may start qops as another user (``multi --uid nobody``,
supervisor's ``user=``). The checkout and its venv may sit where that user cannot go
(``/root/qops``, a ``mktemp -d`` folder: mode 0700), and so may the venv's interpreter
(e.g. under ``/root/.pyenv``): the dropped process could not start Python, nor import
qops, its dependencies or the example app. ``ReachablePython`` makes a world-readable
copy of exactly those (the ``qops`` package, ``examples/proj`` and the installed
distributions qops requires, transitively) and finds an interpreter of this Python
version that the user may run. The copy is what the dropped process imports, whether or
not the checkout would have been reachable, so the tests behave the same everywhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers import EXAMPLES, ROOT

#: what a dropped qops process imports: the CLI, the worker and the example app
PROBE = "import qops.cli.root, qops.worker, proj.qops"


@dataclass
class ReachablePython:
    """``python`` (an interpreter) with ``path`` (for PYTHONPATH) runs qops as ``user``."""

    python: str
    path: str
    user: str

    def env(self, base: dict[str, str], **extra: str) -> dict[str, str]:
        """``base`` with PYTHONPATH the reachable copy only (not the checkout)."""
        env = dict(base, PYTHONPATH=self.path)
        env.update(extra)
        return env


def requirement_closure(name: str = "qops") -> list[metadata.Distribution]:
    """The installed distribution ``name`` and those it requires, transitively (the
    requirements whose markers hold here, without extras)."""
    found: dict[str, metadata.Distribution] = {}
    todo = [name]
    while todo:
        key = canonicalize_name(todo.pop())
        if key in found:
            continue
        try:
            dist = metadata.distribution(key)
        except metadata.PackageNotFoundError:
            continue  # an optional one this environment lacks: qops does without it
        found[key] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(found.values())


def copy_importables(dest: Path) -> None:
    """Copy qops, the example app and qops's installed requirements to ``dest``."""
    shutil.copytree(ROOT / "qops", dest / "qops")  # installed editable: its source
    shutil.copytree(EXAMPLES / "proj", dest / "proj")
    for dist in requirement_closure():
        if canonicalize_name(dist.metadata["Name"]) == "qops":
            continue
        for file in dist.files or []:
            if file.parts[0] == ".." or file.parts[0].startswith("__editable__"):
                continue  # scripts in bin/, an editable install's finder
            source = Path(str(file.locate()))
            if source.is_file():
                target = dest / file
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
    for folder, _dirs, files in os.walk(dest):
        os.chmod(folder, 0o755)
        for f in files:
            os.chmod(os.path.join(folder, f), 0o644)


def candidates() -> list[str]:
    """Interpreters of this Python version, this one's base first."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    found = [getattr(sys, "_base_executable", ""), os.path.realpath(sys.executable),
             f"/usr/bin/{version}", f"/usr/local/bin/{version}", shutil.which(version) or ""]
    return [p for i, p in enumerate(found) if p and os.path.exists(p) and p not in found[:i]]


def reachable_python(user: str, dest: Path) -> ReachablePython | str:
    """Copy what qops needs into ``dest`` (made readable by all) and find an interpreter
    that ``user`` may run with it; a message saying why not when there is none."""
    copy_importables(dest)
    tried = []
    for python in candidates():
        try:
            probe = subprocess.run([python, "-c", PROBE], user=user, cwd="/",
                                   env={"PYTHONPATH": str(dest), "HOME": "/",
                                        "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                                   capture_output=True, text=True, timeout=60)
        except PermissionError as exc:
            tried.append(f"{python}: {exc}")
            continue
        if probe.returncode == 0:
            return ReachablePython(python, str(dest), user)
        tried.append(f"{python}: {probe.stderr.strip().splitlines()[-1:]}")
    return (f"no Python {sys.version_info.major}.{sys.version_info.minor} that user {user} "
            f"may run with qops importable from {dest}; tried: " + "; ".join(tried))


def make_folder(prefix: str) -> Path:
    """A fresh folder under the system's temporary directory that every user may enter
    (pytest's tmp_path is under a folder private to the user running the tests)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o755)
    return folder
