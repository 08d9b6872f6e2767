"""``qops exporter`` against real brokers and workers: the exposition, parsed with
prometheus_client's parser, shows known counts."""

from __future__ import annotations

import pytest

from qops import App
from tests.helpers import WorkerProcess
from tests.monitor.helpers import ExporterProcess, sample

pytestmark = pytest.mark.slow


def test_counts_queues_workers_and_tasks(real_broker_url: str, queue_name: str,
                                         tmp_path: object) -> None:
    idle, busy = f"{queue_name}-idle", f"{queue_name}-busy"
    app = App("proj", broker=real_broker_url)
    try:
        with ExporterProcess(real_broker_url, "-Q", f"{idle},{busy}") as exp:
            for i in range(10):
                app.send_task("proj.tasks.add", args=[i, i], queue=idle)
            assert exp.wait_for("qops_queue_ready_messages", 10, queue=idle)
            assert sample(exp.scrape(), "qops_queue_consumers", queue=idle) == 0
            with WorkerProcess("-n", f"mon1-{queue_name}@h", "-Q", busy, "-P", "threads",
                               "-c", "4", "-E", broker=real_broker_url):
                node = f"mon1-{queue_name}@h"
                assert exp.wait_for("qops_worker_up", 1, node=node)
                assert exp.wait_for("qops_workers_online", 1)
                for i in range(50):
                    app.send_task("proj.tasks.add", args=[i, 1], queue=busy)
                app.send_task("proj.tasks.fail", queue=busy)
                assert exp.wait_for("qops_tasks_total", 50, task="proj.tasks.add",
                                    state="succeeded"), exp.get()[1]
                assert exp.wait_for("qops_tasks_total", 1, task="proj.tasks.fail",
                                    state="failed")
                samples = exp.scrape()
                assert sample(samples, "qops_tasks_total", task="proj.tasks.add",
                              state="received") == 50
                assert sample(samples, "qops_task_runtime_seconds_count",
                              task="proj.tasks.add") == 50
                assert sample(samples, "qops_task_queue_wait_seconds_count",
                              task="proj.tasks.add") == 50
                assert sample(samples, "qops_queue_ready_messages", queue=idle) == 10
                assert sample(samples, "qops_queue_out_total", queue=busy) == 51
                # a message the worker dead-letters (no such task): its task-rejected, and
                # one more in the store (other tests of this broker may have left some)
                before = app.transport.dead_letter_count()
                assert exp.wait_for("qops_dead_letter_messages", before), exp.get()[1]
                app.send_task("proj.tasks.nope", queue=busy)
                assert exp.wait_for("qops_tasks_total", 1, task="proj.tasks.nope",
                                    state="dead_lettered"), exp.get()[1]
                assert exp.wait_for("qops_dead_letter_messages", before + 1), exp.get()[1]
                assert sample(exp.scrape(), "qops_tasks_total", task="proj.tasks.nope",
                              state="rejected") == 1
            # the worker stopped (worker-offline): down, its counters stay
            assert exp.wait_for("qops_worker_up", 0, node=node)
            samples = exp.scrape()
            assert sample(samples, "qops_workers_online") == 0
            assert sample(samples, "qops_tasks_total", task="proj.tasks.add",
                          state="succeeded") == 50
            assert sample(samples, "qops_exporter_broker_up") == 1
    finally:
        app.close()


def test_healthz_and_unknown_paths(sqlite_url: str) -> None:
    with ExporterProcess(sqlite_url) as exp:
        assert exp.get("/healthz") == (200, "ok\n")
        assert exp.get("/nope")[0] == 404
        assert "qops_exporter_broker_up 1.0" in exp.get()[1]


@pytest.mark.redis
def test_reconnects_when_the_broker_goes_away_and_back(redis_url: str, queue_name: str) -> None:
    from urllib.parse import urlsplit

    from tests.monitor.helpers import free_port
    from tests.monitor.proxy import Proxy

    parts = urlsplit(redis_url)
    port = free_port()
    proxy = Proxy((parts.hostname or "127.0.0.1", parts.port or 6379), port).start()
    url = f"redis://127.0.0.1:{port}{parts.path}"
    app = App("proj", broker=redis_url)
    try:
        with ExporterProcess(url, "-Q", queue_name) as exp:
            assert exp.wait_for("qops_exporter_broker_up", 1)
            proxy.stop()
            assert exp.wait_for("qops_exporter_broker_up", 0)
            assert exp.get("/healthz")[0] == 503
            app.send_task("proj.tasks.add", args=[1, 2], queue=queue_name)
            proxy.start()
            assert exp.wait_for("qops_exporter_broker_up", 1)
            assert exp.wait_for("qops_queue_ready_messages", 1, queue=queue_name)
            # events flow again after the reconnect
            with WorkerProcess("-n", f"re-{queue_name}@h", "-Q", f"{queue_name}-w",
                               "-P", "solo", broker=url):
                assert exp.wait_for("qops_worker_up", 1, node=f"re-{queue_name}@h")
    finally:
        proxy.stop()
        app.close()
