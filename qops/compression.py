"""Compressed message bodies, as kombu writes them: the body replaced by its compressed
bytes and the ``compression`` header naming the codec (a MIME type). stdlib codecs only."""

from __future__ import annotations

from typing import Any

from qops.errors import UsageError
from qops.protocol import Message

#: the ``compression`` header values kombu writes (a MIME type) and the names it takes
#: for them; only the stdlib's codecs (kombu's brotli and zstd need other packages)
COMPRESSIONS = {"application/x-gzip": "zlib", "application/x-bz2": "bz2",
                "application/x-lzma": "lzma"}
COMPRESSION_NAMES = {"gzip": "application/x-gzip", "zlib": "application/x-gzip",
                     "bzip2": "application/x-bz2", "bzip": "application/x-bz2",
                     "lzma": "application/x-lzma", "xz": "application/x-lzma"}
#: decompressed bodies are cut off past this many bytes unless told otherwise (the
#: default task_max_message_size): a small "zip bomb" must not fill a worker's memory
MAX_DECOMPRESSED = 16 * 1024 * 1024


def compression_type(name: Any) -> str:
    """The ``compression`` header value for ``name`` (an alias like 'gzip' or the MIME
    type itself); UsageError for one qops can't produce."""
    text = str(name).strip().lower()
    if text in COMPRESSIONS:
        return text
    if text in COMPRESSION_NAMES:
        return COMPRESSION_NAMES[text]
    raise UsageError(f"unknown compression {name!r}: use gzip (zlib), bzip2 or lzma (xz)")


def compress(message: Message, name: str) -> None:
    """Compress ``message``'s body in place as kombu does: the body replaced by its
    compressed bytes, the header ``compression`` set to the MIME type."""
    kind = compression_type(name)
    module = COMPRESSIONS[kind]
    import bz2
    import lzma
    import zlib

    codec: Any = {"zlib": zlib, "bz2": bz2, "lzma": lzma}[module]
    message.body = codec.compress(message.body)
    message.headers["compression"] = kind


def decompress(message: Message, limit: int = MAX_DECOMPRESSED) -> Message:
    """``message`` with its body decompressed and the ``compression`` header gone (the
    message itself when it has none). ValueError with the reason for an unknown codec, a
    corrupt or truncated body, or one that decompresses to more than ``limit`` bytes
    (decompressing stops there)."""
    kind = message.headers.get("compression")
    if not kind:
        return message
    text = str(kind).strip().lower()
    module = COMPRESSIONS.get(COMPRESSION_NAMES.get(text, text))
    if module is None:
        raise ValueError(f"compression {kind!r} is not supported (gzip, bzip2 or lzma)")
    import bz2
    import lzma
    import zlib

    makers: dict[str, Any] = {"zlib": zlib.decompressobj, "bz2": bz2.BZ2Decompressor,
                              "lzma": lzma.LZMADecompressor}
    d = makers[module]()
    try:
        body = d.decompress(message.body, limit + 1)
    except (zlib.error, OSError, lzma.LZMAError, EOFError, ValueError) as exc:
        raise ValueError(f"corrupt {kind} body: {' '.join(str(exc).split())}") from None
    if len(body) > limit:
        raise ValueError(f"{kind} body decompresses to more than {limit} bytes "
                         "(task_max_message_size)")
    if not d.eof:
        raise ValueError(f"truncated {kind} body")
    headers = {k: v for k, v in message.headers.items() if k != "compression"}
    return Message(body=body, headers=headers, properties=message.properties,
                   content_type=message.content_type,
                   content_encoding=message.content_encoding)
