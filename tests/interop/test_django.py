"""The Django recipe end to end (docs/celery.md): the example project
(examples/djangoproj: Celery's "First steps with Django" layout, CELERY_* settings,
``@shared_task`` in an installed app's tasks.py), driven through Django's test client,
its tasks run by a real ``qops -A djangoproj worker``.

``delay_on_commit`` is checked three ways: a vote rolled back sends nothing; inside a
transaction nothing is sent until it commits; and the worker, which reads the
database, counts the committed vote.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

from tests.helpers import EXAMPLES, WorkerProcess, qops_env, wait_until

STEP1 = '''
import json, django
django.setup()
from django.core.management import call_command
from django.db import transaction
from django.test import Client
from djangoproj import celery_app
from polls.models import Question

call_command("migrate", verbosity=0)
q = Question.objects.create(text="qops?")
client = Client()

def waiting():
    return sum(s.ready for s in celery_app.transport.queue_stats([celery_app.default_queue]))

vetoed = client.post(f"/polls/{q.id}/vote/", {"veto": "1"}).status_code
after_veto = waiting()
with transaction.atomic():  # the view's transaction is part of this one
    voted = client.post(f"/polls/{q.id}/vote/").status_code
    inside = waiting()
print(json.dumps({"question": q.id, "vetoed": vetoed, "after_veto": after_veto,
                  "voted": voted, "inside": inside, "after_commit": waiting()}))
'''

STEP2 = '''
import json, sys, django
django.setup()
from django.test import Client
from djangoproj import celery_app

q = int(sys.argv[1])
client = Client()
voted = client.post(f"/polls/{q}/vote/").status_code
reply = client.post(f"/polls/{q}/recount/")
task_id = reply.json()["task_id"]
print(json.dumps({"voted": voted, "recount": reply.status_code,
                  "result": celery_app.AsyncResult(task_id).get(timeout=30)}))
'''


def run_script(code: str, site: Path, env: dict[str, str], *args: str) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=str(site), env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def tallies(db: Path) -> list[int]:
    with sqlite3.connect(db) as conn:
        try:
            return [v for (v,) in conn.execute("SELECT votes FROM polls_tally ORDER BY id")]
        except sqlite3.OperationalError:  # locked by a writer: ask again
            return []


def test_django_project_on_a_qops_worker(redis_url: str, tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(EXAMPLES / "djangoproj", site,
                    ignore=shutil.ignore_patterns("__pycache__", "db.sqlite3"))
    db = tmp_path / "db.sqlite3"
    queue = f"django-{uuid.uuid4().hex[:8]}"
    env = qops_env(DJANGO_SETTINGS_MODULE="djangoproj.settings", DJANGO_DB=str(db),
                   CELERY_BROKER_URL=redis_url, CELERY_RESULT_BACKEND=redis_url,
                   CELERY_TASK_DEFAULT_QUEUE=queue)
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    # the settings file reads CELERY_TASK_DEFAULT_QUEUE like any other CELERY_ name
    settings = site / "djangoproj" / "settings.py"
    settings.write_text(settings.read_text() + "\nCELERY_TASK_DEFAULT_QUEUE = "
                        "os.environ['CELERY_TASK_DEFAULT_QUEUE']\n")

    first = run_script(STEP1, site, env)
    assert first["vetoed"] == 409 and first["after_veto"] == 0  # rolled back: not sent
    assert first["voted"] == 202 and first["inside"] == 0  # not before the commit
    assert first["after_commit"] == 1  # sent by the commit

    # the settings come from Django: no -b, no QOPS_* variable
    worker = WorkerProcess("-c", "1", broker=redis_url, app="djangoproj", env=env,
                           logfile=tmp_path / "worker.log")
    at = worker.args.index("-b")
    del worker.args[at:at + 2]
    with worker:
        assert wait_until(lambda: tallies(db) == [1], 30), \
            (tmp_path / "worker.log").read_text()
        second = run_script(STEP2, site, env, str(first["question"]))
        assert second == {"voted": 202, "recount": 202, "result": 2}
        assert wait_until(lambda: tallies(db) == [1, 2, 2], 10)
    log = (tmp_path / "worker.log").read_text()
    assert "polls.tasks.tally_votes" in log  # autodiscovered: listed in the banner
    assert "Traceback" not in log, log
