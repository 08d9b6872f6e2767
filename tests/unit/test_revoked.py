"""Revoked ids: bounded, expiring, kept in a state file (qops/worker/state.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from qops.worker.state import Revoked


def test_bounded_and_expiring() -> None:
    r = Revoked(maxlen=3, expires=60)
    r.update(["a", "b", "c", "d"])
    assert list(r) == ["b", "c", "d"] and "a" not in r
    r.merge([("old", time.time() - 61)])
    r.update(["e"])
    assert "old" not in r and list(r) == ["c", "d", "e"]


def test_state_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "w1.db"
    r = Revoked()
    r.load(str(path))  # no file yet: a first start
    assert len(r) == 0
    r.update(["x", "y"])
    r.save()
    assert json.loads(path.read_text())["qops_state"] == 1
    again = Revoked()
    again.load(str(path))
    assert list(again) == ["x", "y"]
    assert [p.name for p in tmp_path.iterdir()] == ["w1.db"]  # no temporary file left


def test_unreadable_state_file_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "bad.db"
    path.write_text("not json")
    r = Revoked()
    r.load(str(path))
    assert len(r) == 0
    r.update(["z"])
    r.save()
    assert json.loads(path.read_text())["revoked"][0][0] == "z"
