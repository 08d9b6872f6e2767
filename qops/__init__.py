"""qops: a fast, scriptable task-queue runtime speaking Celery's protocol.

The names below are imported on first use (PEP 562), so ``qops --help`` and the
broker-only commands don't pay for the parts they don't need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "App": "qops.app",
    "current_app": "qops.app",
    "shared_task": "qops.shared",
    "AsyncResult": "qops.result",
    "GroupResult": "qops.result",
    "Signature": "qops.task",
    "Task": "qops.task",
    "signature": "qops.task",
    "chain": "qops.canvas",
    "chord": "qops.canvas",
    "group": "qops.canvas",
    "crontab": "qops.schedules",
    "ChordError": "qops.errors",
    "MaxRetriesExceeded": "qops.errors",
    "QopsError": "qops.errors",
    "Reject": "qops.errors",
    "Retry": "qops.errors",
    "SoftTimeLimitExceeded": "qops.errors",
    "TimeLimitExceeded": "qops.errors",
    "WorkerLostError": "qops.errors",
}

__all__ = [
    "App", "AsyncResult", "ChordError", "GroupResult", "MaxRetriesExceeded", "QopsError", "Reject",
    "Retry", "Signature", "SoftTimeLimitExceeded", "Task", "TimeLimitExceeded",
    "WorkerLostError", "__version__", "chain", "chord", "crontab", "current_app", "group",
    "shared_task", "signature",
]

if TYPE_CHECKING:
    from qops.app import App, current_app
    from qops.canvas import chain, chord, group
    from qops.errors import (
        ChordError,
        MaxRetriesExceeded,
        QopsError,
        Reject,
        Retry,
        SoftTimeLimitExceeded,
        TimeLimitExceeded,
        WorkerLostError,
    )
    from qops.result import AsyncResult, GroupResult
    from qops.schedules import crontab
    from qops.shared import shared_task
    from qops.task import Signature, Task, signature


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qops' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
