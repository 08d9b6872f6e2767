"""Results under at-least-once delivery (issue item 8), through a real worker.

The backends' own contract (tests/contract/test_backend.py) checks the rules one call
at a time; here a task really runs twice (its message delivered twice, as after a
crash before the ack) and the first SUCCESS is the one that stays, until
``result_expires`` removes it.
"""

from __future__ import annotations

from qops import protocol
from tests.faults.conftest import runs
from tests.helpers import wait_until


def test_first_success_stays_and_results_expire(app, broker, workers, queue, tmp_path):
    path = tmp_path / "runs.txt"
    message = protocol.build_task_message("proj.tasks.record", [str(path)])
    task_id = message.headers["id"]
    app.transport.publish(queue, message)
    app.transport.publish(queue, message)  # the same task delivered twice
    workers.start("w", "-Q", queue, "-P", "solo", QOPS_RESULT_EXPIRES="3")
    assert wait_until(lambda: runs(path)[task_id] == 2, timeout=30)
    # the second run returned 2; the first run's SUCCESS (1) was not overwritten
    assert app.AsyncResult(task_id).get(timeout=5) == 1
    assert wait_until(lambda: app.AsyncResult(task_id).state == "PENDING", timeout=10)
