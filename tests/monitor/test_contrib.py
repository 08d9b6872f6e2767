"""contrib/: the Grafana dashboard names only metrics the exporter serves; the alert
rules pass ``promtool check rules``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from qops.monitor.exporter import FAMILIES
from tests.helpers import ROOT

DASHBOARD = ROOT / "contrib" / "grafana" / "qops.json"
RULES = ROOT / "contrib" / "prometheus" / "alerts.yml"


def exported() -> set[str]:
    names = set()
    for name, (kind, _) in FAMILIES.items():
        names |= {f"{name}_{s}" for s in ("bucket", "sum", "count")} if kind == "histogram" \
            else {name}
    return names


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bqops_[a-z_]+\b", expr))


def test_dashboard_names_only_exported_metrics() -> None:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    used = set().union(*(metric_names(e) for e in exprs))
    assert used, "the dashboard queries no metric"
    assert used <= exported(), used - exported()
    # the families the issue names are all on the dashboard
    assert {"qops_workers_online", "qops_worker_up", "qops_queue_ready_messages",
            "qops_tasks_total", "qops_task_runtime_seconds_bucket",
            "qops_task_queue_wait_seconds_bucket", "qops_dead_letter_messages"} <= used


def test_rules_name_only_exported_metrics() -> None:
    used = metric_names(RULES.read_text())
    assert used and used <= exported(), used - exported()


def test_promtool_check_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus): rules unchecked")
    out = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 6 rules found" in out.stdout
