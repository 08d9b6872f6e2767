"""An older deployment of the example app: it knows ``proj.tasks.add`` only.

``qops -A tests.faults.oldapp worker`` dead-letters every other ``proj.tasks.*`` task as
unknown; once the new code runs, ``qops dlq requeue`` sends those messages back.
"""

from qops import App

app = App("proj")


@app.task(name="proj.tasks.add")
def add(x: float, y: float) -> float:
    return x + y
