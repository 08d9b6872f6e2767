"""Fixtures of the security tests: the three brokers that work across processes, and a
key file made for the test."""

from __future__ import annotations

from pathlib import Path

import pytest

from qops.signing import write_key_file


@pytest.fixture
def broker(real_broker_url: str) -> str:
    return real_broker_url


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "qops.key"
    write_key_file(path)
    return path
