"""A real Prometheus server (Debian's ``prometheus``) scrapes ``qops exporter`` and
answers a query through its HTTP API; it loads the alert rules too."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from qops import App
from tests.conftest import IN_CI
from tests.helpers import ROOT, stop_group, wait_until
from tests.monitor.helpers import ExporterProcess, free_port

pytestmark = pytest.mark.slow


def need_prometheus() -> str:
    exe = shutil.which("prometheus")
    if exe is None:
        msg = "prometheus is not installed: apt-get install -y prometheus (.ci/services does with CI=true)"
        if IN_CI:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return exe


def query(port: int, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            doc = json.load(r)
    except OSError:
        return []
    return list(doc["data"]["result"]) if doc.get("status") == "success" else []


def test_prometheus_scrapes_the_exporter(sqlite_url: str, queue_name: str,
                                         tmp_path: Path) -> None:
    exe = need_prometheus()
    app = App("proj", broker=sqlite_url)
    for i in range(5):
        app.send_task("proj.tasks.add", args=[i, i], queue=queue_name)
    app.close()
    with ExporterProcess(sqlite_url, "-Q", queue_name) as exp:
        port = free_port()
        shutil.copy(ROOT / "contrib" / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
        (tmp_path / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "rule_files: [alerts.yml]\n"
            "scrape_configs:\n  - job_name: qops\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{exp.port}']\n")
        log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [exe, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, cwd=str(tmp_path), start_new_session=True)
        try:
            expr = f'qops_queue_ready_messages{{queue="{queue_name}"}}'
            assert wait_until(lambda: [r["value"][1] for r in query(port, expr)] == ["5"],
                              60, interval=0.5), (tmp_path / "prometheus.log").read_text()
            up = query(port, 'up{job="qops"}')
            assert [r["value"][1] for r in up] == ["1"]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules",
                                        timeout=5) as r:
                rules = json.load(r)["data"]["groups"]
            assert [g["name"] for g in rules] == ["qops"]
        finally:
            stop_group(proc)
            log.close()
