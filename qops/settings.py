"""Every setting with its default and type, the old (Celery 3) names, and where each
value came from.

Sources, highest first: command line > environment (``QOPS_<NAME>``) > YAML file
(``--config``/``QOPS_CONFIG``, else ``./qops.yaml``, else ``/etc/qops/qops.yaml``) >
the app's own code (``App(...)``, ``config_from_object``, ``conf.update``) > defaults.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qops import values
from qops.errors import ConfigError, UsageError
from qops.rates import parse_rate
from qops.transports import declare, failover


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    type: str  # str, int, float, bool, list, dict, any
    doc: str
    #: checks a value of the right type (bounds...): returns it or raises UsageError
    check: Callable[[Any], Any] | None = None


def _s(name: str, default: Any, type_: str, doc: str,
       check: Callable[[Any], Any] | None = None) -> Setting:
    return Setting(name, default, type_, doc, check)


def _seconds(value: float) -> float:
    return values.seconds(value, "it")


def _batch_seconds(value: float) -> float:
    return float(values.number(value, "it", at_least=0, at_most=10))


def _at_least(low: int, high: float | None = None) -> Callable[[Any], Any]:
    return lambda value: values.number(value, "it", at_least=low, at_most=high, whole=True)


def _compression(value: str) -> str:
    from qops.compression import compression_type

    compression_type(value)
    return value


def _json_only(value: str) -> str:
    if str(value).strip().lower() != "json":
        raise UsageError(f"{value!r} is not supported: qops sends and stores JSON only")
    return value


def _timezone(value: str) -> str:
    from qops.schedules import get_tz

    get_tz(value)
    return value


def _rate(value: str) -> str:
    parse_rate(value)
    return value


SETTINGS: dict[str, Setting] = {s.name: s for s in [
    _s("broker_url", None, "url",
       "broker URL; default: the embedded SQLite file. A RabbitMQ cluster: a list of URLs "
       "(or 'amqp://h1;amqp://h2')"),
    _s("broker_failover_strategy", "round-robin", "str",
       "which node of a broker URL list to connect to: 'round-robin' (the next one when "
       "the current one fails) or 'shuffle' (a random one for each connection)",
       failover.strategy),
    _s("result_backend", None, "str", "result backend URL; default: SQLite with the SQLite broker"),
    _s("result_backend_transport_options", {}, "dict",
       "result backend options (Redis: master_name, sentinel_kwargs, wait_replicas, ...)"),
    _s("compat", "qops", "str", "names on the wire: 'qops' or 'celery'"),
    _s("imports", [], "list", "modules a worker imports to register tasks"),
    _s("include", [], "list", "more modules to import (as App(include=...))"),
    _s("timezone", "UTC", "str", "time zone for crontab schedules", _timezone),
    _s("enable_utc", True, "bool", "times in messages are UTC"),
    _s("task_default_queue", None, "str", "queue for tasks with no route (default: the namespace)"),
    _s("task_routes", {}, "dict", "task name or glob -> {'queue': name} or queue name"),
    _s("task_annotations", {}, "dict", "task name or '*' -> task options (rate_limit, ...)"),
    _s("task_serializer", "json", "str", "only 'json' is supported", _json_only),
    _s("result_serializer", "json", "str", "only 'json' is supported", _json_only),
    _s("accept_content", ["json"], "list", "content types a worker accepts"),
    _s("task_acks_late", True, "bool", "ack after the task ends (at-least-once); differs from Celery"),
    _s("task_reject_on_worker_lost", True, "bool",
       "requeue a task whose pool process died (else FAILURE with WorkerLostError)"),
    _s("task_max_worker_lost", 3, "int",
       "worker losses (its process died running it) before a message is dead-lettered",
       _at_least(1)),
    _s("task_worker_lost_backoff", 1.0, "float",
       "seconds before a message runs again after its 2nd worker loss (doubles each time)",
       _seconds),
    _s("task_time_limit", None, "float", "hard time limit in seconds", _seconds),
    _s("task_soft_time_limit", None, "float", "soft time limit in seconds", _seconds),
    _s("task_default_rate_limit", None, "str", "rate limit for every task, e.g. '10/m'",
       _rate),
    _s("task_ignore_result", False, "bool", "do not store results"),
    _s("task_track_started", False, "bool", "store STARTED when a task starts"),
    _s("task_default_priority", None, "int", "priority 0..9 (9 runs first)",
       _at_least(0, 9)),
    _s("task_queue_max_priority", None, "int",
       "x-max-priority of the queues declared on RabbitMQ, which then apply task "
       "priorities (1..255, e.g. 9; default: none, as Celery)", _at_least(0, 255)),
    _s("task_default_queue_type", "classic", "str",
       "RabbitMQ type of the default queue: 'classic' or 'quorum'", declare.queue_type),
    _s("task_create_missing_queue_type", "classic", "str",
       "RabbitMQ type of every other queue: 'classic' or 'quorum'", declare.queue_type),
    _s("task_default_exchange", None, "str",
       "exchange of the default queue under the celery preset (default: the queue's name)"),
    _s("task_default_exchange_type", "direct", "str",
       "type of that exchange: 'direct', 'topic' or 'fanout'", declare.exchange_type),
    _s("task_default_routing_key", None, "str",
       "binding key of the default queue under the celery preset (default: its name)"),
    _s("worker_detect_quorum_queues", True, "bool",
       "a worker consuming a quorum queue uses a per-consumer prefetch from the start"),
    _s("task_compression", None, "str",
       "compress task bodies: gzip (zlib), bzip2 or lzma (xz), as Celery's",
       _compression),
    _s("task_always_eager", False, "bool", "run tasks in-process on apply_async (tests)"),
    _s("task_max_message_size", 16 * 1024 * 1024, "int", "largest message accepted, bytes",
       _at_least(1)),
    _s("result_expires", 86400, "float", "seconds a result is kept (0 = forever)",
       lambda v: values.number(v, "it", at_least=0, at_most=values.MAX_SECONDS)),
    _s("worker_concurrency", None, "int", "pool size (default: number of CPUs)",
       _at_least(1, values.MAX_POOL_SIZE)),
    _s("worker_pool", "prefork", "str", "prefork, threads or solo"),
    _s("worker_prefetch_multiplier", 4, "int", "messages reserved per pool slot",
       _at_least(1)),
    _s("worker_heartbeat_interval", 2.0, "float", "seconds between worker heartbeats",
       _seconds),
    _s("worker_heartbeat_ttl", 10.0, "float",
       "a worker silent this long is dead and its messages go back to the queue", _seconds),
    _s("worker_max_tasks_per_child", None, "int", "replace a prefork child after N tasks",
       _at_least(1)),
    _s("worker_pool_restarts", False, "bool",
       "obey pool_restart (remote control): re-import task modules, replace pool processes"),
    _s("worker_send_task_events", False, "bool", "send task events (-E)"),
    _s("worker_task_events_batch", 0.2, "float",
       "seconds a worker process gathers its task events into one message (a JSON list, "
       "routing key task.multi, as Celery's workers send them); 0 sends each alone",
       _batch_seconds),
    _s("worker_log_repr_maxsize", 1024, "int",
       "longest repr of a task's arguments, result or exception in worker log lines "
       "and events, in characters (0 = no limit; Celery's argsrepr/resultrepr_maxsize)",
       _at_least(0)),
    _s("worker_state_db", None, "str", "file keeping revoked task ids across restarts (--statedb)"),
    _s("broker_connection_timeout", 5.0, "float", "seconds to connect to the broker",
       _seconds),
    _s("broker_transport_options", {}, "dict", "transport-specific options"),
    _s("broker_api", None, "str",
       "RabbitMQ management API for queue counts, e.g. http://guest:guest@localhost:15672/api/"
       " (default: the broker's host, port 15672; 'off': do not ask)"),
    _s("control_key_file", None, "str",
       "key file that signs remote control (docs/security.md); none: unauthenticated"),
    _s("task_signing", False, "bool",
       "sign task messages; workers dead-letter unsigned ones (docs/security.md)"),
    _s("task_key_file", None, "str", "key file for task_signing (default: control_key_file)"),
    _s("beat_schedule", {}, "dict", "periodic tasks"),
    _s("beat_schedule_filename", "qops-beat-schedule", "str", "beat's state file"),
]}

# Celery 3 upper-case names that seeds and old projects use.
OLD_NAMES: dict[str, str] = {
    "BROKER_URL": "broker_url",
    "CELERY_BROKER_URL": "broker_url",
    "CELERY_RESULT_BACKEND": "result_backend",
    "CELERY_IMPORTS": "imports",
    "CELERY_INCLUDE": "include",
    "CELERY_TIMEZONE": "timezone",
    "CELERY_ENABLE_UTC": "enable_utc",
    "CELERY_TASK_RESULT_EXPIRES": "result_expires",
    "CELERY_RESULT_EXPIRES": "result_expires",
    "CELERYBEAT_SCHEDULE": "beat_schedule",
    "CELERY_ROUTES": "task_routes",
    "CELERY_ANNOTATIONS": "task_annotations",
    "CELERY_DEFAULT_QUEUE": "task_default_queue",
    "CELERY_TASK_SERIALIZER": "task_serializer",
    "CELERY_RESULT_SERIALIZER": "result_serializer",
    "CELERY_ACCEPT_CONTENT": "accept_content",
    "CELERY_ACKS_LATE": "task_acks_late",
    "CELERY_IGNORE_RESULT": "task_ignore_result",
    "CELERY_TRACK_STARTED": "task_track_started",
    "CELERY_ALWAYS_EAGER": "task_always_eager",
    "CELERY_DEFAULT_RATE_LIMIT": "task_default_rate_limit",
    "CELERYD_CONCURRENCY": "worker_concurrency",
    "CELERYD_PREFETCH_MULTIPLIER": "worker_prefetch_multiplier",
    "CELERYD_POOL": "worker_pool",
    "CELERYD_POOL_RESTARTS": "worker_pool_restarts",
    "CELERYD_TASK_TIME_LIMIT": "task_time_limit",
    "CELERYD_TASK_SOFT_TIME_LIMIT": "task_soft_time_limit",
    "CELERYD_MAX_TASKS_PER_CHILD": "worker_max_tasks_per_child",
    "CELERY_SEND_TASK_EVENTS": "worker_send_task_events",
    "CELERYD_STATE_DB": "worker_state_db",
    "BROKER_TRANSPORT_OPTIONS": "broker_transport_options",
    "BROKER_CONNECTION_TIMEOUT": "broker_connection_timeout",
    "BROKER_FAILOVER_STRATEGY": "broker_failover_strategy",
}

# Celery 4+ lower-case names that qops spells differently.
ALIASES: dict[str, str] = {
    "result_backend_url": "result_backend",
    "worker_task_time_limit": "task_time_limit",
    "task_create_missing_queues": "",  # always true in qops: accepted and ignored
    "broker_connection_retry_on_startup": "",
    "worker_hijack_root_logger": "",
}

LAYERS = ("default", "app", "yaml", "env", "cli")


def canonical(key: str) -> str | None:
    """The setting name for ``key`` (any accepted spelling), '' if ignored, None if unknown."""
    if key in SETTINGS:
        return key
    if key in OLD_NAMES:
        return OLD_NAMES[key]
    if key in ALIASES:
        return ALIASES[key]
    return None


def coerce(name: str, value: Any, source: str) -> Any:
    """Check and convert ``value`` for setting ``name`` (strings from env are parsed):
    its type, then its bounds; a ConfigError names the setting and the source."""
    setting = SETTINGS[name]
    return _checked(setting, _typed(setting, value, source), source)


def _typed(setting: Setting, value: Any, source: str) -> Any:
    name = setting.name
    if value is None:
        return None
    kind = setting.type
    try:
        if kind == "str":
            return str(value)
        if kind == "url":  # a URL, or a list of them (the nodes of a cluster)
            if isinstance(value, (list, tuple)):
                if not value or not all(isinstance(v, str) and v.strip() for v in value):
                    raise ValueError
                return ";".join(v.strip() for v in value)
            return str(value)
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if kind == "list":
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return list(value)
        if kind == "dict":
            if isinstance(value, str):
                import json

                value = json.loads(value)
            if not isinstance(value, Mapping):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError):
        raise ConfigError(f"setting {name!r} from {source}: {value!r} is not a valid {kind}") from None
    return value


def _checked(setting: Setting, value: Any, source: str) -> Any:
    if setting.check is None or value is None:
        return value
    try:
        return setting.check(value)
    except UsageError as exc:
        raise ConfigError(f"setting {setting.name!r} from {source}: "
                          f"{str(exc).removeprefix('it ')}") from None


class Settings:
    """Layered settings. Read as attributes (``conf.broker_url``) or items."""

    def __init__(self) -> None:
        object.__setattr__(self, "_layers", {layer: {} for layer in LAYERS})
        object.__setattr__(self, "_sources", {})
        object.__setattr__(self, "_loaded_outside", False)
        #: config_from_object('module:attr') sources not read yet (Celery reads them
        #: on first use too: Django's settings may be half-imported when it is called)
        object.__setattr__(self, "_pending", [])
        object.__setattr__(self, "_version", 0)  # + 1 at each write
        for s in SETTINGS.values():
            self._layers["default"][s.name] = s.default

    # -- reading -------------------------------------------------------------------
    def _ensure_outside(self) -> None:
        if self._pending:
            self._read_pending()
        # env and YAML are read the first time a value is needed, so an App made at
        # import time does not touch the disk, and the CLI can set QOPS_CONFIG first.
        if not self._loaded_outside:
            object.__setattr__(self, "_loaded_outside", True)
            self.load_yaml(find_config_file())
            self.load_env(os.environ)

    def get(self, name: str, default: Any = None) -> Any:
        self._ensure_outside()
        key = canonical(name)
        if not key:
            return default
        for layer in reversed(LAYERS):
            if key in self._layers[layer]:
                return self._layers[layer][key]
        return default

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        key = canonical(name)
        if key is None:
            raise AttributeError(f"no setting {name!r}")
        return self.get(key)

    def __getitem__(self, name: str) -> Any:
        if canonical(name) is None:
            raise KeyError(name)
        return self.get(name)

    def source(self, name: str) -> str:
        self._ensure_outside()
        key = canonical(name) or name
        for layer in reversed(LAYERS):
            if key in self._layers[layer]:
                return str(self._sources.get((layer, key), layer))
        return "default"

    @property
    def version(self) -> int:
        """A number that changes whenever a setting is written: lets a reader keep
        values it derived from the settings until they change."""
        self._ensure_outside()
        return int(self._version)

    def table(self) -> list[tuple[str, Any, str]]:
        """(name, value, where it came from) for every setting."""
        self._ensure_outside()
        return [(name, self.get(name), self.source(name)) for name in sorted(SETTINGS)]

    # -- writing -------------------------------------------------------------------
    def set(self, name: str, value: Any, layer: str = "app", source: str | None = None,
            strict: bool = False) -> None:
        if self._pending and layer == "app":
            self._read_pending()  # keep the order the app code set things in
        key = canonical(name)
        if key is None:
            if strict:
                raise ConfigError(f"unknown setting {name!r} in {source or layer}"
                                  + _suggest(name))
            return
        if key == "":
            return
        self._layers[layer][key] = coerce(key, value, source or layer)
        self._sources[(layer, key)] = source or _LAYER_NAMES[layer]
        object.__setattr__(self, "_version", self._version + 1)

    def __setattr__(self, name: str, value: Any) -> None:
        self.set(name, value, strict=True, source="app code")

    def __setitem__(self, name: str, value: Any) -> None:
        self.set(name, value, strict=True, source="app code")

    def update(self, mapping: Mapping[str, Any] | None = None, *, layer: str = "app",
               source: str | None = None, strict: bool = False, **kwargs: Any) -> None:
        for key, value in {**(mapping or {}), **kwargs}.items():
            self.set(key, value, layer=layer, source=source, strict=strict)

    def config_from_object(self, obj: Any, namespace: str | None = None) -> None:
        """Take settings from a module, a dotted module path, a class or a dict.

        A string names a module or an object in one (``'django.conf:settings'`` or
        ``'django.conf.settings'``). With ``namespace='CELERY'`` (or ``'QOPS'``) only
        ``CELERY_*`` names are read, Django style (``CELERY_BROKER_URL`` ->
        ``broker_url``); the names there that qops does not know are ignored, as Celery
        does, and logged once as a warning (docs/celery.md). A string is imported
        when a setting is first read or set, as Celery does."""
        if isinstance(obj, str):
            self._pending.append((obj, namespace))
        else:
            self._read_object(obj, namespace)

    def _read_pending(self) -> None:
        while self._pending:
            path, namespace = self._pending[0]
            obj = import_object(path)  # raises again at the next read if it fails
            self._pending.pop(0)
            self._read_object(obj, namespace, label=path)

    def _read_object(self, obj: Any, namespace: str | None, label: str | None = None
                     ) -> None:
        items: Iterable[tuple[str, Any]]
        if isinstance(obj, Mapping):
            items = obj.items()
        else:
            try:  # Django's settings are read here: ImproperlyConfigured, say
                items = [(k, getattr(obj, k)) for k in dir(obj) if not k.startswith("_")]
            except Exception as exc:
                raise ConfigError(f"cannot read config object {label or obj!r}: "
                                  f"{type(exc).__name__}: {exc}".splitlines()[0]) from None
        label = label or getattr(obj, "__name__", type(obj).__name__)
        unknown = []
        for key, value in items:
            if namespace:
                prefix = namespace.rstrip("_") + "_"
                if not key.startswith(prefix):
                    continue
                name = key[len(prefix):].lower()
                if canonical(name) is None:
                    unknown.append(key)
                key = name
            if canonical(key):
                self.set(key, value, layer="app", source=f"config object {label}")
        if unknown:
            import logging

            logging.getLogger("qops.settings").warning(
                "qops ignores these settings of %s, which it does not know: %s",
                label, ", ".join(sorted(unknown)))

    def load_env(self, environ: Mapping[str, str]) -> None:
        for name in SETTINGS:
            var = "QOPS_" + name.upper()
            if var in environ:
                self.set(name, environ[var], layer="env", source=f"env {var}")

    def load_yaml(self, path: Path | None) -> None:
        if path is None:
            return
        self._layers["yaml"].clear()
        object.__setattr__(self, "_version", self._version + 1)
        for key, value in read_yaml(path).items():
            if key == "app":
                continue  # used by the CLI to find the app
            self.set(key, value, layer="yaml", source=f"file {path}", strict=True)


def import_object(path: str) -> Any:
    """The module or object a string names: ``pkg.mod``, ``pkg.mod:attr`` or
    ``pkg.mod.attr``; a ConfigError says what could not be imported."""
    module_name, colon, attr = path.partition(":")
    if not colon:
        try:
            return importlib.import_module(path)
        except ModuleNotFoundError as exc:
            if not exc.name or not path.startswith(exc.name) or "." not in path:
                raise ConfigError(f"cannot import config module {path!r}: {exc}") from None
            module_name, _, attr = path.rpartition(".")
        except ImportError as exc:
            raise ConfigError(f"cannot import config module {path!r}: {exc}") from None
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import config module {module_name!r}: {exc}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"config object {path!r}: {module_name!r} has no "
                              f"{attr!r}") from None
    return obj


_LAYER_NAMES = {"default": "default", "app": "app code", "yaml": "config file",
                "env": "environment", "cli": "command line"}


def _suggest(name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name.lower(), list(SETTINGS), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def find_config_file() -> Path | None:
    explicit = os.environ.get("QOPS_CONFIG")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"config file {path} "
                              + ("is a directory" if path.is_dir() else "does not exist"))
        return path
    for candidate in (Path("qops.yaml"), Path("/etc/qops/qops.yaml")):
        if candidate.is_file():
            return candidate
    return None


def read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)  # where the parser stopped
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML: {problem}{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of setting: value")
    return data


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "qops"


def default_broker_url() -> str:
    return f"sqlite://{(default_state_dir() / 'broker.db').absolute()}"
