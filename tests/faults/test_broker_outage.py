"""The broker goes away in the middle of 10,000 tasks (issue item 4).

Redis and RabbitMQ: worker and producers talk to the broker through a ``BrokerProxy``
that the test cuts for 2 s (every connection closed, new ones refused) while tasks are
being published and run. SQLite has no connection to lose: another process holds the
database's write lock for 2 s instead.

What must hold: the worker comes back by itself and says so in its log; with
``acks_late`` every task runs (at least once); ``apply_async`` either returns (and then
the task runs) or raises PublishError/BrokerUnreachable -- never anything else, never a
silent drop. The producer here retries a failed send with the same task id, as an
at-least-once producer must.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
import uuid

from qops.errors import BrokerUnreachable, PublishError
from qops.transports.base import from_url
from qops.transports.sqlite import path_from_url
from tests.faults.conftest import runs, use
from tests.helpers import wait_until

N = 10_000
PRODUCERS = 4
CUT_AT = 3_000  # published tasks (at least) when the broker goes away
#: the producers wait here until the outage begins, so that it comes mid-stream even when
#: they outpace a worker slowed down by a busy machine (all sent, nothing left to fail)
HOLD_AT = 5_000
OUTAGE = 2.0  # seconds (below the tests' heartbeat TTL of 3 s)

#: what the worker logs when it lost the broker and goes on
RECONNECT_LINE = re.compile(
    r"consumer error: .*(unreachable|lost the connection|cannot connect).*retrying"
    r"|lost its RabbitMQ connection .*reconnecting")


def test_broker_outage_mid_stream(app, broker, make_proxy, workers, queue, tmp_path):
    path = tmp_path / "runs.txt"
    proxy = None
    url = broker.url
    if broker.kind != "sqlite":
        proxy = make_proxy(broker.url)
        url = broker.with_host(proxy)
    use(app, url, broker.backend)  # the producer goes through the proxy too
    w = workers.start("w", "-Q", queue, "-P", "threads", "-c", "4", broker_url=url,
                      level="WARNING")

    ids = [str(uuid.uuid4()) for _ in range(N)]
    sent: list[str] = []  # apply_async returned: the broker has it
    retried: set[str] = set()  # sent again after a failed send
    errors: list[str] = []  # PublishError / BrokerUnreachable (retried)
    unexpected: list[BaseException] = []  # anything else: not a clear error
    lock = threading.Lock()
    outage = threading.Event()

    def produce(chunk: list[str]) -> None:
        for tid in chunk:
            if len(sent) >= HOLD_AT:
                outage.wait(120)
            deadline = time.monotonic() + 60
            while True:
                try:
                    app.send_task("proj.tasks.mark", [str(path)], task_id=tid,
                                  queue=queue, ignore_result=True)
                except (PublishError, BrokerUnreachable) as exc:
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                        retried.add(tid)
                except Exception as exc:
                    with lock:
                        unexpected.append(exc)
                else:
                    with lock:
                        sent.append(tid)
                    break
                if time.monotonic() > deadline:
                    return
                time.sleep(0.05)  # the producer's own backoff

    threads = [threading.Thread(target=produce, args=(ids[i::PRODUCERS],), daemon=True)
               for i in range(PRODUCERS)]
    started = time.monotonic()
    for t in threads:
        t.start()
    # in the middle: the worker is up and busy, the producers are still sending
    try:
        assert wait_until(lambda: len(sent) >= CUT_AT and sum(runs(path).values()) >= 1000,
                          timeout=60), workers.log(w)[-3000:]
        done_before = sum(runs(path).values())
        if proxy is not None:
            accepted = proxy.accepted
            proxy.cut()
            outage.set()
            time.sleep(OUTAGE)
            proxy.restore()
        else:
            holder = sqlite3.connect(str(path_from_url(broker.url)), isolation_level=None)
            holder.execute("BEGIN EXCLUSIVE")
            outage.set()
            time.sleep(OUTAGE)
            holder.execute("ROLLBACK")
            holder.close()
    finally:
        outage.set()
    for t in threads:
        t.join(90)
    assert not unexpected, f"apply_async raised something unclear: {unexpected[:3]!r}"
    assert len(set(sent)) == N, f"{N - len(set(sent))} tasks could not be sent in 60 s"

    direct = from_url(broker.url)
    try:
        def drained() -> bool:
            [s] = direct.queue_stats([queue])
            return s.ready == 0 and (broker.kind == "amqp" or s.in_flight == 0) \
                and len(runs(path)) >= N

        assert wait_until(drained, timeout=90, interval=0.25), \
            f"{N - len(runs(path))} tasks never ran\n{workers.log(w)[-3000:]}"
        time.sleep(1.0)  # a late duplicate would show up now
        [stats] = direct.queue_stats([queue])
    finally:
        direct.close()
    elapsed = time.monotonic() - started
    counts = runs(path)
    missing = [tid for tid in sent if counts[tid] == 0]
    assert not missing, f"{len(missing)} tasks were sent but never ran (e.g. {missing[:3]})"
    assert set(counts) <= set(ids)
    twice = sum(1 for n in counts.values() if n > 1)
    # a failed send may still have reached the broker (its reply was lost): sending it
    # again then runs it twice; the others ran twice because the worker lost them
    twice_worker = sum(1 for tid, n in counts.items() if n > 1 and tid not in retried)
    print(f"\n{broker.kind}: {N} tasks in {elapsed:.1f}s with a {OUTAGE:.0f}s outage after "
          f"{done_before} had run; {len(errors)} failed sends (retried), {twice} ran twice"
          f" ({twice_worker} of them sent once; max {max(counts.values())} runs)")
    assert stats.ready == 0
    assert w.proc is not None and w.proc.poll() is None, workers.log(w)[-3000:]
    assert w.stop() == 0  # (while the broker is there: a clean warm shutdown)
    log = workers.log(w)
    if proxy is not None:
        # the producer was told, in words that say what happened
        assert errors, "no send failed while the broker was away"
        assert all(re.search(r"unreachable|lost the connection|cannot connect|refused",
                             e, re.I) for e in errors), errors[:3]
        assert proxy.accepted > accepted  # everyone connected again
        line = RECONNECT_LINE.search(log)
        assert line, f"no reconnect line in the worker log:\n{log[-3000:]}"
        print(f"worker: ...{line.group(0)[-160:]}")
        # at-least-once: only what was in flight when the connection dropped runs again
        # (prefetch 16 + 4 running), plus sends whose confirm was lost with the connection
        assert twice <= 16 + 4 + len(errors), twice
    else:
        assert twice == 0


def test_a_redis_that_does_not_answer_fails_a_send_after_one_socket_timeout() -> None:
    """A Redis that takes the connection and never answers (stopped, or cut off by a
    firewall after the connect): the send raises BrokerUnreachable after the URL's
    socket_timeout, once -- it was sent again after a timeout, which cost it twice (and
    a send that timed out may have been made)."""
    import socket

    from qops import App

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    port = server.getsockname()[1]
    app = App("silent", broker=f"redis://127.0.0.1:{port}/0?socket_timeout=1")
    try:
        start = time.monotonic()
        try:
            app.send_task("silent.add", (1, 2))
        except BrokerUnreachable as exc:
            assert "Timeout" in str(exc)
        else:
            raise AssertionError("a send to a silent Redis returned")
        assert 0.9 < time.monotonic() - start < 1.9  # (twice: 2 s and more)
    finally:
        stop.set()
        acceptor.join(2)
        app.close()
        for conn in held:
            conn.close()
        server.close()
