"""The rest of Celery 5's remote-control commands, on the worker side: ``clock``,
``heartbeat``, ``hello``, ``election``, ``terminate``, ``pool_restart``, the memory
commands, and the old ``dump_*`` names (control.py registers them by importing this).

What qops cannot do is answered with an error saying why, never left as "unknown
command": ``election`` (qops nodes do not gossip), ``revoke_by_stamped_headers`` (no
stamping), ``memsample``/``memdump``/``objgraph`` (Celery needs psutil or objgraph
for them; ``stats`` has the process's rusage).
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import TYPE_CHECKING, Any

from qops.worker.control import handler, run_command, task_handler

if TYPE_CHECKING:
    from qops.worker.consumer import ConsumerLoop
    from qops.worker.worker import Worker

log = logging.getLogger("qops.worker")

#: Celery's older names of inspect commands (``dump_tasks`` is ``registered``...)
ALIASES = {"dump_tasks": "registered", "dump_schedule": "scheduled",
           "dump_reserved": "reserved", "dump_active": "active",
           "dump_revoked": "revoked", "dump_conf": "conf"}


def clock_of(worker: Worker) -> int:
    """The node's logical clock: its events' (Lamport) clock, else the control one."""
    if worker.events is not None:
        return int(worker.events.clock)
    return int(getattr(worker.control, "clock", 0) or 0)


@handler
def handle_clock(worker: Worker) -> dict[str, Any]:
    return {"clock": clock_of(worker)}


@handler
def handle_heartbeat(worker: Worker) -> dict[str, Any]:
    """Send a worker-heartbeat event (and refresh the node's liveness) now."""
    worker._beat("worker-heartbeat")
    return {"ok": "heartbeat sent"}


@handler
def handle_hello(worker: Worker, from_node: str | None = None, revoked: Any = None,
                 **kwargs: Any) -> dict[str, Any] | None:
    """Celery's mingle at start-up: take the sender's revoked ids, answer with ours."""
    if from_node == worker.hostname:
        return None
    if revoked:
        ids = sorted(revoked) if isinstance(revoked, (dict, list, set)) else [str(revoked)]
        run_command(worker, "revoke", {"task_id": [str(i) for i in ids]})
    return {"revoked": sorted(worker.loop.revoked), "clock": clock_of(worker)}


@handler
def handle_election(worker: Worker, id: Any = None, topic: Any = None,  # noqa: A002
                    action: Any = None, **kwargs: Any) -> dict[str, Any]:
    return {"error": "election: qops nodes do not gossip, so they hold no elections"}


@task_handler
def handle_revoke_by_stamped_headers(loop: ConsumerLoop, headers: Any = None,
                                     **kwargs: Any) -> dict[str, Any]:
    return {"error": "revoke_by_stamped_headers: qops does not stamp tasks; revoke "
                     "them by id"}


@handler
def handle_terminate(worker: Worker, signal: str = "SIGTERM", task_id: Any = None,
                     **kwargs: Any) -> Any:
    """Celery's ``terminate``: ``revoke`` with ``terminate=True``."""
    return run_command(worker, "revoke",
                       {"task_id": task_id, "terminate": True, "signal": signal})


def _unsupported(name: str, needs: str) -> Any:
    def reply(worker: Worker, **kwargs: Any) -> dict[str, Any]:
        return {"error": f"{name}: not available in qops (Celery needs {needs} for it); "
                         "'inspect stats' has the process's rusage (maxrss)"}

    reply.__name__ = f"handle_{name}"
    return handler(reply)


_unsupported("memsample", "psutil")
_unsupported("memdump", "psutil")
_unsupported("objgraph", "the objgraph package")


def task_modules(worker: Worker) -> list[str]:
    """The modules the node's tasks come from (Celery: ``loader.task_modules``)."""
    names = {getattr(t.run, "__module__", None) for t in worker.app.tasks.values()}
    return sorted(n for n in names if n and n != "qops" and not n.startswith("qops."))


@handler
def handle_pool_restart(worker: Worker, modules: Any = None, reload: bool = False,
                        reloader: Any = None, **kwargs: Any) -> dict[str, Any]:
    """Celery's ``pool_restart``, refused unless ``worker_pool_restarts`` is on: import
    ``modules`` not imported yet (all the task modules if none are named), reload
    those imported already if ``reload``, then replace every pool process (each ends
    once its task is done), so new processes run the code imported now."""
    if not worker.app.conf.worker_pool_restarts:
        return {"error": "Pool restarts not enabled (set worker_pool_restarts: "
                         "QOPS_WORKER_POOL_RESTARTS=1 or CELERY_WORKER_POOL_RESTARTS)"}
    if reloader is not None:
        return {"error": "pool_restart: a custom reloader is not supported"}
    names = task_modules(worker) if modules is None else [str(m) for m in modules]
    imported, reloaded = [], []
    for name in names:
        if name not in sys.modules:
            importlib.import_module(name)
            imported.append(name)
        elif reload:
            importlib.reload(sys.modules[name])
            reloaded.append(name)
    log.warning("pool restart (remote control): imported %s; reloaded %s",
                ", ".join(imported) or "none", ", ".join(reloaded) or "none")
    pool = worker.pool
    if pool is None or worker.pool_kind != "prefork":
        return {"ok": f"reload started (the {worker.pool_kind} pool runs in the node's "
                      "process: modules were imported there, no process to restart)"}
    pool.restart()
    return {"ok": "reload started"}
