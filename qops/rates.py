"""Rate strings ("10/m", "5/s", "3600/h", a number): parsing shared by both sides.

Neutral ground: the remote-control client (``qops/control.py``) checks a rate before
it sends ``rate_limit``, and the worker (``qops/worker/ratelimit.py``) turns it into a
token bucket. A client-side module must not import the worker package, so the parser
lives here, and both import it.
"""

from __future__ import annotations

import math
import re

from qops.errors import UsageError

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*([smh]))?\s*$")


def parse_rate(rate: str | float | int | None) -> float:
    """'10/m' -> tokens per second (0 = no limit). Raises UsageError on bad input."""
    if rate in (None, "", 0):
        return 0.0
    if isinstance(rate, (int, float)) and not isinstance(rate, bool):
        if not (math.isfinite(rate) and rate >= 0):
            raise UsageError(f"invalid rate limit {rate!r}: a rate is 0 (none) or more")
        return float(rate)
    m = _RATE.match(rate) if isinstance(rate, str) else None
    if not m:
        raise UsageError(f"invalid rate limit {rate!r}: use N, N/s, N/m or N/h (e.g. 10/m)")
    per_second = float(m.group(1)) / _UNITS[m.group(2) or "s"]
    if not math.isfinite(per_second):
        raise UsageError(f"invalid rate limit {str(rate)[:40]!r}: too large")
    return per_second
