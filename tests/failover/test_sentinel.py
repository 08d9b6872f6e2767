"""Redis under Sentinel, for real: a master, a replica and three Sentinels on private
ports (servers.py). The master a busy worker uses is killed in the middle of 5,000
tasks; every task runs, duplicates stay within what was in flight, the fleet consumes
again within seconds, ``status``/``inspect`` keep answering, one beat keeps sending.
And ``wait_replicas``: a publish, a bulk send or a stored result the replica did not
confirm raises."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.failover.fleet import Prober, cli_works, configured_app, run_through_failover
from tests.failover.servers import SentinelCluster
from tests.helpers import WorkerProcess, qops_env, wait_until

pytestmark = pytest.mark.failover

CONCURRENCY = 4
PREFETCH = 4  # worker_prefetch_multiplier


@pytest.fixture
def app(sentinels: SentinelCluster) -> Iterator[Any]:
    yield from configured_app(broker_url=sentinels.url(), result_backend=sentinels.url())


def test_a_busy_worker_goes_on_when_its_master_dies(app, sentinels, tmp_path: Path) -> None:
    from tests.integration.test_beat import BeatProcess

    url = sentinels.url()
    queue = f"ha-{uuid.uuid4().hex[:8]}"
    beat_queue = f"{queue}-beat"
    path = tmp_path / "runs.txt"
    env = qops_env()
    worker = WorkerProcess("-Q", queue, "-P", "threads", "-c", str(CONCURRENCY),
                           "--prefetch-multiplier", str(PREFETCH), "-l", "WARNING",
                           broker=url, backend=url, env=env, logfile=tmp_path / "w.log")
    tick = {"tick": {"task": "proj.tasks.add", "schedule": 0.5, "args": [1, 2],
                     "options": {"queue": beat_queue}}}
    beats = [BeatProcess(url, tick, tmp_path / f"s{i}", tmp_path / f"beat{i}.log")
             for i in range(2)]
    with worker:
        for b in beats:
            b.start()
        try:
            assert wait_until(lambda: sentinels_nodes(app), 30), worker.logfile.read_text()  # type: ignore[union-attr]
            assert wait_until(lambda: "standby" in beats[0].log() + beats[1].log(), 20)
            old = sentinels.master_port()
            promoted: list[float] = []

            def promotion(t: float) -> None:
                sentinels.wait_master_not(old)
                promoted.append(time.monotonic() - t)

            def kill() -> None:
                sentinels.kill(old)
                threading.Thread(target=promotion, args=(time.monotonic(),),
                                 daemon=True).start()

            in_flight = CONCURRENCY * PREFETCH + CONCURRENCY
            m = run_through_failover(app, queue, path, kill, total=5000, upfront=4000,
                                     kill_after=1000, in_flight_bound=in_flight,
                                     prober=Prober(app))
            # the result backend found the new master too
            import proj.tasks

            assert proj.tasks.add.apply_async((2, 3), queue=queue).get(
                timeout=20) == 5
            problems = cli_works(url, env)  # the commands themselves, after the failover
            assert not problems, problems
            stop_beats(beats)
            sends = beat_sends(beats)
        finally:
            for b in beats:
                b.stop(signal.SIGKILL)
    log = worker.logfile.read_text()  # type: ignore[union-attr]
    assert wait_until(lambda: bool(promoted), 20)
    print("\n" + m.summary(f"Sentinel (promotion {promoted[0]:.1f}s)"))
    print("\n".join(m.failures()))
    switches = sum(1 for a, b in zip(sends, sends[1:], strict=False) if a[1] != b[1])
    span = sends[-1][0] - sends[0][0]
    print(f"beat: {len(sends)} sends in {span:.1f}s, {switches} switch(es) of sender")
    assert m.missing == 0, (m.missing, log[-3000:])
    assert m.duplicates <= in_flight, m.summary("sentinel")
    assert m.recovery < 10, (m.summary("sentinel"), log[-3000:])
    # status and inspect: a command started at any time after the kill works, but
    # for those started while no broker node answered (within the first seconds)
    assert m.back_after("status") < 10 and m.back_after("inspect") < 10, \
        (m.summary("sentinel"), m.failures())
    assert not m.late_failures(10), m.late_failures(10)
    # one beat at a time: the lock may change hands once at the failover (it expires
    # while no master answers), never back and forth; about two sends a second
    assert switches <= 1, sends
    assert len(sends) <= span / 0.5 + 3, sends


def sentinels_nodes(app: Any) -> bool:
    """Some worker registered itself as live (it is ready)."""
    return bool(app.transport.live_nodes())


def stop_beats(beats: list[Any]) -> None:
    """TERM to every beat at once (stopped one by one, the last would take the lock
    over from the others as they go)."""
    for b in beats:
        if b.proc is not None and b.proc.poll() is None:
            b.proc.send_signal(signal.SIGTERM)
    for b in beats:
        b.stop()


def beat_sends(beats: list[Any]) -> list[tuple[float, int]]:
    """(time, beat index) of every send, from the beats' logs, in time order."""
    import datetime as dt

    out = []
    for i, b in enumerate(beats):
        for line in b.log().splitlines():
            if "Sending due task" in line:
                stamp = line[1:24]
                out.append((dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp(), i))
    return sorted(out)


def test_wait_replicas_refuses_what_the_replica_did_not_confirm(sentinels) -> None:
    from qops import App
    from qops.errors import PublishError, PublishManyError

    # long enough that a loaded machine's replica answers the first send in time
    options = {"wait_replicas": 1, "wait_timeout_ms": 1000}
    app = App("waits", broker=sentinels.url(), backend=sentinels.url())
    app.conf.broker_transport_options = options
    app.conf.result_backend_transport_options = options
    try:
        app.send_task("t.x", queue="waits")  # the replica is there: confirmed
        app.backend.store("id1", "SUCCESS", 1)
        replica = sentinels.procs[sentinels.replica_port()]
        os.kill(replica.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(PublishError) as info:
                app.send_task("t.x", queue="waits")
            assert 0.95 < time.monotonic() - started < 5
            assert "0 of the 1 replica(s)" in str(info.value)
            with pytest.raises(PublishError):
                app.backend.store("id2", "SUCCESS", 2)
            # a bulk send too: each chunk waits (3 messages: one chunk, unconfirmed)
            with pytest.raises(PublishManyError) as many:
                app.send_many([app.signature("t.x", queue="waits")] * 3)
            assert many.value.unconfirmed == [0, 1, 2]
            assert "0 of the 1 replica(s)" in str(many.value)
        finally:
            os.kill(replica.pid, signal.SIGCONT)
        assert len(app.send_many([app.signature("t.x", queue="waits")] * 2)) == 2
        # the refused messages are on the master all the same (WAIT does not roll back)
        assert app.transport.queue_stats(["waits"])[0].ready == 7
        assert json.loads(app.backend._get("id1") or b"{}")["result"] == 1
    finally:
        app.close()


def test_a_bulk_send_after_a_switchover_goes_to_the_new_master(sentinels) -> None:
    """SENTINEL FAILOVER demotes the master without stopping it (no process dies). A bulk
    send (qops's own MULTI/EXEC on a pooled connection, not redis-py's pipeline with its
    retry) right after goes to the new master: the Sentinels close the demoted one's
    client connections, and the pool's check at checkout connects again through them."""
    import redis

    from qops import App

    app = App("switch", broker=sentinels.url())
    try:
        sig = app.signature("t.x", queue="switch")
        assert len(app.send_many([sig] * 3)) == 3  # a pooled connection to the master
        old = sentinels.master_port()
        sentinel = redis.Redis(port=sentinels.sentinel_ports[0], socket_timeout=5)
        try:
            sentinel.execute_command("SENTINEL", "FAILOVER", "mymaster")
        finally:
            sentinel.close()
        new = sentinels.wait_master_not(old)
        demoted = redis.Redis(port=old, socket_timeout=5)
        try:
            assert wait_until(lambda: demoted.info("replication")["role"] == "slave", 20)
        finally:
            demoted.close()
        assert len(app.send_many([sig] * 4)) == 4
        master = redis.Redis(port=new, socket_timeout=5)
        try:
            assert master.llen("switch") == 7
        finally:
            master.close()
    finally:
        app.close()
