"""Sending compressed task messages (task_compression, apply_async(compression=...)),
as kombu compresses them, and the decompressed-size cap."""

from __future__ import annotations

import uuid

import pytest

from qops import App
from qops.compression import decompress
from qops.errors import ConfigError, UsageError
from qops.protocol import Message, build_task_message


def sent(app: App, **options: object) -> tuple[Message, Message]:
    """(the message on the broker, what a consumer is handed) for one task sent."""
    queue = f"q-{uuid.uuid4().hex[:6]}"
    app.send_task("t.add", [1, 2], queue=queue, **options)
    raw = app.transport.state.queues[queue][0]  # type: ignore[attr-defined]
    from qops.protocol import decode_envelope

    c = app.transport.consumer([queue], 1)
    try:
        d = c.get(1)
        assert d is not None and d.error is None and d.message is not None
        return decode_envelope(raw), d.message
    finally:
        c.close()


@pytest.mark.parametrize(("name", "kind"), [
    ("gzip", "application/x-gzip"), ("zlib", "application/x-gzip"),
    ("bzip2", "application/x-bz2"), ("lzma", "application/x-lzma"),
    ("xz", "application/x-lzma")])
def test_apply_async_compression_is_kombus(name: str, kind: str) -> None:
    import kombu.compression

    app = App("c", broker=f"memory://{uuid.uuid4().hex}")
    try:
        wire, handed = sent(app, compression=name)
        assert wire.headers["compression"] == kind
        assert kombu.compression.decompress(wire.body, kind) == handed.body
        assert handed.body.startswith(b"[[1,2],{}")
    finally:
        app.close()


def test_task_compression_setting_and_none_by_default() -> None:
    app = App("c", broker=f"memory://{uuid.uuid4().hex}", task_compression="bzip2")
    plain = App("p", broker=f"memory://{uuid.uuid4().hex}")
    try:
        wire, _ = sent(app)
        assert wire.headers["compression"] == "application/x-bz2"
        wire, _ = sent(plain)
        assert "compression" not in wire.headers
    finally:
        app.close()
        plain.close()


def test_unknown_compression_is_a_one_line_error() -> None:
    app = App("c", broker=f"memory://{uuid.uuid4().hex}")
    try:
        with pytest.raises(UsageError, match="unknown compression 'zstd'"):
            app.send_task("t.add", [1, 2], compression="zstd")
    finally:
        app.close()
    with pytest.raises(ConfigError, match="task_compression"):
        App("c", task_compression="snappy")


def test_decompressed_size_is_capped() -> None:
    import zlib

    msg = build_task_message("t.add", [1], {})
    bomb = Message(body=zlib.compress(bytes(2000)), headers={"compression": "gzip"})
    with pytest.raises(ValueError, match="more than 1000 bytes"):
        decompress(bomb, limit=1000)
    assert decompress(bomb, limit=2000).body == bytes(2000)
    assert decompress(msg) is msg  # nothing to do without the header
