"""The App of the example project: ``qops -A proj worker``.

With no configuration it uses the embedded SQLite broker; point it elsewhere with
QOPS_BROKER_URL / QOPS_RESULT_BACKEND or a qops.yaml.
"""

from qops import App

app = App("proj", include=["proj.tasks"])
