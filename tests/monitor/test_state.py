"""The cluster-state model fed by hand-made events, and its exposition."""

from __future__ import annotations

import json

import pytest

from qops.monitor import ClusterState
from tests.monitor.helpers import parse, sample


def beat(host: str, processed: int = 0, active: int = 0, ts: float = 100.0,
         kind: str = "worker-heartbeat") -> dict[str, object]:
    return {"type": kind, "hostname": host, "timestamp": ts, "freq": 2.0,
            "active": active, "processed": processed, "loadavg": [0.5, 0.25, 0.1],
            "sw_ident": "qops", "sw_ver": "0.1.0", "pid": 42}


def task(kind: str, uuid: str, ts: float, host: str = "w1@h", **fields: object) -> dict[str, object]:
    return {"type": f"task-{kind}", "hostname": host, "timestamp": ts, "uuid": uuid, **fields}


def test_nodes_up_gone_and_offline() -> None:
    s = ClusterState(grace=3)
    s.apply(beat("w1@h", kind="worker-online"), now=1000)
    s.apply(beat("w2@h"), now=1000)
    snap = s.snapshot(now=1005)
    assert [n["up"] for n in snap["nodes"]] == [True, True]
    assert snap["workers_online"] == 2
    assert s.snapshot(now=1007)["workers_online"] == 0  # 3 heartbeats of 2 s missed
    s.apply(beat("w1@h"), now=1007)
    s.apply(beat("w2@h", kind="worker-offline"), now=1007)
    assert {n["name"]: n["up"] for n in s.snapshot(now=1007)["nodes"]} == \
        {"w1@h": True, "w2@h": False}
    assert [n["name"] for n in s.snapshot(now=1007 + 3601)["nodes"]] == []  # forgotten


def test_task_counters_runtimes_and_failures() -> None:
    s = ClusterState()
    s.apply(beat("w1@h"), now=1000)
    s.apply(task("received", "a", 10.0, name="proj.add"))
    s.apply(task("started", "a", 10.5))
    assert [r["name"] for r in s.snapshot(now=11)["running"]] == ["proj.add"]
    s.apply(task("succeeded", "a", 10.7, runtime=0.2))
    s.apply(task("received", "b", 11.0, name="proj.fail"))
    s.apply(task("started", "b", 11.1))
    s.apply(task("failed", "b", 13.1, exception="ValueError('kaboom')"))
    s.apply(task("revoked", "zz", 14.0), now=0)  # never seen received: "unknown", 5 s on
    assert "unknown" not in s.snapshot(now=4)["tasks"]
    snap = s.snapshot(now=20)
    assert snap["tasks"] == {"proj.add": {"received": 1, "started": 1, "succeeded": 1},
                             "proj.fail": {"received": 1, "started": 1, "failed": 1},
                             "unknown": {"revoked": 1}}
    assert snap["running"] == []
    assert [(f["name"], f["exception"]) for f in snap["failures"]] == \
        [("proj.fail", "ValueError('kaboom')")]
    assert snap["nodes"][0]["succeeded"] == 1 and snap["nodes"][0]["failed"] == 1
    hist = s.histograms()
    assert hist["runtime"]["proj.add"].sum == pytest.approx(0.2)
    assert hist["runtime"]["proj.fail"].sum == pytest.approx(2.0)  # started -> failed
    assert hist["queue_wait"]["proj.add"].sum == pytest.approx(0.5)  # received -> started


def test_events_out_of_order_are_counted_in_order() -> None:
    """On RabbitMQ a worker's threads publish on connections of their own."""
    s = ClusterState()
    s.apply(task("succeeded", "a", 3.0, runtime=1.0), now=100)
    s.apply(task("started", "a", 2.0), now=100)
    assert s.snapshot(now=101)["tasks"] == {}
    s.apply(task("received", "a", 1.0, name="proj.add"), now=101)
    snap = s.snapshot(now=101)
    assert snap["tasks"] == {"proj.add": {"received": 1, "started": 1, "succeeded": 1}}
    assert snap["running"] == []
    assert s.histograms()["queue_wait"]["proj.add"].sum == pytest.approx(1.0)


def test_celery_task_sent_starts_the_wait() -> None:
    s = ClusterState()
    s.apply(task("sent", "a", 1.0, name="proj.add", host="gen1@client"))
    s.apply(task("received", "a", 4.0, name="proj.add"))
    s.apply(task("started", "a", 5.0))
    assert s.histograms()["queue_wait"]["proj.add"].sum == pytest.approx(4.0)
    assert "sent" not in s.snapshot()["tasks"]["proj.add"]


def test_counters_survive_a_worker_restart() -> None:
    s = ClusterState()
    s.apply(beat("w1@h", processed=10, ts=100), now=1000)
    for i in range(3):
        s.apply(task("received", f"t{i}", 101, name="proj.add"))
        s.apply(task("succeeded", f"t{i}", 102, runtime=0.1))
    s.apply(beat("w1@h", processed=0, ts=103, kind="worker-online"), now=1003)  # restarted
    snap = s.snapshot(now=1003)
    assert snap["tasks"]["proj.add"]["succeeded"] == 3
    assert snap["nodes"][0]["rate"] == 0.0


def test_exposition_families() -> None:
    from qops.queues import QueueCounts

    s = ClusterState()
    s.apply(beat("w1@h"))
    s.apply(task("received", "a", 10.0, name="proj.add", queue="celery"))
    s.apply(task("started", "a", 10.0, queue="celery"))
    s.apply(task("succeeded", "a", 10.3, runtime=0.3))
    s.set_queues([QueueCounts("celery", 10, 2, 1), QueueCounts("other", 0, None, 0)])
    s.set_dead_letters(3)
    s.set_broker_up(True)
    from qops.monitor.exporter import FAMILIES, exposition

    samples = parse(exposition(s).decode())
    assert sample(samples, "qops_workers_online") == 1
    assert sample(samples, "qops_worker_up", node="w1@h") == 1
    assert sample(samples, "qops_queue_ready_messages", queue="celery") == 10
    assert sample(samples, "qops_queue_inflight_messages", queue="celery") == 2
    assert sample(samples, "qops_queue_inflight_messages", queue="other") is None  # unknown
    assert sample(samples, "qops_queue_consumers", queue="celery") == 1
    assert sample(samples, "qops_tasks_total", task="proj.add", state="succeeded") == 1
    assert sample(samples, "qops_queue_out_total", queue="celery") == 1
    assert sample(samples, "qops_task_runtime_seconds_count", task="proj.add") == 1
    assert sample(samples, "qops_task_runtime_seconds_bucket", task="proj.add", le="0.25") == 0
    assert sample(samples, "qops_task_runtime_seconds_bucket", task="proj.add", le="0.5") == 1
    assert sample(samples, "qops_task_queue_wait_seconds_count", task="proj.add") == 1
    assert sample(samples, "qops_dead_letter_messages") == 3
    assert sample(samples, "qops_exporter_broker_up") == 1
    names = {name for name, _ in samples}
    for family, (kind, _) in FAMILIES.items():
        if kind == "histogram":
            assert f"{family}_count" in names
        else:
            assert family in names, family


def test_a_batch_is_applied_like_its_events_one_by_one() -> None:
    """Workers send their task events in batches (a JSON list, routing key task.multi)."""
    from qops.events import decode

    events = [task("received", "a", 1.0, name="proj.add"), task("started", "a", 1.5),
              task("succeeded", "a", 2.0, runtime=0.5)]
    one, many = ClusterState(), ClusterState()
    for e in events:
        one.apply(e, now=10)
    many.apply_many(decode(json.dumps(events).encode()), now=10)
    assert one.snapshot(now=10) == many.snapshot(now=10)
    assert many.events_seen == 3
    assert many.histograms()["queue_wait"]["proj.add"].sum == pytest.approx(0.5)


def test_queue_in_and_out_rates() -> None:
    """Out: tasks taken from the queue (task-received naming it); in: out plus the
    growth of the ready messages, between two polls."""
    from qops.queues import QueueCounts

    s = ClusterState()
    s.set_queues([QueueCounts("q1", 10, 0, 1)], now=100)
    for i in range(6):
        s.apply(task("received", f"t{i}", 100.5, name="proj.add", queue="q1"))
    s.set_queues([QueueCounts("q1", 12, 0, 1), QueueCounts("q2", 5, 0, 0)], now=102)
    snap = s.snapshot(now=102)
    q1, q2 = snap["queues"]
    assert (q1["out_rate"], q1["rate"], q1["in_rate"]) == (3.0, 1.0, 4.0)
    assert (q2["out_rate"], q2["in_rate"]) == (None, None)  # a first poll: no rate yet
    assert snap["queue_out"] == {"q1": 6}
    s.set_queues([QueueCounts("q1", 12, 0, 1), QueueCounts("q2", 5, 0, 0)], now=104)
    q1, q2 = s.snapshot(now=104)["queues"]
    assert (q1["out_rate"], q2["out_rate"], q2["in_rate"]) == (0.0, 0.0, 0.0)


def test_queue_rates_unknown_without_queue_in_events() -> None:
    """Celery's workers' task-received names no queue: no in/out rate, only growth."""
    from qops.queues import QueueCounts

    s = ClusterState()
    s.set_queues([QueueCounts("q1", 10, 0, 1)], now=100)
    s.apply(task("received", "a", 100.5, name="proj.add"))
    s.set_queues([QueueCounts("q1", 8, 0, 1)], now=102)
    q1 = s.snapshot(now=102)["queues"][0]
    assert (q1["rate"], q1["in_rate"], q1["out_rate"]) == (-1.0, None, None)


def test_rejected_and_dead_lettered() -> None:
    """A worker's task-rejected counts as rejected; with dead_lettered, as dead_lettered
    too. Requeued, the task runs again (it is not done)."""
    s = ClusterState()
    s.apply(task("rejected", "", 1.0, name="unknown", requeue=False, dead_lettered=True,
                 reason="bad body", queue="q1"))
    s.apply(task("received", "b", 2.0, name="proj.add"))
    s.apply(task("rejected", "b", 2.1, requeue=True))
    s.apply(task("received", "b", 3.0, name="proj.add"))
    s.apply(task("started", "b", 3.1))
    snap = s.snapshot(now=4)
    assert snap["tasks"] == {
        "unknown": {"rejected": 1, "dead_lettered": 1},
        "proj.add": {"received": 2, "rejected": 1, "started": 1}}
    assert [r["uuid"] for r in snap["running"]] == ["b"]


def test_feed_asks_a_node_for_task_events_when_it_comes_online_again() -> None:
    """A worker restarted under the same name starts without task events: the feed asks
    again on its worker-online, not on each heartbeat."""
    from qops import App
    from qops.monitor.feed import Feed

    asked: list[list[str] | None] = []

    class Recording(Feed):
        def _ask_for_events(self, nodes: list[str] | None) -> None:
            asked.append(nodes)

    feed = Recording(App("proj", broker="memory://"))
    for kind in ("worker-heartbeat", "worker-heartbeat", "worker-online", "worker-heartbeat"):
        feed._maybe_enable(beat("w1@h", kind=kind))
    feed._maybe_enable(task("received", "a", 1.0, host="w2@h"))
    assert asked == [["w1@h"], ["w1@h"]]
