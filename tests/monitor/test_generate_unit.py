"""``qops generate systemd --exporter HOST:PORT`` writes the exporter's unit."""

from __future__ import annotations

import subprocess
from pathlib import Path

from qops.ops import deploy
from tests.helpers import run_qops
from tests.ops.test_generate import need_tool


def test_exporter_unit(tmp_path: Path) -> None:
    out = tmp_path / "units"
    r = run_qops("-A", "proj", "generate", "systemd", "w1", "--exporter", "127.0.0.1:9808",
                 "--workdir", str(tmp_path), "-o", str(out))
    assert r.returncode == 0, r.stderr
    unit = (out / deploy.EXPORTER_UNIT).read_text()
    start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert start.endswith(" -A proj exporter --bind 127.0.0.1 --port 9808")
    assert "qops-exporter.service" in (out / deploy.TARGET).read_text()
    analyze = need_tool("systemd-analyze")
    r2 = subprocess.run([analyze, "verify", "--man=no", str(out / deploy.EXPORTER_UNIT)],
                        capture_output=True, text=True, timeout=60, cwd=str(out))
    assert r2.returncode == 0 and not (r2.stdout + r2.stderr).strip(), r2.stdout + r2.stderr


def test_exporter_unit_is_off_by_default_and_checked(tmp_path: Path) -> None:
    r = run_qops("generate", "systemd", "--workdir", str(tmp_path), "--json")
    assert r.returncode == 0 and deploy.EXPORTER_UNIT not in r.stdout
    r = run_qops("generate", "systemd", "--exporter", "9808", "--workdir", str(tmp_path))
    assert r.returncode == 2 and "HOST:PORT" in r.stderr
