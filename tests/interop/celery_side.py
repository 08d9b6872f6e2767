"""A tiny Celery app for the interop tests (run by a real Celery worker). The ``proj.tasks``
ones have the names, arguments and results of examples/proj's, so a queue can be served
by a Celery worker and a qops worker alike."""

import os
import time

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


@app.task(name="proj.tasks.add")
def proj_add(x, y):
    return x + y


@app.task(name="proj.tasks.mul")
def proj_mul(x, y):
    return x * y


@app.task(name="proj.tasks.xsum")
def proj_xsum(numbers):
    return sum(numbers)


@app.task(name="proj.tasks.sleep")
def proj_sleep(seconds):
    time.sleep(seconds)
    return seconds


@app.task(name="proj.tasks.fail")
def proj_fail(message="kaboom"):
    raise ValueError(message)
