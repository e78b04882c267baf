"""``app.conf``: Celery's lower-case setting names, the old upper-case ones mapped to them."""
from __future__ import annotations

import importlib
from datetime import timedelta
from types import ModuleType
from typing import Any, Iterable, Mapping

DEFAULTS: dict[str, Any] = {
    "broker_url": None,
    "result_backend": None,
    "task_serializer": "pickle",
    "result_serializer": "pickle",
    "accept_content": ["pickle", "json", "msgpack"],
    "task_routes": None,
    "task_annotations": None,
    "task_default_queue": "default",
    "task_default_priority": None,
    "task_default_rate_limit": None,
    "task_time_limit": None,
    "task_soft_time_limit": None,
    "task_acks_late": False,
    "task_reject_on_worker_lost": None,  # None: nbq's rule (re-run until max_task_deaths)
    "task_always_eager": False,   # tasks run in the sending thread (an inline memory:// client)
    "task_eager_propagates": False,  # ... and a failed one raises there, at apply_async
    "result_expires": 86400,
    "beat_schedule": {},
    "timezone": "UTC",
    "enable_utc": True,
    "imports": (),
    "include": (),
    "worker_concurrency": None,
}

#: Celery 3's upper-case names, as Celery 4+ maps them.
OLD_NAMES = {
    "BROKER_URL": "broker_url",
    "BROKER_TRANSPORT_OPTIONS": "broker_transport_options",
    "CELERY_RESULT_BACKEND": "result_backend",
    "CELERY_TASK_SERIALIZER": "task_serializer",
    "CELERY_RESULT_SERIALIZER": "result_serializer",
    "CELERY_ACCEPT_CONTENT": "accept_content",
    "CELERY_ROUTES": "task_routes",
    "CELERY_ANNOTATIONS": "task_annotations",
    "CELERY_DEFAULT_QUEUE": "task_default_queue",
    "CELERY_DEFAULT_RATE_LIMIT": "task_default_rate_limit",
    "CELERYD_TASK_TIME_LIMIT": "task_time_limit",
    "CELERYD_TASK_SOFT_TIME_LIMIT": "task_soft_time_limit",
    "CELERY_ACKS_LATE": "task_acks_late",
    "CELERY_REJECT_ON_WORKER_LOST": "task_reject_on_worker_lost",
    "CELERY_ALWAYS_EAGER": "task_always_eager",
    "CELERY_EAGER_PROPAGATES_EXCEPTIONS": "task_eager_propagates",
    "CELERY_TASK_RESULT_EXPIRES": "result_expires",
    "CELERY_RESULT_EXPIRES": "result_expires",
    "CELERYBEAT_SCHEDULE": "beat_schedule",
    "CELERY_TIMEZONE": "timezone",
    "CELERY_ENABLE_UTC": "enable_utc",
    "CELERY_IMPORTS": "imports",
    "CELERY_INCLUDE": "include",
    "CELERYD_CONCURRENCY": "worker_concurrency",
}


def setting_name(name: str) -> str:
    """The lower-case name of a setting given by either name."""
    return OLD_NAMES.get(name, name.lower() if name.isupper() else name)


class Settings(dict):
    """A dict of settings with attribute access; any name may be set, known ones have defaults."""

    def __init__(self, *sources: Mapping, **settings: Any) -> None:
        super().__init__(DEFAULTS)
        for source in sources:
            self.update(source)
        self.update(settings)

    def __getattr__(self, name: str) -> Any:
        try:
            return dict.__getitem__(self, name)  # the stored (lower-case) name: no mapping needed
        except KeyError:
            pass
        try:
            return self[setting_name(name)]
        except KeyError:
            raise AttributeError(f"no setting {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __setitem__(self, name: str, value: Any) -> None:
        name = setting_name(name)
        if name == "result_expires" and isinstance(value, timedelta):
            value = value.total_seconds()
        super().__setitem__(name, value)

    def __getitem__(self, name: str) -> Any:
        return super().__getitem__(setting_name(name))

    def update(self, other: Mapping | Iterable = (), **settings: Any) -> None:  # type: ignore[override]
        for name, value in dict(other, **settings).items():
            self[name] = value


def settings_of(source: Any) -> dict:
    """The settings an object holds: a dict, a module (by object or dotted name), or any object.

    As Celery's ``config_from_object``: public names only; modules, classes and
    functions in a module (its imports) are not settings.
    """
    if isinstance(source, str):
        module_name, _, attr = source.partition(":")
        source = importlib.import_module(module_name)
        if attr:
            source = getattr(source, attr)
    if isinstance(source, Mapping):
        return dict(source)
    values = {name: getattr(source, name) for name in dir(source) if not name.startswith("_")}
    return {name: value for name, value in values.items()
            if not callable(value) and not isinstance(value, ModuleType)}
