"""Cluster monitoring: one model of the cluster's state (``state``), fed by worker
events, heartbeats and queue stats (``feed``), read by ``qops top`` and by the
Prometheus exporter (``exporter``). No typer or rich here."""

from qops.monitor.state import TASK_STATES, ClusterState

__all__ = ["TASK_STATES", "ClusterState"]
