"""The peers' own virtualenvs for the benchmarks (Celery, Dramatiq, ...), and one with
qops installed as a user installs it (``qops_python``: for the start-up measures).

``ensure_venv(path, requirements, imports)`` returns the venv's interpreter, after
creating the venv (``python -m venv``) and installing ``requirements`` with pip when the
interpreter is missing or cannot import ``imports``. Installing needs PyPI. Progress goes
to stderr. The venvs live under bench/ (``bench/.celery-venv``, ``bench/.dramatiq-venv``,
``bench/.qops-venv``) and are listed in .gitignore.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent
CELERY_VENV = BENCH / ".celery-venv"
CELERY_REQUIREMENTS = ["celery[redis]>=5.3"]  # the extra brings redis and packaging
CELERY_IMPORTS = ["celery", "redis", "kombu.transport.redis", "amqp"]
DRAMATIQ_VENV = BENCH / ".dramatiq-venv"
DRAMATIQ_REQUIREMENTS = ["dramatiq[redis,rabbitmq]>=2"]  # redis-py and pika
DRAMATIQ_IMPORTS = ["dramatiq", "redis", "pika", "dramatiq.results.backends.redis"]
QOPS_VENV = BENCH / ".qops-venv"
QOPS_IMPORTS = ["qops", "typer", "rich", "redis", "pika", "yaml"]


def ensure_venv(venv: Path, requirements: list[str], imports: list[str]) -> Path:
    """The venv's python, created and filled with ``requirements`` if it can't import
    ``imports`` yet."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import " + ", ".join(imports)]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    _create(venv)
    print(f"installing {' '.join(requirements)} into {venv} ...", file=sys.stderr, flush=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", *requirements], check=True, timeout=900)
    subprocess.run(check, check=True)
    return python


def _create(venv: Path) -> Path:
    """``venv`` made with this interpreter's ``venv`` module if missing; its python."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating the venv {venv} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    return python


def celery_python(venv: Path = CELERY_VENV) -> Path:
    return ensure_venv(venv, CELERY_REQUIREMENTS, CELERY_IMPORTS)


def dramatiq_python(venv: Path = DRAMATIQ_VENV) -> Path:
    return ensure_venv(venv, DRAMATIQ_REQUIREMENTS, DRAMATIQ_IMPORTS)


def qops_python(source: Path, venv: Path = QOPS_VENV) -> Path:
    """A venv with the qops of ``source`` (a checkout) installed the way a user installs
    it: ``pip install`` of a copy of its package files, not editable, so it starts as an
    installed qops starts (a development checkout's editable install imports
    setuptools' path finder, and with it pathlib, re and urllib, at every interpreter
    start: about 28 ms of every command on this machine, which the installed peers
    don't pay). Installed again at every call (the source may have changed); its
    dependencies come from PyPI the first time."""
    python = _create(venv)
    check = [str(python), "-c", "import " + ", ".join(QOPS_IMPORTS[1:])]
    has_deps = subprocess.run(check, capture_output=True).returncode == 0
    print(f"installing qops from {source} into {venv} ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="qops-install-") as tmp:
        tree = Path(tmp) / "qops-src"
        shutil.copytree(source / "qops", tree / "qops",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(source / name, tree / name)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                        "--disable-pip-version-check", "--force-reinstall",
                        *([] if not has_deps else ["--no-deps"]), str(tree)],
                       check=True, timeout=900)
    subprocess.run([str(python), "-c", "import " + ", ".join(QOPS_IMPORTS)], check=True)
    return python
