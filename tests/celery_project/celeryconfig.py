"""Settings in a celeryconfig module, old upper-case names and new ones mixed, as projects have them."""
import os

from nbq.schedules import crontab

BROKER_URL = os.environ.get("NBQ_BROKER")
CELERY_RESULT_BACKEND = BROKER_URL
CELERY_ACCEPT_CONTENT = ["pickle", "json", "msgpack"]
task_routes = {"tasks.where": {"queue": "routed"}, "tasks.slow*": "lopri"}
task_annotations = {"tasks.metered": {"rate_limit": "60/m"}}
CELERY_IMPORTS = ("reports",)
beat_schedule = {"nightly-report": {"task": "reports.nightly", "schedule": crontab(minute=0, hour=3)}}
