"""``qops exporter --compat celery`` watching a real Celery 5 worker: its heartbeats and,
once the exporter asked for them (enable_events), its task events."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import wait_until
from tests.interop.test_celery_control import celery_worker  # noqa: F401 - the fixture
from tests.monitor.helpers import ExporterProcess, sample

pytestmark = pytest.mark.slow


def test_exporter_counts_a_celery_worker(celery_worker: tuple[str, str],  # noqa: F811
                                         tmp_path: Path) -> None:
    from celery import Celery

    url, node = celery_worker
    client = Celery("client", broker=url)
    try:
        with ExporterProcess(url, "-Q", "celery", compat="celery") as exp:
            assert exp.wait_for("qops_worker_up", 1, node=node, timeout=30)

            def succeeded() -> float:
                return sample(exp.scrape(), "qops_tasks_total", task="celery_side.mul",
                              state="succeeded") or 0

            # the exporter sends enable_events on seeing the node: tasks sent before it
            # took effect are not seen, so send until one is
            for _ in range(30):
                client.send_task("celery_side.mul", args=[2, 3])
                if exp.wait_for("qops_tasks_total", 1, timeout=1, task="celery_side.mul",
                                state="received") or succeeded():
                    break
            assert wait_until(lambda: succeeded() >= 1, 20)
            before = succeeded()
            for i in range(5):
                client.send_task("celery_side.mul", args=[i, 2])
            assert wait_until(lambda: succeeded() == before + 5, 30), exp.get()[1]
            samples = exp.scrape()
            assert sample(samples, "qops_workers_online") == 1
            assert (sample(samples, "qops_task_runtime_seconds_count",
                           task="celery_side.mul") or 0) >= 5
    finally:
        client.close()
