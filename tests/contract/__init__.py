"""Contract tests: every transport and backend passes the same cases."""

from qops.transports.base import TransportOptions

#: fast liveness, so recovery-related cases finish in about a second
FAST = TransportOptions(heartbeat_interval=0.2, heartbeat_ttl=1.0)
