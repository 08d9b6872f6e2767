"""The project's qops app: ``qops -A djangoproj worker`` finds it here.

This is Celery's ``proj/celery.py`` with one line changed: the import."""

import os

from qops import App

# Set the default Django settings module for the 'qops' program.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djangoproj.settings")

app = App("djangoproj")

# Using a string here means the worker doesn't have to serialize the configuration
# object to child processes. namespace='CELERY' means every setting is read from
# a CELERY_ prefixed name in settings.py (CELERY_BROKER_URL -> broker_url).
app.config_from_object("django.conf:settings", namespace="CELERY")

# Load the task modules (tasks.py) of every installed Django app.
app.autodiscover_tasks()


@app.task(bind=True, ignore_result=True)
def debug_task(self):
    print(f"Request: {self.request!r}")
