"""Checks of the values an operator gives qops: remote-control arguments and settings.

One checker per kind of value, used wherever that kind arrives: the remote-control
client before it sends anything (``qops/control.py``), the worker before it applies a
command (``qops/worker/control.py``, which must also survive clients that never
checked: other tools, Celery's), and every setting from code, YAML, environment or
command line (``qops/settings.py``). Neutral ground like ``qops/rates.py``: it imports
nothing of the worker, so client-side modules can use it.

Each checker returns the value in its one accepted form or raises ``UsageError``
saying what is accepted; callers add where the value came from.
"""

from __future__ import annotations

import math
import os
import re
import signal
from collections.abc import Callable
from typing import Any, TypeVar

from qops.errors import UsageError
from qops.rates import parse_rate

#: the longest time limit or interval: setitimer() and time_t take about 31 years
MAX_SECONDS = 1e9
#: the most pool processes a node can have (the prefork pool's shared slot table)
MAX_POOL_SIZE = 1024
#: longest queue name: AMQP's short string
MAX_QUEUE_NAME = 255


def number(value: Any, what: str, *, above: float | None = None,
           at_least: float | None = None, at_most: float | None = None,
           whole: bool = False) -> Any:
    """``value`` as a finite float (an int with ``whole``) within the bounds; numbers
    in strings (from the command line or the environment) are read."""
    kind = "a whole number" if whole else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UsageError(f"{what} must be {kind}, not {value!r}")
    try:
        out: Any = float(value)
        if whole:
            if isinstance(value, float) or not float(value).is_integer():
                raise ValueError
            out = int(value)
    except (ValueError, OverflowError):
        raise UsageError(f"{what} must be {kind}, not {value!r}") from None
    if not math.isfinite(out):
        raise UsageError(f"{what} must be a finite number, not {value!r}")
    if above is not None and not out > above:
        raise UsageError(f"{what} must be greater than {above:g}, not {value!r}")
    if at_least is not None and out < at_least:
        raise UsageError(f"{what} must be at least {at_least:g}, not {value!r}")
    if at_most is not None and out > at_most:
        raise UsageError(f"{what} must be at most {at_most:g}, not {value!r}")
    return out


def seconds(value: Any, what: str) -> float:
    """A time limit or an interval: more than 0, at most ``MAX_SECONDS``."""
    return float(number(value, what, above=0, at_most=MAX_SECONDS))


def time_limits(soft: Any, hard: Any) -> tuple[float | None, float | None]:
    """A task's (soft, hard) limits: each None (no limit) or seconds; soft < hard."""
    soft_s = None if soft is None else seconds(soft, "the soft time limit")
    hard_s = None if hard is None else seconds(hard, "the hard time limit")
    if soft_s is not None and hard_s is not None and not soft_s < hard_s:
        raise UsageError(f"the soft time limit ({soft_s:g}) must be less than the hard "
                         f"one ({hard_s:g})")
    return soft_s, hard_s


def pool_size(value: Any, what: str, at_least: int = 1) -> int:
    return int(number(value, what, at_least=at_least, at_most=MAX_POOL_SIZE, whole=True))


def signal_name(value: Any) -> str:
    """A signal for ``revoke --terminate``: TERM, SIGKILL, 9... -> its name (SIGKILL)."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return signal.Signals(value).name
        except ValueError:
            raise UsageError(f"unknown signal {value}") from None
    if not isinstance(value, str):
        raise UsageError(f"a signal must be a name like TERM or KILL, not {value!r}")
    if value.strip().isdigit():
        return signal_name(int(value))
    name = value.strip().upper()
    name = name if name.startswith("SIG") else "SIG" + name
    if name not in signal.Signals.__members__ or name in ("SIG_DFL", "SIG_IGN"):
        raise UsageError(f"unknown signal {value!r} (e.g. TERM, INT, KILL)")
    return signal.Signals[name].name


_BAD_QUEUE_CHARS = re.compile(r"[\s,\x00-\x1f\x7f]")


def queue_name(value: Any) -> str:
    """A queue to consume: no blanks, commas or control characters, at most 255 bytes,
    not ``amq.*`` (RabbitMQ keeps those; the rule holds on every transport)."""
    if not isinstance(value, str) or not value:
        raise UsageError(f"a queue name must be a non-empty string, not {value!r}")
    if _BAD_QUEUE_CHARS.search(value):
        raise UsageError(f"queue name {value!r} has blanks, commas or control characters")
    if len(value.encode("utf-8")) > MAX_QUEUE_NAME:
        raise UsageError(f"queue name {value[:40]!r}... is longer than 255 bytes")
    if value.startswith("amq."):
        raise UsageError(f"queue name {value!r}: names starting with 'amq.' are reserved")
    return value


def names(value: str | None, what: str) -> list[str] | None:
    """A comma-separated list typed on the command line (``-Q``, ``-X``, ``-d``): None
    when the option was not given. An empty item -- ``-Q "$QUEUES"`` with the variable
    unset, ``a,,b`` -- is a usage error: never read as "every queue" or "every node"."""
    if value is None:
        return None
    items = [v.strip() for v in value.split(",")]
    if not all(items):
        raise UsageError(f"{what}: an empty name in {value!r} (an unset variable?); "
                         "give the names, comma separated")
    return items


_Path = TypeVar("_Path", bound="str | os.PathLike[str]")


def file_name(value: _Path | None, what: str) -> _Path | None:
    """A file name given as an option (``--logfile "$LOG"``): None when not given; an
    empty one is a usage error, never read as "no file" or "the default file"."""
    given: Any = value
    if given is not None and not os.fspath(given).strip():
        raise UsageError(f"{what}: an empty file name (an unset variable?)")
    return value


def task_name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"a task name must be a non-empty string, not {value!r}")
    return value


def task_ids(value: Any, what: str = "task id") -> str | list[str]:
    """One id or a list of ids, each a non-empty string."""
    ids = [value] if isinstance(value, str) else value
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        raise UsageError(f"{what} must be a string or a list of strings, not {value!r}")
    return value


def flag(value: Any, what: str) -> bool:
    if value is None:
        return False
    if type(value) is int and value in (0, 1):  # Flower's revoke sends terminate=0
        return bool(value)
    if not isinstance(value, bool):
        raise UsageError(f"{what} must be true or false, not {value!r}")
    return value


# -- remote control ---------------------------------------------------------------------


def expired(value: Any, now: float) -> bool:
    """Whether a control message's ``expires`` header (a Unix time) has passed. 0 or
    absent means never: kombu sends 0 when the client gave no timeout. Raises
    UsageError for anything but a number: the message is malformed."""
    if value is None:
        return False
    when = number(value, "the expires header")
    return when != 0 and when < now


def target(destination: Any, pattern: Any,
           matcher: Any) -> tuple[list[str] | None, Callable[[str], bool] | None]:
    """Which nodes a control message is for: (exact node names or None, a test of a
    node name by ``pattern`` -- a glob, or a regular expression with matcher
    ``pcre`` -- or None). Neither: every node."""
    exact: list[str] | None = None
    if destination:
        exact = [destination] if isinstance(destination, str) else destination
        if not isinstance(exact, list) or not all(isinstance(n, str) for n in exact):
            raise UsageError(f"destination must be a list of node names, not {destination!r}")
    if not pattern:
        return exact, None
    if not isinstance(pattern, str):
        raise UsageError(f"pattern must be a string, not {pattern!r}")
    if matcher in (None, "glob"):
        import fnmatch

        return exact, lambda name: fnmatch.fnmatchcase(name, pattern)
    if matcher != "pcre":
        raise UsageError(f"matcher must be glob or pcre, not {matcher!r}")
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"invalid pcre pattern {pattern!r}: {exc}") from None
    return exact, lambda name: regex.search(name) is not None


def _time_limit(a: dict[str, Any]) -> None:
    a["task_name"] = task_name(a.get("task_name"))
    a["soft"], a["hard"] = time_limits(a.get("soft"), a.get("hard"))


def _rate_limit(a: dict[str, Any]) -> None:
    a["task_name"] = task_name(a.get("task_name"))
    if "rate_limit" not in a:
        raise UsageError("rate_limit needs a rate_limit (e.g. 10/m; 0 removes it)")
    parse_rate(a["rate_limit"])


def _queue(a: dict[str, Any]) -> None:
    a["queue"] = queue_name(a.get("queue"))


def _resize(a: dict[str, Any]) -> None:
    a["n"] = pool_size(a.get("n", 1), "n")


def _autoscale(a: dict[str, Any]) -> None:
    a["max"] = pool_size(a.get("max"), "max")
    a["min"] = pool_size(a.get("min"), "min", at_least=0)
    if a["max"] < a["min"]:
        raise UsageError(f"max ({a['max']}) must be at least min ({a['min']})")


def _revoke(a: dict[str, Any]) -> None:
    a["task_id"] = task_ids(a.get("task_id"))
    a["terminate"] = flag(a.get("terminate"), "terminate")
    for key in ("signal", "signal_name"):
        if a.get(key) is not None:
            a[key] = signal_name(a[key])


def _terminate(a: dict[str, Any]) -> None:
    a["task_id"] = task_ids(a.get("task_id"))
    a["signal"] = signal_name(a.get("signal") or "SIGTERM")


def _pool_restart(a: dict[str, Any]) -> None:
    modules = a.get("modules")
    if modules is not None:
        if isinstance(modules, str):
            modules = [modules]
        if not isinstance(modules, list) or not all(
                isinstance(m, str) and m for m in modules):
            raise UsageError(f"modules must be a list of module names, not {modules!r}")
        a["modules"] = modules
    a["reload"] = flag(a.get("reload", False), "reload")


def _query_task(a: dict[str, Any]) -> None:
    a["ids"] = task_ids(a.get("ids"), "ids")


def _conf(a: dict[str, Any]) -> None:
    a["with_defaults"] = flag(a.get("with_defaults"), "with_defaults")


_ARGUMENTS: dict[str, Callable[[dict[str, Any]], None]] = {
    "time_limit": _time_limit, "rate_limit": _rate_limit,
    "add_consumer": _queue, "cancel_consumer": _queue,
    "pool_grow": _resize, "pool_shrink": _resize, "autoscale": _autoscale,
    "revoke": _revoke, "query_task": _query_task, "conf": _conf,
    "terminate": _terminate, "pool_restart": _pool_restart,
}


def check_arguments(method: str, arguments: Any) -> dict[str, Any]:
    """The arguments of a control command, checked and in their one form; raises
    UsageError naming the command and the bad value. Keys a command does not check
    (the extra ones Celery's clients send) are passed on as they are."""
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise UsageError(f"{method}: arguments must be an object, not {arguments!r}")
    out = dict(arguments)
    check = _ARGUMENTS.get(method)
    if check is not None:
        try:
            check(out)
        except UsageError as exc:
            raise UsageError(f"{method}: {exc}") from None
    return out
