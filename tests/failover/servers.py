"""Private broker clusters for the failover tests, on free ports of 127.0.0.1.

Never the machine's shared Redis (6379) or RabbitMQ (5672): every server here is a
process this module starts in a process group of its own and stops by pid (SIGKILL of
the group), and its files live in a temp dir removed at the end.

- ``SentinelCluster``: a Redis master, a replica and three Sentinels (about 3 s).
- ``RabbitCluster``: three RabbitMQ nodes joined in one cluster, with a private epmd
  and one Erlang cookie (about 16 s).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
MASTER_NAME = "mymaster"


def need_binaries(*names: str) -> None:
    """Skip (one line) when a server binary is missing; fail under CI=true."""
    missing = [n for n in names if not (shutil.which(n) or Path(n).exists())]
    if missing:
        msg = (f"failover test needs {', '.join(missing)} (not found); install "
               "redis-server / rabbitmq-server to run it")
        if IN_CI:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


class SentinelCluster:
    """A master, a replica and three Sentinels (quorum 2, down after 1 s)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="qops-sentinel-"))
        self.procs: dict[int, subprocess.Popen[Any]] = {}  # port -> server
        self.redis_ports = [free_port(), free_port()]
        self.sentinel_ports = [free_port() for _ in range(3)]

    # -- starting ------------------------------------------------------------------------
    def _spawn(self, port: int, args: list[str]) -> None:
        log = open(self.dir / f"{port}.log", "ab")  # noqa: SIM115
        self.procs[port] = subprocess.Popen(
            ["redis-server", *args], stdout=log, stderr=subprocess.STDOUT,
            cwd=str(self.dir), start_new_session=True)
        log.close()

    def _start_redis(self, port: int, replica_of: int | None) -> None:
        args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.dir)]
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        self._spawn(port, args)

    def start(self) -> SentinelCluster:
        master, replica = self.redis_ports
        self._start_redis(master, None)
        self._start_redis(replica, master)
        self._wait_link(replica)  # the Sentinels' first INFO of the master then lists it
        # Each Sentinel is told its own id and the other two (known-sentinel) and the
        # replica: otherwise they find each other by hello messages, about 7 s.
        ids = {port: os.urandom(20).hex() for port in self.sentinel_ports}
        for port in self.sentinel_ports:
            conf = self.dir / f"sentinel-{port}.conf"
            known = "".join(f"sentinel known-sentinel {MASTER_NAME} 127.0.0.1 {p} {i}\n"
                            for p, i in ids.items() if p != port)
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel myid {ids[port]}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
                f"sentinel failover-timeout {MASTER_NAME} 5000\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
                f"sentinel known-replica {MASTER_NAME} 127.0.0.1 {replica}\n" + known)
            self._spawn(port, [str(conf), "--sentinel"])
        self.wait_healthy()
        return self

    def _wait_link(self, replica: int) -> None:
        import redis

        def up() -> bool:
            r = redis.Redis(port=replica, socket_timeout=1)
            try:
                return r.info("replication").get("master_link_status") == "up"
            finally:
                r.close()

        _wait(up, 40, f"the replica on port {replica} to sync")

    def wait_healthy(self, timeout: float = 60) -> None:
        """Every Sentinel sees the master, a replica and the two other Sentinels, and
        the replica's link is up (before that a failover aborts: no good replica)."""
        import redis

        def ready() -> bool:
            for port in self.sentinel_ports:
                s = redis.Redis(port=port, socket_timeout=1)
                try:
                    state = s.sentinel_master(MASTER_NAME)
                    if (int(state["num-slaves"]) < 1
                            or int(state["num-other-sentinels"]) < 2):
                        return False
                    replicas = s.sentinel_slaves(MASTER_NAME)
                    if not any(not r["is_sdown"] and r.get("master-link-status") == "ok"
                               for r in replicas):
                        return False
                finally:
                    s.close()
            return True

        _wait(ready, timeout, "the Sentinels to see the master, a replica and each other",
              interval=0.2)
        # the Sentinels' view of a replica is up to 10 s old (a replica restarted by
        # heal() may still be loading its full sync): a WAIT the master answers says
        # the link carries writes now
        master = redis.Redis(port=self.master_port(), socket_timeout=5)
        try:
            _wait(lambda: master.execute_command("WAIT", 1, 1000) >= 1, timeout,
                  "the replica to acknowledge a write", interval=0.1)
        finally:
            master.close()

    # -- facts ---------------------------------------------------------------------------
    def url(self, db: int = 0, **query: str) -> str:
        hosts = ";".join(f"sentinel://127.0.0.1:{p}" for p in self.sentinel_ports)
        q = "&".join(f"{k}={v}" for k, v in {"master_name": MASTER_NAME, **query}.items())
        return f"{hosts}/{db}?{q}"

    def master_port(self) -> int:
        import redis

        for port in self.sentinel_ports:
            s = redis.Redis(port=port, socket_timeout=1)
            try:
                return int(s.sentinel_get_master_addr_by_name(MASTER_NAME)[1])
            except Exception:
                continue
            finally:
                s.close()
        raise RuntimeError("no Sentinel answers")

    def replica_port(self) -> int:
        master = self.master_port()
        return next(p for p in self.redis_ports if p != master)

    # -- faults --------------------------------------------------------------------------
    def kill(self, port: int) -> None:
        _kill_group(self.procs.pop(port))

    def wait_master_not(self, old: int, timeout: float = 20) -> int:
        """The port of the new master once every Sentinel names another than ``old``."""
        _wait(lambda: self.master_port() != old, timeout, "the Sentinels to promote a replica")
        return self.master_port()

    def heal(self) -> None:
        """Start again any Redis server that is down, as a replica of the current
        master, and wait until the Sentinels see it."""
        master = self.master_port()
        for port in self.redis_ports:
            if port not in self.procs:
                self._start_redis(port, master)
        self.wait_healthy()

    def stop(self) -> None:
        for proc in self.procs.values():
            _kill_group(proc)
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")


class RabbitCluster:
    """Three RabbitMQ nodes (``node1@localhost`` ...) in one cluster on 127.0.0.1, with a
    private epmd and one Erlang cookie. Each node runs in the foreground of a process
    group of its own (the script, the Erlang VM and its helpers), killed by pid."""

    NODES = 3

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="qops-rabbit-"))
        self.epmd_port = free_port()
        self.amqp_ports = [free_port() for _ in range(self.NODES)]
        self.dist_ports = [free_port() for _ in range(self.NODES)]
        self.names = [f"node{i + 1}@localhost" for i in range(self.NODES)]
        self.procs: dict[int, subprocess.Popen[Any]] = {}  # node index -> server
        self.epmd: subprocess.Popen[Any] | None = None
        home = self.dir / "home"
        home.mkdir()
        cookie = home / ".erlang.cookie"
        cookie.write_text(os.urandom(16).hex().upper())
        cookie.chmod(0o400)
        (self.dir / "env.conf").write_text("")
        (self.dir / "plugins").write_text("[].\n")
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
            "LANG": "C.UTF-8", "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1", "RABBITMQ_CONF_ENV_FILE": str(self.dir / "env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "plugins"),
        }

    # -- starting ------------------------------------------------------------------------
    def _node_env(self, i: int) -> dict[str, str]:
        base = self.dir / f"n{i + 1}"
        base.mkdir(exist_ok=True)
        conf = base / "rabbitmq.conf"
        peers = "".join(f"cluster_formation.classic_config.nodes.{k + 1} = {n}\n"
                        for k, n in enumerate(self.names))
        conf.write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.amqp_ports[i]}\n"
            "cluster_formation.peer_discovery_backend = classic_config\n" + peers)
        return {**self.env,
                "RABBITMQ_NODENAME": self.names[i],
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(self.amqp_ports[i]),
                "RABBITMQ_DIST_PORT": str(self.dist_ports[i]),
                "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
                "RABBITMQ_LOG_BASE": str(base / "log"),
                "RABBITMQ_CONFIG_FILE": str(conf),
                "RABBITMQ_PID_FILE": str(base / "pid"),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS":
                    "-kernel inet_dist_use_interface {127,0,0,1}"}

    def _start_node(self, i: int) -> None:
        log = open(self.dir / f"node{i + 1}.out", "ab")  # noqa: SIM115
        self.procs[i] = subprocess.Popen(
            [str(RABBIT_BIN / "rabbitmq-server")], env=self._node_env(i), stdout=log,
            stderr=subprocess.STDOUT, cwd=str(self.dir), start_new_session=True)
        log.close()

    def _wait_amqp(self, i: int, timeout: float = 90) -> None:
        def up() -> bool:
            import pika

            params = pika.ConnectionParameters(
                host="127.0.0.1", port=self.amqp_ports[i], connection_attempts=1,
                socket_timeout=2, credentials=pika.PlainCredentials("guest", "guest"))
            pika.BlockingConnection(params).close()
            return True

        _wait(up, timeout, f"RabbitMQ {self.names[i]} to accept connections", interval=0.3)

    def start(self) -> RabbitCluster:
        log = open(self.dir / "epmd.out", "ab")  # noqa: SIM115
        self.epmd = subprocess.Popen(
            ["epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"], env=self.env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        # node1 boots alone first; the others find it (classic_config) and join it as
        # they boot: no stop_app / join_cluster / start_app round of CLI calls
        for i in range(self.NODES):
            self._start_node(i)
        for i in range(self.NODES):
            self._wait_amqp(i)
        try:
            _wait(lambda: self.running() == self.NODES, 20, "the nodes to form a cluster",
                  interval=0.5)
        except RuntimeError:
            # booted at once, a node may have formed a cluster of its own: join it
            # to node1 by hand
            for i in range(1, self.NODES):
                if self.running(via=i) != self.NODES:
                    for args in (["stop_app"], ["reset"], ["join_cluster", self.names[0]],
                                 ["start_app"]):
                        self.ctl(i, *args)
            _wait(lambda: self.running() == self.NODES, 60, "the nodes to form a cluster",
                  interval=0.5)
        return self

    def ctl(self, node: int, *args: str, timeout: float = 60) -> str:
        proc = subprocess.run([str(RABBIT_BIN / "rabbitmqctl"), "-n", self.names[node], *args],
                              env=self.env, capture_output=True, text=True, timeout=timeout,
                              start_new_session=True)
        if proc.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def running(self, via: int | None = None) -> int:
        """How many nodes the cluster has running, asked of a node that is up."""
        node = via if via is not None else min(self.procs)
        out = self.ctl(node, "eval", "length(rabbit_nodes:all_running()).")
        return int(out.strip())

    # -- facts ---------------------------------------------------------------------------
    def url(self, order: list[int] | None = None, vhost: str = "/") -> str:
        from urllib.parse import quote

        v = quote(vhost, safe="")
        return ";".join(f"amqp://guest:guest@127.0.0.1:{self.amqp_ports[i]}/{v}"
                        for i in (order if order is not None else range(self.NODES)))

    # -- faults --------------------------------------------------------------------------
    def kill(self, node: int) -> None:
        _kill_group(self.procs.pop(node))

    def restart(self, node: int) -> None:
        """Start ``node`` again after a kill (it rejoins the cluster from its files)."""
        self._start_node(node)
        self._wait_amqp(node)
        _wait(lambda: self.running(via=node) == self.NODES, 60, "the node to rejoin",
              interval=0.5)

    def stop(self) -> None:
        for proc in self.procs.values():
            _kill_group(proc)
        self.procs.clear()
        if self.epmd is not None:
            _kill_group(self.epmd)
            self.epmd = None
        shutil.rmtree(self.dir, ignore_errors=True)
