"""Node names and the one ``%`` template grammar (docs/commands.md, "multi" and "Templates").

For node ``w1@web.example.com``: ``%n`` w1, ``%h`` web.example.com, ``%d`` example.com,
``%p`` w1@web.example.com, ``%i`` pool process index (0 in the main process), ``%I``
"" in the main process and ``-N`` in child N, ``%%`` a literal %.
Celery's ``multi`` gives ``%h`` another meaning (the full node name); qops's is above.
"""

from __future__ import annotations

import re
import socket

from qops.errors import UsageError

_KEY = re.compile(r"%(.)?", re.DOTALL)
KEYS = "nhdpiI%"


def hostname() -> str:
    # gethostname, as Celery: getfqdn may wait on DNS and often says "localhost"
    return socket.gethostname()


def split_node(node: str) -> tuple[str, str]:
    name, sep, host = node.partition("@")
    return name, (host if sep else hostname())


def expand(template: str, node: str, index: int | None = None) -> str:
    """Fill ``template`` for ``node`` (a full ``name@host``) and pool ``index``."""
    name, host = split_node(node)
    domain = host.partition(".")[2]

    def sub(m: re.Match[str]) -> str:
        key = m.group(1)
        if key == "n":
            return name
        if key == "h":
            return host
        if key == "d":
            return domain
        if key == "p":
            return f"{name}@{host}"
        if key == "i":
            return str(index or 0)
        if key == "I":
            return f"-{index}" if index else ""
        if key == "%":
            return "%"
        if key is None:
            raise UsageError(f"template {template!r} ends with a lone '%' (write %% for a %)")
        raise UsageError(f"unknown template key %{key} in {template!r}: "
                         f"use %n %h %d %p %i %I or %%")

    return _KEY.sub(sub, template)


def node_name(name: str | None, default_prefix: str = "qops") -> str:
    """The full node name for ``-n`` (templates in the host part are expanded)."""
    if not name:
        return f"{default_prefix}@{hostname()}"
    local, sep, host = name.partition("@")
    host = host if sep else hostname()
    if "%" in host:
        host = expand(host, f"x@{hostname()}")
    if "%" in local:
        local = expand(local, f"x@{host}")
    return f"{local}@{host}"
