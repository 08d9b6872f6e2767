"""The peers' own virtualenvs for the benchmarks (Celery, Dramatiq, ...).

``ensure_venv(path, requirements, imports)`` returns the venv's interpreter, after
creating the venv (``python -m venv``) and installing ``requirements`` with pip when the
interpreter is missing or cannot import ``imports``. Installing needs PyPI. Progress goes
to stderr. The venvs live under bench/ (``bench/.celery-venv``, ``bench/.dramatiq-venv``)
and are listed in .gitignore.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent
CELERY_VENV = BENCH / ".celery-venv"
CELERY_REQUIREMENTS = ["celery[redis]>=5.3"]  # the extra brings redis and packaging
CELERY_IMPORTS = ["celery", "redis", "kombu.transport.redis", "amqp"]
DRAMATIQ_VENV = BENCH / ".dramatiq-venv"
DRAMATIQ_REQUIREMENTS = ["dramatiq[redis,rabbitmq]>=2"]  # redis-py and pika
DRAMATIQ_IMPORTS = ["dramatiq", "redis", "pika", "dramatiq.results.backends.redis"]


def ensure_venv(venv: Path, requirements: list[str], imports: list[str]) -> Path:
    """The venv's python, created and filled with ``requirements`` if it can't import
    ``imports`` yet."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import " + ", ".join(imports)]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    if not python.exists():
        print(f"creating the venv {venv} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    print(f"installing {' '.join(requirements)} into {venv} ...", file=sys.stderr, flush=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", *requirements], check=True, timeout=900)
    subprocess.run(check, check=True)
    return python


def celery_python(venv: Path = CELERY_VENV) -> Path:
    return ensure_venv(venv, CELERY_REQUIREMENTS, CELERY_IMPORTS)


def dramatiq_python(venv: Path = DRAMATIQ_VENV) -> Path:
    return ensure_venv(venv, DRAMATIQ_REQUIREMENTS, DRAMATIQ_IMPORTS)
