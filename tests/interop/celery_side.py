"""A tiny Celery app for the interop tests (run by a real Celery worker)."""

import os

from celery import Celery

app = Celery("celery_side", broker=os.environ.get("INTEROP_BROKER"),
             backend=os.environ.get("INTEROP_BACKEND"))


@app.task(name="celery_side.mul")
def mul(x, y):
    return x * y


# Queue settings the declaration tests give both sides (unset: Celery's defaults).
if os.environ.get("INTEROP_DEFAULT_QUEUE"):
    app.conf.task_default_queue = os.environ["INTEROP_DEFAULT_QUEUE"]
if os.environ.get("INTEROP_MISSING_QUEUE_TYPE"):
    app.conf.task_create_missing_queue_type = os.environ["INTEROP_MISSING_QUEUE_TYPE"]
