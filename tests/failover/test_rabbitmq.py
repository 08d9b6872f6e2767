"""A RabbitMQ cluster, for real: three nodes on private ports (servers.py), quorum
queues, the broker URL a list of the three. The node a busy worker is connected to --
also the leader of its quorum queue -- is killed in the middle of 5,000 tasks: every
task runs (ETA tasks held at the kill too), duplicates stay within what was in flight,
the fleet consumes again within seconds on another node, ``status``/``inspect`` keep
answering, one beat keeps sending."""

from __future__ import annotations

import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.failover.fleet import Prober, cli_works, configured_app, count_runs, run_through_failover
from tests.failover.servers import RabbitCluster
from tests.failover.test_sentinel import beat_sends, stop_beats
from tests.helpers import WorkerProcess, qops_env, wait_until

pytestmark = pytest.mark.failover

CONCURRENCY = 4
PREFETCH = 4
QUORUM = {"QOPS_TASK_DEFAULT_QUEUE_TYPE": "quorum",
          "QOPS_TASK_CREATE_MISSING_QUEUE_TYPE": "quorum"}


@pytest.fixture
def app(rabbits: RabbitCluster) -> Iterator[Any]:
    yield from configured_app(broker_url=rabbits.url(), result_backend="rpc://",
                              task_default_queue_type="quorum",
                              task_create_missing_queue_type="quorum")


def test_a_busy_worker_goes_on_when_its_node_dies(app, rabbits, tmp_path: Path) -> None:
    from tests.integration.test_beat import BeatProcess

    url = rabbits.url()
    queue = f"ha-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "runs.txt"
    eta_path = tmp_path / "eta.txt"
    env = qops_env(**QUORUM)
    worker = WorkerProcess("-Q", queue, "-P", "threads", "-c", str(CONCURRENCY),
                           "--prefetch-multiplier", str(PREFETCH), "-l", "WARNING",
                           broker=url, backend="rpc://", env=env, logfile=tmp_path / "w.log")
    tick = {"tick": {"task": "proj.tasks.add", "schedule": 0.5, "args": [1, 2],
                     "options": {"queue": f"{queue}-beat"}}}
    beats = [BeatProcess(url, tick, tmp_path / f"s{i}", tmp_path / f"beat{i}.log")
             for i in range(2)]
    for b in beats:
        b.env.update(QUORUM)
    import proj.tasks

    def send_eta() -> None:  # held by the worker (unacked) when its node dies
        for i in range(20):
            proj.tasks.mark.apply_async((str(eta_path),), queue=queue, countdown=3,
                                        task_id=f"e{i}")

    with worker:
        for b in beats:
            b.start()
        try:
            assert wait_until(lambda: app.transport.live_nodes() == 1, 60), \
                worker.logfile.read_text()  # type: ignore[union-attr]
            assert wait_until(lambda: "standby" in beats[0].log() + beats[1].log(), 30)
            cluster_after: list[int] = []

            def kill() -> None:
                # node1: where round-robin put every connection, and the leader of the
                # quorum queue (declared there first)
                rabbits.kill(0)
                threading.Thread(target=lambda: cluster_after.append(rabbits.running(via=1)),
                                 daemon=True).start()

            in_flight = CONCURRENCY * PREFETCH + CONCURRENCY
            m = run_through_failover(app, queue, path, kill, total=5000, upfront=4000,
                                     kill_after=1000, in_flight_bound=in_flight,
                                     prober=Prober(app), before_kill=send_eta)
            assert wait_until(lambda: all(count_runs(eta_path)[f"e{i}"] for i in range(20)),
                              30)
            # results come back through the broker (rpc://) on the new node too
            assert proj.tasks.add.apply_async((2, 3), queue=queue).get(timeout=20) == 5
            problems = cli_works(url, env)  # the commands themselves, after the failover
            assert not problems, problems
            stop_beats(beats)
            sends = beat_sends(beats)
        finally:
            for b in beats:
                b.stop(signal.SIGKILL)
    log = worker.logfile.read_text()  # type: ignore[union-attr]
    eta_runs = count_runs(eta_path)
    eta_dups = sum(n - 1 for n in eta_runs.values())
    switches = sum(1 for a, b in zip(sends, sends[1:], strict=False) if a[1] != b[1])
    span = sends[-1][0] - sends[0][0]
    print("\n" + m.summary("RabbitMQ 3-node cluster, quorum queue"))
    print("\n".join(m.failures()))
    print(f"ETA tasks held at the kill: 20 ran, duplicates {eta_dups}; beat: {len(sends)} "
          f"sends in {span:.1f}s, {switches} switch(es) of sender; running nodes after "
          f"the kill: {cluster_after}")
    assert m.missing == 0, (m.missing, log[-3000:])
    assert m.duplicates <= in_flight, m.summary("rabbitmq")
    assert eta_dups == 0, eta_runs
    assert m.recovery < 10, (m.summary("rabbitmq"), log[-3000:])
    # status and inspect: a command started at any time after the kill works, but
    # for those started while no broker node answered (within the first seconds)
    assert m.back_after("status") < 10 and m.back_after("inspect") < 10, \
        (m.summary("rabbitmq"), m.failures())
    assert not m.late_failures(10), m.late_failures(10)
    assert switches <= 1, sends
    assert len(sends) <= span / 0.5 + 3, sends
