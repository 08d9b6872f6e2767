"""qops/signing.py on its own: keys, signatures, freshness, replay, rotation."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from qops.errors import ConfigError
from qops.signing import SignatureError, Signer, load_keys, write_key_file

KEY_A, KEY_B = b"a" * 32, b"b" * 32


def test_round_trip_and_tampering() -> None:
    s = Signer([KEY_A], "me@host")
    auth = s.sign("control", b"body")
    assert Signer([KEY_A], "node").verify("control", b"body", auth) == "me@host"
    for purpose, body, context in (("control", b"Body", ""), ("reply", b"body", ""),
                                   ("control", b"body", "ticket")):
        with pytest.raises(SignatureError, match="bad signature"):
            Signer([KEY_A], "node").verify(purpose, body, auth, context)
    forged = {**auth, "sender": "root@elsewhere"}
    with pytest.raises(SignatureError, match="bad signature"):
        Signer([KEY_A], "node").verify("control", b"body", forged)


def test_unsigned_wrong_key_and_malformed() -> None:
    node = Signer([KEY_A], "node")
    with pytest.raises(SignatureError, match="unsigned"):
        node.verify("control", b"x", None)
    with pytest.raises(SignatureError, match="malformed"):
        node.verify("control", b"x", {"sig": 1})
    with pytest.raises(SignatureError, match="bad signature"):
        node.verify("control", b"x", Signer([KEY_B], "c").sign("control", b"x"))


def test_replay_refused() -> None:
    node = Signer([KEY_A], "node")
    auth = Signer([KEY_A], "c").sign("control", b"x")
    node.verify("control", b"x", auth)
    with pytest.raises(SignatureError, match="replayed"):
        node.verify("control", b"x", auth)
    # tasks are not checked for freshness: a redelivery is the same message
    node.verify("task", b"t", Signer([KEY_A], "c").sign("task", b"t"), fresh=False)


def test_stale_refused_skew_tolerated(monkeypatch: pytest.MonkeyPatch) -> None:
    client = Signer([KEY_A], "c")
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now - 120)
    old = client.sign("control", b"x")
    monkeypatch.setattr(time, "time", lambda: now - 30)  # a client clock 30 s behind
    skewed = client.sign("control", b"x")
    monkeypatch.setattr(time, "time", lambda: now)
    node = Signer([KEY_A], "node")
    with pytest.raises(SignatureError, match="stale"):
        node.verify("control", b"x", old)
    node.verify("control", b"x", skewed)


def test_rotation_two_keys() -> None:
    """During a rollover nodes hold [new, old]: both verify; the first signs."""
    rolled = Signer([KEY_B, KEY_A], "node")
    rolled.verify("control", b"x", Signer([KEY_A], "old-client").sign("control", b"x"))
    rolled.verify("control", b"x", Signer([KEY_B], "new-client").sign("control", b"x"))
    reply = rolled.sign("reply", b"r")
    Signer([KEY_B], "new-client").verify("reply", b"r", reply)


def test_key_file_rules(tmp_path: Path) -> None:
    path = tmp_path / "control.key"
    write_key_file(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert len(load_keys(path)[0]) == 64
    with pytest.raises(FileExistsError):
        write_key_file(path)
    os.chmod(path, 0o640)
    load_keys(path)  # group-readable: the service group's
    for mode, says in ((0o644, "other users could read or change it"),
                       (0o660, "its group could change it"),
                       (0o604, "other users could read or change it")):
        os.chmod(path, mode)
        with pytest.raises(ConfigError) as exc:
            load_keys(path)
        assert says in str(exc.value)
        assert "\n" not in str(exc.value)
    os.chmod(path, 0o600)
    path.write_text("# comment\n\n" + "n" * 20 + "\n" + "o" * 20 + "\n")
    assert load_keys(path) == [b"n" * 20, b"o" * 20]
    path.write_text("short\n")
    with pytest.raises(ConfigError, match="shorter than"):
        load_keys(path)
    path.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="holds no key"):
        load_keys(path)
    with pytest.raises(ConfigError, match="No such file"):
        load_keys(tmp_path / "missing.key")
