"""A tiny Celery app for the interop tests (run by a real Celery worker)."""

import os

from celery import Celery

app = Celery("celery_side", broker=os.environ.get("INTEROP_BROKER"),
             backend=os.environ.get("INTEROP_BACKEND"))


@app.task(name="celery_side.mul")
def mul(x, y):
    return x * y
