"""``qops --help`` does not import the exporter's library or rich's live display."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT, qops_env

PROBE = ("import atexit, sys\n"
         "atexit.register(lambda: print('LOADED', sorted(m for m in sys.modules if m.startswith("
         "('prometheus_client', 'rich.live', 'qops.monitor'))), file=sys.stderr))\n"
         "from qops.cli.main import main\n"
         "sys.argv = ['qops', *sys.argv[1:]]\n"
         "main()\n")


def loaded(*args: str) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True,
                         text=True, env=qops_env(), cwd=str(ROOT), timeout=60)
    return next(line for line in out.stderr.splitlines() if line.startswith("LOADED"))


def test_help_imports_no_monitoring() -> None:
    assert loaded("--help") == "LOADED []"
    assert loaded("top", "--help") == "LOADED []"
    assert loaded("exporter", "--help") == "LOADED []"
