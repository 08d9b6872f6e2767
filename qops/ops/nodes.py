"""Node names and the one ``%`` template grammar (docs/commands.md, "multi" and "Templates").

For node ``w1@web.example.com``: ``%n`` w1, ``%h`` web.example.com, ``%d`` example.com,
``%p`` w1@web.example.com, ``%i`` pool process index (0 in the main process), ``%I``
"" in the main process and ``-N`` in child N, ``%%`` a literal %.
Celery's ``multi`` gives ``%h`` another meaning (the full node name); qops's is above.

A node name is also a file name (``%n.pid``, ``%n%I.log``) and a routing key, so
``check_name`` holds every entry point (multi, ``worker -n``, ``beat``, generate) to one
rule: the name part is 1..64 of ``A-Z a-z 0-9 . _ -`` (not starting with ``.`` or ``-``,
no ``..``); the host part is a host name (labels of those characters, 253 at most).
"""


from __future__ import annotations

import re
import socket

from qops.errors import UsageError

_KEY = re.compile(r"%(.)?", re.DOTALL)
KEYS = "nhdpiI%"


NAME_MAX = 64
HOST_MAX = 253
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_HOST = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?")


def check_name(node: str) -> str:
    """``node`` (``name`` or ``name@host``, templates already expanded) if it is a valid
    node name; else a one-line UsageError (exit 2) saying what a name may hold."""
    name, sep, host = node.partition("@")
    rule = (f"a node name is NAME or NAME@HOST: NAME of 1..{NAME_MAX} letters, digits, "
            "'.', '_' or '-' (e.g. w1, w1@%h, celery@host.example.com)")
    if not name:
        raise UsageError(f"node name {node!r} has an empty name part: {rule}")
    if len(name) > NAME_MAX or not _NAME.fullmatch(name) or ".." in name:
        raise UsageError(f"bad node name {node!r}: {rule}")
    if sep and (not host or len(host) > HOST_MAX or not _HOST.fullmatch(host)):
        raise UsageError(f"bad host part in node name {node!r}: after '@' comes a host "
                         "name (letters, digits, '-', '_', dot-separated), or %h")
    return node


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
    """The full node name for ``-n`` (templates in the host part are expanded); None
    (no ``-n``) gives the default. An empty name is an error, not the default."""
    if name is None:
        return f"{default_prefix}@{hostname()}"
    local, sep, host = name.partition("@")
    host = host if sep else hostname()
    if "%" in host:
        host = expand(host, f"x@{hostname()}")
    if "%" in local:
        local = expand(local, f"x@{host}")
    return check_name(f"{local}@{host}")
