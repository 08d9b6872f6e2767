"""A worker frozen past its heartbeat TTL does not run what was taken back (issue 13).

The whole worker is stopped (SIGSTOP to its process group: a VM pause, a suspended
laptop) while it runs one long task and holds more in its prefetch. Another worker takes
the held messages back and runs them, as designed:

- Redis and SQLite: after ``worker_heartbeat_ttl`` (the frozen consumer's alive key /
  ``alive_until`` ran out). On waking, the frozen worker checks in before it starts
  anything (its lease is overdue), finds its registration gone, and drops every copy
  it had not started; its acks of them are never sent.
- RabbitMQ: when the broker closes the connection that missed its AMQP heartbeats
  (``?heartbeat=2`` here; the default of 60 s takes minutes). On waking, the worker
  finds its connection gone and its deliveries stale.

Each held task runs exactly once. The task that was running when the worker froze runs
twice (at least once: it was not finished when the other node took it back).
"""

from __future__ import annotations

import os
import signal
import time

from tests.faults.conftest import runs, use
from tests.helpers import wait_until

HELD = 4


def test_frozen_worker_does_not_run_what_was_taken_back(app, broker, workers, queue,
                                                         tmp_path):
    import proj.tasks

    record = proj.tasks.record
    path = tmp_path / "runs.txt"
    url = broker.url + ("&heartbeat=2" if broker.kind == "amqp" else "")
    use(app, url, broker.backend)
    # prefetch 1 x 5: the long task and the HELD others, all in a's hands
    a = workers.start("a", "-Q", queue, "-c", "1", broker_url=url,
                      QOPS_WORKER_PREFETCH_MULTIPLIER=str(HELD + 1))
    workers.wait_ready(a)
    long = record.apply_async((str(path), 6.0), {"first_only": True}, queue=queue)
    assert wait_until(lambda: runs(path)[long.id] == 1, timeout=20), workers.log(a)
    held = [record.apply_async((str(path),), queue=queue) for _ in range(HELD)]
    assert wait_until(lambda: app.transport.queue_stats([queue])[0].ready == 0, timeout=10)
    time.sleep(0.3)  # in a's pool queue by now
    b = workers.start("b", "-Q", queue, "-c", "1", broker_url=url)
    workers.wait_ready(b)

    os.killpg(a.pid, signal.SIGSTOP)
    frozen = time.monotonic()
    try:
        taken = wait_until(lambda: all(runs(path)[r.id] == 1 for r in held) and
                           runs(path)[long.id] == 2, timeout=60)
    finally:
        os.killpg(a.pid, signal.SIGCONT)
    print(f"\n{broker.kind}: b ran what frozen a held; a slept "
          f"{time.monotonic() - frozen:.1f}s")
    assert taken, workers.log(b)

    # a wakes: its long task (6 s, mostly slept through) ends; then it must not run
    # its copies of the held ones
    assert wait_until(lambda: "proj.tasks.record[" + long.id + "] succeeded" in workers.log(a)
                      or "not run" in workers.log(a), timeout=20), workers.log(a)
    time.sleep(2.0)
    counts = runs(path)
    assert [counts[r.id] for r in held] == [1] * HELD, (counts, workers.log(a))
    assert counts[long.id] == 2
    assert a.proc is not None and a.proc.poll() is None

    # a goes on working (a new epoch); nothing is left queued or reserved
    b.stop()
    again = record.apply_async((str(path),), queue=queue)
    assert again.get(timeout=20) == 1, workers.log(a)
    assert wait_until(lambda: (app.transport.queue_stats([queue])[0].ready,
                               app.transport.queue_stats([queue])[0].in_flight) == (0, 0),
                      timeout=10), app.transport.queue_stats([queue])
    assert runs(path)[again.id] == 1
