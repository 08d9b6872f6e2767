"""The Prometheus exporter: ``/metrics`` (the text format, made by ``prometheus_client``,
the optional extra ``qops[metrics]``) and ``/healthz``, from a ``ClusterState``.

The metric families are read from the state at each scrape (a custom collector), so a
scrape costs a snapshot and nothing runs between scrapes but the feed. The list of
families, with their labels, is ``FAMILIES`` (docs/monitoring.md shows it).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from qops.errors import UsageError
from qops.monitor.state import ClusterState, Histogram

#: name -> (type, help); the names the dashboard and the alert rules may use
FAMILIES: dict[str, tuple[str, str]] = {
    "qops_workers_online": ("gauge", "Nodes whose heartbeats arrive."),
    "qops_worker_up": ("gauge", "1 while the node's heartbeats arrive, 0 once missed."),
    "qops_worker_active_tasks": ("gauge", "Tasks the node is running (its heartbeat)."),
    "qops_worker_processed_tasks": ("gauge", "Tasks the node finished since it started."),
    "qops_queue_ready_messages": ("gauge", "Messages waiting in the queue."),
    "qops_queue_inflight_messages": ("gauge", "Messages taken by workers, not yet settled."),
    "qops_queue_consumers": ("gauge", "Consumers of the queue."),
    "qops_queue_out_total": ("counter", "Tasks workers took from the queue (task-received "
                                        "events naming it)."),
    "qops_tasks_total": ("counter", "Task events seen, by task and state."),
    "qops_task_runtime_seconds": ("histogram", "Task runtime (succeeded and failed)."),
    "qops_task_queue_wait_seconds": ("histogram",
                                     "Wait from sent (else received) to started."),
    "qops_dead_letter_messages": ("gauge", "Messages in the dead-letter store."),
    "qops_exporter_broker_up": ("gauge", "1 while the exporter reaches the broker."),
    "qops_exporter_events_total": ("counter", "Events the exporter received."),
}

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise UsageError("the exporter needs prometheus_client: pip install 'qops[metrics]'"
                         ) from None
    return prometheus_client


class StateCollector:
    """A ``prometheus_client`` collector reading ``state`` at each scrape."""

    def __init__(self, state: ClusterState) -> None:
        self.state = state

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        snap = self.state.snapshot(failures=0)

        def gauge(name: str, labels: list[str] | None = None) -> Any:
            return GaugeMetricFamily(name, FAMILIES[name][1], labels=labels)

        online = gauge("qops_workers_online")
        online.add_metric([], snap["workers_online"])
        up, active, processed = (gauge(n, ["node"]) for n in (
            "qops_worker_up", "qops_worker_active_tasks", "qops_worker_processed_tasks"))
        for node in snap["nodes"]:
            up.add_metric([node["name"]], 1 if node["up"] else 0)
            active.add_metric([node["name"]], node["active"])
            processed.add_metric([node["name"]], node["processed"])
        ready, inflight, consumers = (gauge(n, ["queue"]) for n in (
            "qops_queue_ready_messages", "qops_queue_inflight_messages",
            "qops_queue_consumers"))
        for q in snap["queues"]:
            ready.add_metric([q["name"]], q["ready"])
            if q["in_flight"] is not None:
                inflight.add_metric([q["name"]], q["in_flight"])
            consumers.add_metric([q["name"]], q["consumers"])
        out = CounterMetricFamily("qops_queue_out", FAMILIES["qops_queue_out_total"][1],
                                  labels=["queue"])
        for name, n in sorted(snap["queue_out"].items()):
            out.add_metric([name], n)
        tasks = CounterMetricFamily("qops_tasks", FAMILIES["qops_tasks_total"][1],
                                    labels=["task", "state"])
        for name, states in snap["tasks"].items():
            for state, n in states.items():
                tasks.add_metric([name, state], n)
        yield from (online, up, active, processed, ready, inflight, consumers, out, tasks)
        hists = self.state.histograms()
        for family, key in (("qops_task_runtime_seconds", "runtime"),
                            ("qops_task_queue_wait_seconds", "queue_wait")):
            metric = HistogramMetricFamily(family, FAMILIES[family][1], labels=["task"])
            for name, h in sorted(hists[key].items()):
                metric.add_metric([name], _buckets(h), sum_value=h.sum)
            yield metric
        dead = gauge("qops_dead_letter_messages")
        if snap["dead_letters"] is not None:
            dead.add_metric([], snap["dead_letters"])
        broker = gauge("qops_exporter_broker_up")
        broker.add_metric([], 1 if snap["broker_up"] else 0)
        events = CounterMetricFamily("qops_exporter_events",
                                     FAMILIES["qops_exporter_events_total"][1])
        events.add_metric([], self.state.events_seen)
        yield from (dead, broker, events)


def _buckets(h: Histogram) -> list[tuple[str, int]]:
    return [("+Inf" if le == float("inf") else repr(float(le)), n)
            for le, n in h.cumulative()]


def registry(state: ClusterState) -> Any:
    """A ``prometheus_client`` registry holding ``state``'s collector only."""
    reg = _prometheus().CollectorRegistry(auto_describe=False)
    reg.register(StateCollector(state))
    return reg


def exposition(state: ClusterState) -> bytes:
    """``/metrics``' body for ``state``."""
    return bytes(_prometheus().generate_latest(registry(state)))


class Exporter:
    """The HTTP server, in a thread of its own (``start``) or this one (``serve``)."""

    def __init__(self, state: ClusterState, *, bind: str = "0.0.0.0", port: int = 9808) -> None:
        self.state = state
        handler = type("Handler", (_Handler,), {"state": state, "registry": registry(state)})
        try:
            self.server = ThreadingHTTPServer((bind, port), handler)
        except OSError as exc:
            raise UsageError(f"cannot listen on {bind}:{port}: {exc.strerror}") from None
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> Exporter:
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        name="exporter-http", daemon=True)
        self._thread.start()
        return self

    def serve(self) -> None:
        self.server.serve_forever()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    state: ClusterState
    registry: Any

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            from prometheus_client import generate_latest

            self._send(200, generate_latest(self.registry), CONTENT_TYPE)
        elif path == "/healthz":
            up = self.state.broker_up
            self._send(200 if up else 503, b"ok\n" if up else b"broker unreachable\n",
                       "text/plain; charset=utf-8")
        elif path == "/":
            self._send(200, b"qops exporter: /metrics /healthz\n", "text/plain; charset=utf-8")
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # quiet: scrapes are frequent
        pass
