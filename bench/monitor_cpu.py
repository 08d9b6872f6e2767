"""CPU cost of following a fleet's events (what ``qops exporter`` and ``qops top`` run)
under a synthetic load: ``--nodes`` nodes heartbeating every 2 s and ``--rate`` tasks/s
(task-received, task-started, task-succeeded each), sent on the events exchange of the
broker. Prints the follower's CPU share of one core and its CPU time per event, per run
and the medians (on a busy machine the sender may fall short of ``--rate``: the time per
event still compares).

Two wire formats (``--format``):

- ``batched``: what qops workers send (docs/protocol.md §5): each node's task events
  gathered for ``--batch`` seconds and sent as one JSON list, routing key ``task.multi``.
- ``single``: one message per event, as qops workers sent them before and as Celery's
  workers do without an event loop.

    python bench/monitor_cpu.py --broker redis://localhost:6379/15 --repeat 3
    python bench/monitor_cpu.py --broker sqlite:////tmp/bench.db --format single
    python bench/monitor_cpu.py --broker amqp://guest:guest@localhost/vhost --command top
    git archive REV qops | tar -x -C /tmp/old && \
        python bench/monitor_cpu.py --qops-src /tmp/old --format single
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid

from qops import App
from qops.protocol import Message


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_follower(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], int | None]:
    base = [sys.executable, "-m", "qops", "-b", args.broker, "--compat", args.compat]
    env, cwd = dict(os.environ), None
    if args.qops_src:  # another copy of qops follows (e.g. an older commit's, for before/after)
        env["PYTHONPATH"] = cwd = os.path.abspath(args.qops_src)
    if args.command == "exporter":
        proc = subprocess.Popen([*base, "exporter", "--port", "0", "--bind", "127.0.0.1",
                                 "--no-enable-events"], env=env, cwd=cwd,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        return proc, None
    # top draws on a terminal: give it a pseudo-terminal and drain what it draws
    master, slave = pty.openpty()
    proc = subprocess.Popen([*base, "top", "--no-enable-events"], stdin=slave, stdout=slave,
                            stderr=subprocess.DEVNULL, start_new_session=True, cwd=cwd,
                            env={**env, "COLUMNS": "160", "LINES": "50"})
    os.close(slave)

    def drain() -> None:
        try:
            while os.read(master, 65536):
                pass
        except OSError:
            pass

    threading.Thread(target=drain, daemon=True).start()
    return proc, master


def one_run(args: argparse.Namespace, app: App) -> tuple[float, float, float]:
    exchange = app.names["events"]
    transport = app.transport
    proc, master = start_follower(args)
    nodes = [f"w{n}@bench" for n in range(args.nodes)]
    try:
        time.sleep(3)
        start_cpu, start = cpu_seconds(proc.pid), time.monotonic()
        sent, next_beat, tick = 0, 0.0, 0
        step = args.batch if args.format == "batched" else 0.1
        while time.monotonic() - start < args.seconds:
            now = time.time()
            if time.monotonic() >= next_beat:
                for host in nodes:
                    transport.broadcast(exchange, Message(body=json.dumps({
                        "type": "worker-heartbeat", "hostname": host, "timestamp": now,
                        "utcoffset": 0, "pid": 1, "clock": 1, "freq": 2.0, "active": 4,
                        "processed": sent // len(nodes), "loadavg": [1.0, 1.0, 1.0],
                        "sw_ident": "qops", "sw_ver": "bench", "sw_sys": "Linux"}).encode(),
                        headers={}), routing_key="worker.heartbeat")
                next_beat = time.monotonic() + 2.0
            per_node: dict[str, list[dict[str, object]]] = {h: [] for h in nodes}
            for _ in range(int(args.rate * step)):
                tid = str(uuid.uuid4())
                host = nodes[sent % len(nodes)]
                common = {"hostname": host, "timestamp": now, "utcoffset": 0, "pid": 1,
                          "clock": sent}
                per_node[host] += [
                    {"type": "task-received", "uuid": tid, "name": "bench.add",
                     "args": "(1, 2)", "kwargs": "{}", "root_id": tid, "parent_id": None,
                     "retries": 0, "eta": None, "expires": None, "queue": "celery",
                     **common},
                    {"type": "task-started", "uuid": tid, "queue": "celery", **common},
                    {"type": "task-succeeded", "uuid": tid, "result": "3",
                     "runtime": 0.001, **common}]
                sent += 1
            for events in per_node.values():
                if not events:
                    continue
                if args.format == "batched":
                    transport.broadcast(exchange, Message(body=json.dumps(events).encode(),
                                                          headers={}), routing_key="task.multi")
                    continue
                for e in events:
                    transport.broadcast(exchange, Message(body=json.dumps(e).encode(),
                                                          headers={}),
                                        routing_key=str(e["type"]).replace("-", "."))
            tick += 1
            time.sleep(max(0.0, start + tick * step - time.monotonic()))
        elapsed = time.monotonic() - start
        used = cpu_seconds(proc.pid) - start_cpu
    finally:
        proc.terminate()
        proc.wait(10)
        if master is not None:
            os.close(master)
    share = 100 * used / elapsed
    per_event = 1e6 * used / max(1, 3 * sent)
    print(f"  {sent / elapsed:.0f} tasks/s ({3 * sent / elapsed:.0f} events/s) for "
          f"{elapsed:.1f} s: {args.command} used {share:.1f}% of a core, "
          f"{per_event:.1f} us per event (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
    return share, sent / elapsed, per_event


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", default="redis://localhost:6379/15")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--rate", type=int, default=1000, help="tasks/s")
    parser.add_argument("--format", choices=("batched", "single"), default="batched")
    parser.add_argument("--batch", type=float, default=0.2,
                        help="seconds between a node's batches (--format batched)")
    parser.add_argument("--command", choices=("exporter", "top"), default="exporter")
    parser.add_argument("--compat", choices=("qops", "celery"), default="qops")
    parser.add_argument("--qops-src", help="directory holding the qops package the "
                        "follower runs (default: this one's)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # the follower is stopped too
    app = App("bench", broker=args.broker, compat=args.compat)
    runs = []
    try:
        for _ in range(args.repeat):
            runs.append(one_run(args, app))
    finally:
        app.close()
    shares, rates, per_event = zip(*runs, strict=True)
    print(json.dumps({"broker": app.transport.safe_url(), "command": args.command,
                      "format": args.format, "compat": args.compat, "nodes": args.nodes,
                      "rate": args.rate, "runs": [round(s, 1) for s in shares],
                      "median": round(statistics.median(shares), 1),
                      "tasks_per_s": [round(r) for r in rates],
                      "us_per_event": [round(u, 1) for u in per_event],
                      "median_us_per_event": round(statistics.median(per_event), 1)}))


if __name__ == "__main__":
    main()
