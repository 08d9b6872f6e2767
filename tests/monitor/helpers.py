"""Running ``qops exporter`` in tests, scraping it, and reading the exposition with
prometheus_client's parser."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

from tests.helpers import ROOT, qops_env, stop_group, wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


class ExporterProcess:
    """``qops exporter`` on a free port, stopped by its process group."""

    def __init__(self, broker: str, *args: str, compat: str = "qops") -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qops", "-b", broker, "--compat", compat, "exporter", "--bind", "127.0.0.1",
             "--port", str(self.port), "--interval", "0.3", *args],
            env=qops_env(), cwd=str(ROOT), stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def get(self, path: str = "/metrics") -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def scrape(self) -> dict[Any, float]:
        code, text = self.get()
        return parse(text) if code == 200 else {}

    def wait_for(self, name: str, value: float, timeout: float = 30, **labels: str) -> bool:
        return wait_until(lambda: sample(self.scrape(), name, **labels) == value,
                          timeout, interval=0.3)

    def __enter__(self) -> ExporterProcess:
        assert wait_until(lambda: self.get("/healthz")[0] == 200, 30), self.stop_and_log()
        return self

    def stop_and_log(self) -> str:
        self.stop()
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            stop_group(self.proc)

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
