"""Redis-only behaviour (the shared contract is in tests/contract/test_transport.py)."""

from qops.transports.base import TransportOptions

FAST = TransportOptions(heartbeat_interval=0.2, heartbeat_ttl=1.0)
SEP = "\x06\x16"  # kombu's separator in binding entries and priority queue names
