"""CPU cost of the monitor's feed (what ``qops top`` and ``qops exporter`` run) under a
synthetic load: 10 nodes heartbeating and 1,000 tasks/s (4 task events each), sent on
the events channel of a Redis broker. Prints the exporter's CPU share of one core.

    python bench/monitor_cpu.py [redis://localhost:6379/15] [seconds]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

from qops import App
from qops.protocol import Message


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else "redis://localhost:6379/15"
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
    app = App("bench", broker=url)
    exchange = app.names["events"]
    proc = subprocess.Popen([sys.executable, "-m", "qops", "-b", url, "exporter", "--port", "0",
                             "--bind", "127.0.0.1", "--no-enable-events"],
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(3)
        start_cpu, start = cpu_seconds(proc.pid), time.monotonic()
        sent, next_beat = 0, 0.0
        while time.monotonic() - start < seconds:
            now = time.time()
            if time.monotonic() >= next_beat:
                for n in range(10):
                    app.transport.broadcast(exchange, Message(body=json.dumps({
                        "type": "worker-heartbeat", "hostname": f"w{n}@bench", "timestamp": now,
                        "freq": 2.0, "active": 4, "processed": sent, "loadavg": [1, 1, 1],
                        "clock": 1, "pid": 1}).encode(), headers={}),
                        routing_key="worker.heartbeat")
                next_beat = time.monotonic() + 2.0
            batch = []
            for _ in range(100):  # 100 tasks every 0.1 s
                tid = uuid.uuid4().hex
                host = f"w{sent % 10}@bench"
                batch += [{"type": "task-received", "uuid": tid, "name": "bench.add",
                           "hostname": host, "timestamp": now},
                          {"type": "task-started", "uuid": tid, "hostname": host,
                           "timestamp": now},
                          {"type": "task-succeeded", "uuid": tid, "hostname": host,
                           "timestamp": now, "runtime": 0.001}]
                sent += 1
            for e in batch:  # one event a message, as workers send them
                app.transport.broadcast(exchange, Message(body=json.dumps(e).encode(),
                                                          headers={}),
                                        routing_key=e["type"].replace("-", "."))
            time.sleep(max(0.0, start + sent / 1000 - time.monotonic()))
        elapsed = time.monotonic() - start
        used = cpu_seconds(proc.pid) - start_cpu
        print(f"{sent / elapsed:.0f} tasks/s ({3 * sent / elapsed:.0f} events/s) for "
              f"{elapsed:.1f} s: the exporter used {100 * used / elapsed:.1f}% of a core")
    finally:
        proc.terminate()
        proc.wait(10)
        app.close()


if __name__ == "__main__":
    main()
