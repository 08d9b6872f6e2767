"""The embedded transport: one SQLite file shared by every process on the machine.

Modules: ``transport.py`` (``SQLiteTransport`` and the database it opens, ``SQLiteDB``),
``consumer.py`` (the work and reply consumers, their leases), ``url.py`` (the URL and
the checks made before a file is opened). The layout of the file is in
docs/protocol.md section 7."""

from qops.transports.sqlite.transport import SQLiteDB, SQLiteTransport
from qops.transports.sqlite.url import path_from_url

__all__ = ["SQLiteDB", "SQLiteTransport", "path_from_url"]
