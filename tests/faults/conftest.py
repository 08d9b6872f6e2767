"""Fault injection: real brokers, real worker processes, and a TCP proxy the test cuts.

The machine's shared redis-server and rabbitmq-server are never stopped: a broker
"restart" is a ``BrokerProxy`` between qops and the broker (a thread in the test on a
free port of 127.0.0.1) whose ``cut()`` closes every connection and refuses new ones
(connection refused, as for a broker that is down) until ``restore()``.

Every worker a test starts is a ``WorkerProcess`` (own process group, stopped by pid);
every proxy is closed by its fixture.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.helpers import WorkerProcess, qops_env


class BrokerProxy:
    """A TCP proxy from 127.0.0.1:<port> to ``target`` that the test can cut and restore."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._closed = False
        self.accepted = 0  # connections accepted so far (reconnects show up here)
        self._listener: socket.socket | None = self._listen(0)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="proxy-accept",
                                        daemon=True)
        self._thread.start()

    # -- control ------------------------------------------------------------------------------
    @property
    def is_cut(self) -> bool:
        with self._lock:
            return self._listener is None

    def cut(self) -> None:
        """Close every proxied connection and refuse new ones (ECONNREFUSED)."""
        with self._lock:
            listener, self._listener = self._listener, None
            pairs, self._pairs = self._pairs, []
        if listener is not None:
            listener.close()
        for a, b in pairs:
            _kill(a)
            _kill(b)

    def restore(self) -> None:
        with self._lock:
            if self._listener is None and not self._closed:
                self._listener = self._listen(self.port)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.cut()
        self._thread.join(5)

    def url_for(self, direct_url: str) -> str:
        """``direct_url`` with its host and port replaced by the proxy's."""
        parts = urlsplit(direct_url)
        creds = parts.netloc.rpartition("@")[0]
        netloc = f"{creds}@127.0.0.1:{self.port}" if creds else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    # -- the proxy ------------------------------------------------------------------------------
    @staticmethod
    def _listen(port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(128)
        s.settimeout(0.05)
        return s

    def _accept_loop(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                listener = self._listener
            if listener is None:
                time.sleep(0.02)
                continue
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _kill(client)
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._listener is None:  # cut while this one was being accepted
                    _kill(client)
                    _kill(upstream)
                    continue
                self._pairs.append((client, upstream))
                self.accepted += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True,
                                 name="proxy-pump").start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        _kill(src)
        _kill(dst)
        with self._lock:
            self._pairs = [p for p in self._pairs if src not in p]


def _kill(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


@pytest.fixture
def make_proxy() -> Iterator[Callable[[str], BrokerProxy]]:
    """``make_proxy(direct_url)``: a proxy to that URL's host and port, closed at the end."""
    proxies: list[BrokerProxy] = []

    def make(direct_url: str) -> BrokerProxy:
        parts = urlsplit(direct_url)
        p = BrokerProxy(parts.hostname or "127.0.0.1", parts.port or 0)
        proxies.append(p)
        return p

    yield make
    for p in proxies:
        p.close()


# -- brokers ----------------------------------------------------------------------------------


@dataclass
class Broker:
    """One transport for a test: its broker URL and the result backend to use with it."""

    kind: str
    url: str
    backend: str

    def with_host(self, proxy: BrokerProxy) -> str:
        """The broker URL through ``proxy`` (the result backend stays direct)."""
        return proxy.url_for(self.url)


@pytest.fixture(params=["sqlite", "redis", "amqp"])
def broker(request: pytest.FixtureRequest) -> Broker:
    """Each real transport. RabbitMQ gets a dead-letter queue of its own per test (the
    vhost is shared by the session), and Redis results for the AMQP broker."""
    kind = request.param
    if kind == "sqlite":
        url = str(request.getfixturevalue("sqlite_url"))
        return Broker(kind, url, url)
    redis_url = str(request.getfixturevalue("redis_url"))
    if kind == "redis":
        return Broker(kind, redis_url, redis_url)
    amqp_url = str(request.getfixturevalue("amqp_url"))
    return Broker(kind, f"{amqp_url}?dead_letter_queue=qops.dlq.{uuid.uuid4().hex[:10]}",
                  redis_url)


@pytest.fixture
def app(broker: Broker) -> Iterator[Any]:
    """The example app (proj) pointed at this test's broker and backend."""
    from proj.qops import app

    use(app, broker.url, broker.backend)
    yield app
    app.conf._layers["cli"].clear()
    app.close()


def use(app: Any, broker_url: str, backend: str | None) -> None:
    """Point ``app`` at ``broker_url``/``backend`` (closing its old connections)."""
    app.close()
    app.conf.set("broker_url", broker_url, layer="cli")
    if backend:
        app.conf.set("result_backend", backend, layer="cli")
    app.close()


@pytest.fixture
def queue() -> str:
    return f"fq-{uuid.uuid4().hex[:8]}"


# -- workers ----------------------------------------------------------------------------------


@dataclass
class Workers:
    """Starts workers for a test and stops every one of them at the end (by pid)."""

    broker: Broker
    tmp_path: Path
    started: list[WorkerProcess] = field(default_factory=list)

    def start(self, name: str, *args: str, broker_url: str | None = None,
              backend: str | None = None, level: str = "INFO", app: str = "proj",
              **env: str) -> WorkerProcess:
        """A worker named ``name`` (log in ``<tmp_path>/<name>.log``); ``env`` are
        QOPS_* settings for it."""
        w = WorkerProcess("-n", f"{name}@%h", "-l", level, *args,
                          broker=broker_url or self.broker.url,
                          backend=backend or self.broker.backend, app=app,
                          env=qops_env(**env), logfile=self.tmp_path / f"{name}.log")
        self.started.append(w)
        return w.start()

    def log(self, w: WorkerProcess) -> str:
        return w.log()

    def wait_ready(self, w: WorkerProcess, timeout: float = 30) -> None:
        w.wait_ready(timeout)

    def stop_all(self) -> None:
        for w in self.started:
            w.stop()


@pytest.fixture
def workers(broker: Broker, tmp_path: Path) -> Iterator[Workers]:
    ws = Workers(broker, tmp_path)
    yield ws
    ws.stop_all()


# -- counting executions ----------------------------------------------------------------------


def runs(path: Path) -> Counter[str]:
    """Task id -> how many times it ran (lines written by proj.tasks.record/mark)."""
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        return Counter()
    return Counter(line.split(" ", 1)[0] for line in text.splitlines() if line.strip())


def run_pids(path: Path, task_id: str) -> list[int]:
    """The pids that ran ``task_id``, in order."""
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        return []
    return [int(p) for line in text.splitlines() if line.startswith(task_id + " ")
            for p in line.split()[1:2]]


def run_times(path: Path, task_id: str) -> list[float]:
    """When each run of ``task_id`` started (unix time; lines written by record)."""
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        return []
    return [float(line.split()[2]) for line in text.splitlines()
            if line.startswith(task_id + " ") and len(line.split()) > 2]


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan waits for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")
