"""qops: a fast, scriptable task-queue runtime speaking Celery's protocol."""

from __future__ import annotations

from qops.app import App, current_app
from qops.canvas import chain, chord, group
from qops.errors import (
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
from qops.task import Signature, Task, signature

__version__ = "0.1.0"

__all__ = [
    "App",
    "AsyncResult",
    "GroupResult",
    "MaxRetriesExceeded",
    "QopsError",
    "Reject",
    "Retry",
    "Signature",
    "SoftTimeLimitExceeded",
    "Task",
    "TimeLimitExceeded",
    "WorkerLostError",
    "chain",
    "chord",
    "crontab",
    "group",
    "current_app",
    "signature",
    "__version__",
]
