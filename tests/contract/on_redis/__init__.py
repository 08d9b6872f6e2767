"""Redis-only behaviour (the shared contract is in tests/contract/test_transport.py)."""

SEP = "\x06\x16"  # kombu's separator in binding entries and priority queue names
