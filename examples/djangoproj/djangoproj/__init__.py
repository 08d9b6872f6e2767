# The app is made when Django starts, so that @shared_task uses it (as in Celery's
# "First steps with Django").
from .celery import app as celery_app

__all__ = ("celery_app",)
